"""``nodulenet predict --server URL``: a cohort predicted by a nodulenet server, written like local predict.

The output folder is what local :func:`~nodulenet.predict_api.predict_scans` writes: ``<out>/<name>/`` per scan
(names from the same cohort rules), ``summary.json`` (rewritten after every scan) and ``predict_config.json``, so
tools that read one read the other. Differences, all recorded:

- ``predict_config.json`` is the server's run config (its model, device and preprocessing) plus ``server``: the URL,
  the server's version and the job ids; ``scans`` lists the local paths;
- each ``summary.json`` entry is the server's result for the scan with local paths, and ``details.server``: url,
  job id, upload seconds and the wall time from upload to download;
- ``nodules.json``'s ``source.path`` is the local scan path (the server read a copy in its job folder).

Scans are pipelined: while the oldest job runs, the next ones are uploaded (as many as the server has workers,
plus one), and results are written and reported in cohort order. A full queue (503) waits for ``Retry-After``.
A scan the server refuses or fails is reported like a local failure and the run goes on; a wrong token or an
unreachable server stops the run. Ctrl-C deletes the jobs this run still had on the server.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import NoduleNetError
from nodulenet.infer.cohort import CohortItem, Shard, cohort_items, expand_scan_arguments
from nodulenet.io.atomic import write_json_atomic
from nodulenet.serve.client import (JobFailed, ServerAuthError, ServerBusy, ServerClient, ServerError,
                                    ServerUnreachable)

_FATAL = (ServerAuthError, ServerUnreachable)


@dataclass
class _Entry:
    item: CohortItem
    job_id: str | None = None
    result: Any = None  # ScanResult once known
    t_submit: float = 0.0
    upload_s: float = 0.0


def _local_source_path(scan: Path) -> str:
    """What local predict records as ``source.path``: the folder for DICOM (a DICOM file stands for its folder)."""
    if scan.is_file() and not scan.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
        return str(scan.parent)
    return str(scan)


def _is_complete(folder: Path, info: dict[str, Any], threshold: float) -> bool:
    """Local predict's skip rule, against the server's model: complete output of the same model and threshold."""
    from nodulenet.predict_api import output_is_complete

    model = info.get("model")
    if not model:
        return False
    return output_is_complete(folder, weights_sha256=model["weights_sha256"], config_sha256=model["config_sha256"],
                              threshold=threshold, version=info["version"])


def run_on_server(scans: Sequence[str | Path], out_dir: str | Path, *, url: str, token: str | None,
                  options: Any = None, progress: bool = False, on_result: Callable[[Any], None] | None = None,
                  verify: bool | str = True, poll_s: float = 0.5, client: ServerClient | None = None) -> Any:
    """See the module docstring; returns a :class:`~nodulenet.predict_api.PredictRun`."""
    import nodulenet
    from nodulenet.predict_api import PredictOptions, PredictRun, ScanResult

    options = options or PredictOptions()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NoduleNetError(f"{out}: the output path exists and is not a folder")
    items = cohort_items(expand_scan_arguments(list(scans)))
    shard = Shard(rank=0, world_size=1, local_rank=0)
    own_client = client is None
    client = client or ServerClient(url, token, verify=verify)
    info = client.info()
    if not info.get("model"):
        raise NoduleNetError(f"the server at {client.url} has no worker with a loaded model (started with "
                             "--workers 0?); it would only store the jobs")
    out.mkdir(parents=True, exist_ok=True)
    server_block: dict[str, Any] = {"url": client.url, "version": info["version"], "device": info["device"],
                                    "workers": info["workers"]["configured"], "jobs": {}}
    config: dict[str, Any] = {"nodulenet_version": info["version"], "options": options.to_dict(),
                              **(info.get("prediction") or {}), "model": info["model"]}
    config_path = out / "predict_config.json"
    summary_path = out / "summary.json"

    def write_config() -> None:
        write_json_atomic(config_path, {**config, "server": server_block, "shard": asdict(shard),
                                        "scans": [str(i.path) for i in items]})

    results: list[Any] = []

    def write_summary() -> None:
        counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        write_json_atomic(summary_path, {"nodulenet_version": nodulenet.__version__, "shard": asdict(shard),
                                         "n_scans": len(items), **counts, "server": client.url,
                                         "scans": [r.to_dict() for r in results]})

    def failed(item: CohortItem, error: str) -> Any:
        return ScanResult(index=item.index, scan=str(item.path), name=item.name, status="failed",
                          out_dir=str(out / item.name), error=error)

    write_config()
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # one bar for the cohort (scans done of all) and one for the upload in progress (MB sent of all)
    bar = Progress(TextColumn("[bold]{task.fields[what]}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                   TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), disable=not progress)
    window = max(1, int(info["workers"]["configured"])) + 1
    pending: deque[CohortItem] = deque(items)
    in_flight: deque[_Entry] = deque()
    with bar:
        cohort_task = bar.add_task("", total=len(items), what="predict (server)", amount=f"0/{len(items)}")
        upload_task = bar.add_task("", total=None, what="upload", amount="", visible=False)
        try:
            while pending or in_flight:
                while pending and sum(e.job_id is not None for e in in_flight) < window:
                    entry = _Entry(pending[0])
                    folder = out / entry.item.name
                    if not options.redo and _is_complete(folder, info, options.threshold):
                        entry.result = ScanResult(index=entry.item.index, scan=str(entry.item.path),
                                                  name=entry.item.name, status="skipped", out_dir=str(folder),
                                                  details={"reason": "complete output from the same model and "
                                                                     "threshold already there"})
                    else:
                        try:
                            entry.job_id, entry.upload_s = _submit(client, entry.item, options, bar, upload_task,
                                                                   info["limits"]["max_upload_mb"])
                            entry.t_submit = time.perf_counter() - entry.upload_s
                        except ServerBusy as busy:
                            if any(e.job_id for e in in_flight):
                                break  # finish the oldest job first: that frees a place in the queue
                            time.sleep(busy.retry_after)
                            continue
                        except _FATAL:
                            raise
                        except NoduleNetError as exc:  # this scan refused (bad file, 413, 415): report and go on
                            entry.result = failed(entry.item, str(exc))
                    pending.popleft()
                    in_flight.append(entry)
                if not in_flight:
                    continue
                entry = in_flight[0]
                if entry.result is None:
                    entry.result = _finish(client, entry, out, poll_s, bar, cohort_task, failed)
                    if entry.result.status == "done" and entry.job_id:
                        server_block["jobs"][entry.item.name] = entry.job_id
                        job_config = entry.result.details.pop("_predict_config", None)
                        if job_config:
                            config.update(job_config)
                        write_config()
                in_flight.popleft()
                results.append(entry.result)
                write_summary()
                if on_result is not None:
                    on_result(entry.result)
                bar.update(cohort_task, advance=1, amount=f"{len(results)}/{len(items)}")
        except KeyboardInterrupt:
            for e in in_flight:
                if e.job_id and e.result is None:
                    try:
                        client.delete(e.job_id)
                    except NoduleNetError:
                        pass
            raise
        finally:
            if own_client:
                client.close()
    write_summary()
    return PredictRun(out_dir=out, results=results, shard=shard, summary_path=summary_path, config_path=config_path)


def _submit(client: ServerClient, item: CohortItem, options: Any, bar: Any, task: Any,
            max_upload_mb: float) -> tuple[str, float]:
    t0 = time.perf_counter()
    bar.update(task, visible=True, completed=0, total=None, description=item.name)

    def sent(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, amount=f"{done / 1e6:.1f}/{total / 1e6:.1f} MB")

    job = client.submit(item.path, threshold=options.threshold, label_format=options.label_format,
                        dicom_outputs=options.dicom_outputs, progress=sent, max_upload_mb=max_upload_mb)
    bar.update(task, visible=False)
    return job["id"], time.perf_counter() - t0


def _finish(client: ServerClient, entry: _Entry, out: Path, poll_s: float, bar: Any, task: Any,
            failed: Callable[[CohortItem, str], Any]) -> Any:
    """Wait for the entry's job, download its files into ``out/<name>/`` (temp folder + rename), build its result."""
    from nodulenet.predict_api import ScanResult

    item, job_id = entry.item, entry.job_id
    assert job_id is not None

    def show(job: dict[str, Any]) -> None:
        where = f"queue position {job['queue_position']}" if job["state"] == "queued" else job["stage"]
        bar.update(task, description=f"{item.name}: {where} ({100 * job['progress']:.0f}%)")

    try:
        job = client.wait(job_id, poll_s=poll_s, on_progress=show)
    except JobFailed as exc:
        return failed(item, f"{exc.job.get('error')} (server job {job_id})")
    except _FATAL:
        raise
    except ServerError as exc:
        return failed(item, str(exc))
    final = out / item.name
    tmp = out / f".{item.name}.download-{uuid.uuid4().hex[:8]}"
    try:
        client.download(job_id, tmp)
        _set_source_path(tmp / "nodules.json", _local_source_path(item.path))
        if final.exists():  # a previous run's output: remove its completion marker first, then the rest
            (final / "nodules.json").unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except _FATAL:
        raise
    except NoduleNetError as exc:
        return failed(item, str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = dict(job["result"])
    data.update(index=item.index, scan=str(item.path), name=item.name, out_dir=str(final))
    details = dict(data.get("details") or {})
    details["files"] = {kind: str(final / name) for kind, name in details.get("files", {}).items()}
    details["server"] = {"url": client.url, "job_id": job_id, "upload_s": round(entry.upload_s, 3),
                         "wall_s": round(time.perf_counter() - entry.t_submit, 3), "attempts": job["attempts"]}
    details["_predict_config"] = job.get("predict_config")
    data["details"] = details
    return ScanResult(**data)


def _set_source_path(path: Path, source: str) -> None:
    d = json.loads(path.read_text(encoding="utf-8"))
    d.setdefault("source", {})["path"] = source
    write_json_atomic(path, d)
