"""``nodulenet predict --remote user@host[:port]``: run a cohort on another machine (the GPU box) over SSH.

Steps (:func:`predict_over_ssh`):

1. expand the scan arguments HERE (scan lists are read locally) and name the output folders exactly as a local
   run would; a scan that does not exist here is reported failed without being sent;
2. connect (:mod:`nodulenet.remote.connection`: known_hosts checked, keys or agent) and check that the remote
   ``nodulenet`` runs (``nodulenet version``, or ``<remote_python> -m nodulenet version``);
3. ``mktemp -d "${TMPDIR:-/tmp}/nodulenet-remote.XXXXXXXXXX"`` there, and SFTP every scan into
   ``<work>/in/<NNNN>/`` (:mod:`nodulenet.remote.transfer`); without ``redo``, each scan's complete local
   ``nodules.json`` goes to ``<work>/out/<name>/`` too, so the remote run skips what is already done here;
4. ONE remote ``nodulenet predict <work>/scans.txt -o <work>/out`` with the options as flags, under a pty (so it
   dies with the connection), its output streamed line by line to the console / the progress callback and to
   ``<out>/remote.log``;
5. download each done scan's folder into ``<out>/<name>/`` (temp folder, ``nodules.json`` last, renamed into
   place; ``source.path`` in nodules.json becomes the LOCAL scan path), then ``on_result(ScanResult)``;
   ``<out>/summary.json`` and ``<out>/predict_config.json`` as a local run writes them, plus a ``remote``
   section (host, remote work folder, remote nodulenet version and command);
6. ALWAYS remove the remote work folder, after success, failure, cancel or Ctrl-C (the remote process is
   stopped first); after a lost connection one reconnect is tried for that, and the error says if it failed.

Remote exit code 1 (some scans failed) is a normal outcome: those scans come back failed with their errors
(remote paths replaced by the local ones). Exit code 2 (the remote run refused its options, e.g. a
``--weights`` path missing THERE) raises :class:`RemoteError` with the remote's own one-line message.
"""

from __future__ import annotations

import json
import posixpath
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import nodulenet
from nodulenet.errors import NoduleNetError
from nodulenet.infer.cohort import CohortItem, Shard, case_names, cohort_items, expand_scan_arguments
from nodulenet.io.atomic import write_json_atomic
from nodulenet.predict_api import PredictOptions, PredictRun, ScanResult
from nodulenet.remote.connection import ConnectionLost, RemoteError, Target, connect, parse_target
from nodulenet.remote.progress import Reporter
from nodulenet.remote.session import (Cancelled, RemoteState, Session, remote_error_line,
                                      remote_predict_command)
from nodulenet.remote.transfer import (COMPLETE_MARKER, Meter, ScanUpload, download_folder, plan_upload,
                                       remote_files, sftp_makedirs, upload_scan)

__all__ = ["Cancelled", "ConnectionLost", "RemoteError", "predict_over_ssh", "remote_predict_command"]

LOG_NAME = "remote.log"


@dataclass
class _Sent:
    """A scan that goes to the remote machine: its cohort item, its files, its path there."""

    item: CohortItem
    plan: ScanUpload
    remote_scan: str = ""


def predict_over_ssh(scans: Sequence[str | Path], out: str | Path, *, target: str,
                     options: PredictOptions | None = None, remote_python: str | None = None,
                     identity_file: str | Path | None = None, accept_new_host_key: bool = False,
                     known_hosts: str | Path | None = None, progress: bool | Callable[[str], None] = True,
                     on_result: Callable[[ScanResult], None] | None = None,
                     cancel: threading.Event | None = None) -> PredictRun:
    """Predict ``scans`` on ``target`` (``[user@]host[:port]``) over SSH into the local ``out`` (module docstring).

    ``remote_python``: a Python on the remote machine that has nodulenet (default: ``nodulenet`` on its PATH).
    ``known_hosts``: default ``$NODULENET_KNOWN_HOSTS``, else ``~/.ssh/known_hosts``. ``progress``: True draws
    rich bars and relays the remote output on stderr; a callable receives the same as one-line strings (called
    from the calling thread, e.g. the viewer's worker); False is silent. ``on_result`` is called once per scan, in
    cohort order, when its folder is complete here. ``cancel`` (checked several times a second) stops the
    transfer or the remote process and raises :class:`Cancelled`. Connection, host-key, authentication and
    remote-setup problems raise :class:`RemoteError` subclasses: one line naming the host.
    """
    options = options or PredictOptions()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NoduleNetError(f"{out}: the output path exists and is not a folder")
    tgt = parse_target(target)
    items = cohort_items(expand_scan_arguments(list(scans)))
    sent: list[_Sent] = []
    results: dict[int, ScanResult] = {}
    for item in items:
        if item.path.exists():
            sent.append(_Sent(item, plan_upload(item.path)))
        else:  # as in a local run: a missing scan fails on its own and the others go on
            results[item.index] = ScanResult(index=item.index, scan=str(item.path), name=item.name, status="failed",
                                             out_dir=str(out / item.name), error=f"{item.path}: does not exist")
            if on_result is not None:
                on_result(results[item.index])
    out.mkdir(parents=True, exist_ok=True)
    run = _RemoteRun(tgt, out, options, remote_python, identity_file, known_hosts, cancel, on_result, results)
    run.info["target"] = target
    with Reporter(progress, str(tgt), out / LOG_NAME) as run.reporter:
        if sent:
            run.execute(sent, accept_new_host_key)
    ordered = [results[i.index] for i in items]
    shard = Shard(rank=0, world_size=1, local_rank=0)
    remote_config = run.info.pop("predict_config", None) or {"options": options.to_dict()}
    counts = {s: sum(r.status == s for r in ordered) for s in ("done", "skipped", "failed")}
    summary_path = write_json_atomic(out / "summary.json", {
        "nodulenet_version": run.info.get("nodulenet_version", nodulenet.__version__), "shard": asdict(shard),
        "n_scans": len(items), **counts, "remote": run.info, "scans": [r.to_dict() for r in ordered]})
    config_path = write_json_atomic(out / "predict_config.json", {
        **remote_config, "shard": asdict(shard), "scans": [str(i.path) for i in items], "remote": run.info})
    return PredictRun(out_dir=out, results=ordered, shard=shard, summary_path=summary_path, config_path=config_path)


class _RemoteRun:
    """Steps 2-6 of the module docstring for the scans that exist here."""

    def __init__(self, target: Target, out: Path, options: PredictOptions, remote_python: str | None,
                 identity_file: str | Path | None, known_hosts: str | Path | None, cancel: threading.Event | None,
                 on_result: Callable[[ScanResult], None] | None, results: dict[int, ScanResult]) -> None:
        self.target = target
        self.out = out
        self.options = options
        self.remote_python = remote_python
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.cancel = cancel
        self.on_result = on_result
        self.results = results  # filled in: cohort index -> result
        self.state = RemoteState()
        self.info: dict[str, Any] = {"host": str(target), "remote_python": remote_python}  # recorded in the JSON
        self.reporter: Reporter = None  # type: ignore[assignment]  # set by predict_over_ssh
        self._replacements: list[tuple[str, str]] = []

    def rewrite(self, text: str) -> str:
        """Remote paths in a message -> the local scan / output paths (``host:path`` for anything else)."""
        for old, new in self._replacements:
            text = text.replace(old, new)
        return text

    def execute(self, sent: list[_Sent], accept_new_host_key: bool) -> None:
        import paramiko

        self.reporter.note(f"connecting to {self.target}")
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled before connecting to {self.target}")
        client = connect(self.target, identity_file=self.identity_file, known_hosts=self.known_hosts,
                         accept_new_host_key=accept_new_host_key)
        session = Session(client, self.target, self.reporter, self.cancel)
        try:
            try:
                self._steps(session, sent)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise session.failure(exc) from None
            finally:
                session.cleanup(self.state)
        except ConnectionLost as exc:
            problem = self._cleanup_after_loss()
            if problem:
                raise ConnectionLost(f"{exc}; the remote work folder {self.target.host}:{self.state.work} could "
                                     f"not be removed ({problem}): remove it by hand") from None
            raise
        finally:
            session.close()

    def _steps(self, session: Session, sent: list[_Sent]) -> None:
        state = self.state
        version = session.check_nodulenet(self.remote_python)
        self.info["nodulenet_version"] = version
        if version != nodulenet.__version__:
            self.reporter.note(f"warning: {self.target} runs nodulenet {version}, this machine "
                               f"{nodulenet.__version__}")
        state.work = session.make_work_dir()
        self.info["work_dir"] = state.work
        self.reporter.note(f"remote work folder {state.work}")
        self._upload(session, sent)
        self._replacements = [(s.remote_scan, str(s.item.path)) for s in sent]
        self._replacements += [(f"{state.work}/out", str(self.out)), (state.work, f"{self.target.host}:{state.work}")]
        command = remote_predict_command(self.options, f"{state.work}/scans.txt", f"{state.work}/out",
                                         self.remote_python)
        self.info["command"] = command
        code = session.stream_predict(state, command, len(sent), self.rewrite)
        self.info["exit_code"] = code
        if code not in (0, 1):  # 1: some scans failed, reported per scan
            what = "was killed by a signal" if code == -1 else f"stopped with exit code {code}"
            message = remote_error_line(state) if code == 2 else " | ".join(state.tail[-3:]) or "no output"
            raise RemoteError(f"nodulenet predict on {self.target} {what}: {message}")
        self._download(session, sent)

    def _upload(self, session: Session, sent: list[_Sent]) -> None:
        session.phase = "uploading the scans"
        work = self.state.work or ""
        n_files = sum(len(s.plan.files) for s in sent)
        self.reporter.start_transfer("upload", sum(s.plan.size for s in sent),
                                     f"uploading {len(sent)} scan(s): {n_files} file(s)")
        meter = Meter(self.reporter.advance_transfer, session.check_cancel)
        sftp = session.sftp
        made: set[str] = {work}
        for i, s in enumerate(sent):
            s.remote_scan = upload_scan(sftp, s.plan, f"{work}/in/{i:04d}", meter, made)
        self.reporter.finish_transfer()
        with sftp.open(f"{work}/scans.txt", "w") as f:
            f.write("".join(f"{s.remote_scan}\n" for s in sent))
        sftp_makedirs(sftp, f"{work}/out", made)
        if not self.options.redo:
            # The remote names its folders from the remote paths; a complete local result placed where the
            # remote run looks lets it skip that scan exactly as a local run would (same model, threshold and
            # version; anything else and it recomputes).
            for s, name in zip(sent, case_names([Path(x.remote_scan) for x in sent])):
                local = self.out / s.item.name / COMPLETE_MARKER
                if local.is_file():
                    sftp_makedirs(sftp, f"{work}/out/{name}", made)
                    sftp.put(str(local), f"{work}/out/{name}/{COMPLETE_MARKER}")

    def _download(self, session: Session, sent: list[_Sent]) -> None:
        session.phase = "downloading the results"
        work_out = f"{self.state.work}/out"
        sftp = session.sftp
        try:
            with sftp.open(f"{work_out}/summary.json") as f:
                summary = json.loads(f.read().decode("utf-8"))
            with sftp.open(f"{work_out}/predict_config.json") as f:
                self.info["predict_config"] = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise RemoteError(f"nodulenet predict on {self.target} wrote no summary.json: "
                              f"{' | '.join(self.state.tail[-3:])}") from None
        entries = summary.get("scans", [])
        if len(entries) != len(sent):
            raise RemoteError(f"the remote summary.json on {self.target} lists {len(entries)} scan(s), "
                              f"{len(sent)} were sent")
        mapped = [self._local_result(e, s) for e, s in zip(entries, sent)]
        listings = {r.index: remote_files(sftp, f"{work_out}/{e['name']}") for r, e in zip(mapped, entries)
                    if r.status == "done"}
        self.reporter.start_transfer("download", sum(size for files in listings.values() for _, size in files),
                                     f"downloading {len(listings)} result folder(s)")
        meter = Meter(self.reporter.advance_transfer, session.check_cancel)
        for result, entry, s in zip(mapped, entries, sent):
            if result.status == "done":
                download_folder(sftp, f"{work_out}/{entry['name']}", listings[result.index], self.out / s.item.name,
                                meter, finish=lambda temp, s=s: _localise(temp, s.item.path, s.remote_scan))
            self.results[result.index] = result
            if self.on_result is not None:
                self.on_result(result)
        self.reporter.finish_transfer()

    def _local_result(self, remote: dict[str, Any], sent: _Sent) -> ScanResult:
        """A remote ScanResult (summary.json entry) as the local run would have written it."""
        known = {f.name for f in fields(ScanResult)}
        result = ScanResult(**{k: v for k, v in remote.items() if k in known})
        local_dir = self.out / sent.item.name
        files = result.details.get("files")
        if isinstance(files, dict):
            result.details["files"] = {k: str(local_dir / posixpath.basename(str(v))) for k, v in files.items()}
        result.details["remote"] = {"host": str(self.target), "scan": sent.remote_scan, "name": result.name}
        result.index, result.scan, result.name = sent.item.index, str(sent.item.path), sent.item.name
        result.out_dir = str(local_dir)
        result.error = None if result.error is None else self.rewrite(result.error)
        result.traceback = None if result.traceback is None else self.rewrite(result.traceback)
        return result

    def _cleanup_after_loss(self) -> str | None:
        """One fresh connection to stop the remote process and remove the work folder after the link dropped."""
        if self.state.work is None:
            return None
        self.state.channel = None
        try:
            client = connect(self.target, identity_file=self.identity_file, known_hosts=self.known_hosts, timeout=10)
        except NoduleNetError as exc:
            return str(exc)
        session = Session(client, self.target, self.reporter, None)
        try:
            return session.cleanup(self.state)
        finally:
            session.close()


def _localise(folder: Path, scan: Path, remote_scan: str) -> None:
    """nodules.json and report.html name the scan they describe: the local path, not the deleted remote copy.

    Runs on the hidden download folder, before it is renamed into place."""
    import html

    path = folder / COMPLETE_MARKER
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("source"), dict):
            data["source"]["path"] = str(scan)
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for report in folder.glob("*.html"):
        text = report.read_text(encoding="utf-8")
        for old, new in ((remote_scan, str(scan)), (html.escape(remote_scan), html.escape(str(scan)))):
            text = text.replace(old, new)
        report.write_text(text, encoding="utf-8")
