"""Running detection from the viewer: locally in a background process, on an HTTP server, or over SSH.

Every job is a :class:`DetectionJob`: ``start()``, ``cancel()``, and the signals ``progress(step, total, text)``
(``total`` 0 = no known number of steps), then exactly one of ``succeeded(Path)`` (the scan's result folder,
holding ``nodules.json``), ``failed(message)`` or ``cancelled()``, and ``finished()``.

- :class:`LocalDetection`: a ``python -m nodulenet.app.detect_worker`` child process (:class:`QProcess`) running
  :func:`nodulenet.predict_api.predict_scans` with the stages reported as JSON lines; Cancel sends SIGTERM (and
  SIGKILL 5 s later). Its log is ``<out>/detect.log``.
- :class:`ThreadDetection`: a Python thread calling the server client
  (:func:`nodulenet.serve.client_predict.run_on_server`) or the SSH runner (:func:`nodulenet.remote.ssh.predict_over_ssh`);
  both download the same result files into ``<out>/<name>/``.

:class:`ServerDialog` and :class:`SshDialog` ask where to run; the window remembers the answers in QSettings.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QWidget,
)

from nodulenet.app.loading import BackgroundCall
from nodulenet.errors import NoduleNetError

logger = logging.getLogger(__name__)

KILL_AFTER_MS = 5000


class DetectionCancelled(NoduleNetError):
    """Raised inside a client thread when the user pressed Cancel."""


class DetectionJob(QObject):
    """Base of the three ways to run detection (see the module doc for the signals)."""

    progress = Signal(int, int, str)
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    finished = Signal()

    mode = "?"

    def __init__(self, scan: Path, out_dir: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.scan = Path(scan)
        self.out_dir = Path(out_dir)
        self.running = False
        self._cancel_requested = False

    def start(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def _end(self, signal: Any, *args: Any) -> None:
        self.running = False
        signal.emit(*args)
        self.finished.emit()


class LocalDetection(DetectionJob):
    """Detection on this computer in a child process (see the module doc)."""

    mode = "local"

    def __init__(self, scan: Path, out_dir: Path, *, threshold: float = 0.5, weights: Path | None = None,
                 device: str = "cpu", threads: int | None = None, parent: QObject | None = None) -> None:
        super().__init__(scan, out_dir, parent)
        self.args = [str(self.scan), str(self.out_dir), "--threshold", repr(float(threshold)), "--device", device]
        if weights is not None:
            self.args += ["--weights", str(weights)]
        if threads is not None:
            self.args += ["--threads", str(int(threads))]
        self.process = QProcess(self)
        self._buffer = b""
        self._result: dict[str, Any] | None = None
        self._error: str | None = None
        self._stderr_tail = b""
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self.process.kill)

    @property
    def log_path(self) -> Path:
        return self.out_dir / "detect.log"

    def start(self) -> None:
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        env.insert("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        self.process.setProcessEnvironment(env)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._process_finished)
        self.process.errorOccurred.connect(self._process_error)
        self.running = True
        self.progress.emit(0, 5, "Starting the detection process")
        logger.info("local detection: %s -m nodulenet.app.detect_worker %s", sys.executable, " ".join(self.args))
        self.process.start(sys.executable, ["-m", "nodulenet.app.detect_worker", *self.args])

    def _read_stdout(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing to stdout)
            event = message.get("event")
            if event == "stage":
                self.progress.emit(int(message["step"]), int(message["total"]), str(message["text"]))
            elif event == "result":
                self._result = message["result"]
            elif event == "error":
                self._error = str(message["message"])

    def _read_stderr(self) -> None:
        self._stderr_tail = (self._stderr_tail + bytes(self.process.readAllStandardError().data()))[-4000:]

    def _process_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._end(self.failed, f"could not start {sys.executable} for detection: {self.process.errorString()}")

    def _process_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._kill_timer.stop()
        self._read_stdout()
        if self._cancel_requested:
            self._end(self.cancelled)
        elif self._result is not None and self._result.get("status") in ("done", "skipped"):
            self._end(self.succeeded, Path(self._result["out_dir"]))
        elif self._result is not None:
            self._end(self.failed, str(self._result.get("error") or f"{self.scan}: detection failed"))
        elif self._error is not None:
            self._end(self.failed, self._error)
        else:
            tail = self._stderr_tail.decode(errors="replace").strip().splitlines()[-1:] or [""]
            how = "crashed" if status == QProcess.ExitStatus.CrashExit else f"ended with code {code}"
            self._end(self.failed, f"the detection process {how} ({tail[0][:200]}); log: {self.log_path}")

    def cancel(self) -> None:
        if not self.running or self._cancel_requested:
            return
        self._cancel_requested = True
        self.progress.emit(0, 0, "Cancelling ...")
        self.process.terminate()
        self._kill_timer.start(KILL_AFTER_MS)


class ThreadDetection(DetectionJob):
    """Detection elsewhere (server or SSH) through a blocking client function run in a thread.

    ``run(progress, cancel_event)`` must return a :class:`~nodulenet.predict_api.PredictRun` for the one scan;
    ``progress(text)`` may be called from the thread. Cancel sets ``cancel_event``: the SSH runner stops the
    remote process and removes its work folder, the server client deletes the job.
    """

    _progress_text = Signal(str)

    def __init__(self, mode: str, scan: Path, out_dir: Path,
                 run: Callable[[Callable[[str], None], threading.Event], Any], parent: QObject | None = None) -> None:
        super().__init__(scan, out_dir, parent)
        self.mode = mode
        self._run = run
        self.cancel_event = threading.Event()
        self._call: BackgroundCall | None = None
        self._progress_text.connect(lambda text: self.progress.emit(0, 0, text))

    def start(self) -> None:
        self.running = True
        self.progress.emit(0, 0, f"Starting ({self.mode})")
        self._call = BackgroundCall(self._run, self._progress_text.emit, self.cancel_event, parent=self)
        self._call.succeeded.connect(self._done)
        self._call.failed.connect(self._failed)
        self._call.start()

    def _done(self, run: Any) -> None:
        if self._cancel_requested:
            self._end(self.cancelled)
            return
        results = list(getattr(run, "results", []))
        if not results:
            self._end(self.failed, f"{self.mode}: no result came back for {self.scan}")
            return
        result = results[0]
        if result.status in ("done", "skipped"):
            self._end(self.succeeded, Path(result.out_dir))
        else:
            self._end(self.failed, str(result.error or f"{self.scan}: detection failed ({self.mode})"))

    def _failed(self, message: str) -> None:
        self._end(self.cancelled if self._cancel_requested else self.failed, *([] if self._cancel_requested
                                                                              else [message]))

    def cancel(self) -> None:
        if not self.running or self._cancel_requested:
            return
        self._cancel_requested = True
        self.cancel_event.set()  # the client checks it while waiting and stops the remote side
        self.progress.emit(0, 0, "Cancelling ...")


# ------------------------------------------------------------------------------------------------ dialogs


class _RemoteDialog(QDialog):
    """A form asking where to run: a title, a note on top, the dialog's rows, OK / Cancel at the bottom."""

    def __init__(self, title: str, note: str, parent: QWidget | None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self._form = QFormLayout(self)
        self._form.addRow(QLabel(note))

    def _line_edit(self, text: str, placeholder: str) -> QLineEdit:
        edit = QLineEdit(text, self)
        edit.setPlaceholderText(placeholder)
        return edit

    def _add_rows(self, rows: list[tuple[str, QWidget] | QWidget]) -> None:
        """The rows (``(label, field)``, or a widget the width of the form), then the OK / Cancel buttons."""
        for row in rows:
            if isinstance(row, tuple):
                self._form.addRow(*row)
            else:
                self._form.addRow(row)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        self._form.addRow(buttons)


class ServerDialog(_RemoteDialog):
    """Asks for a NoduleNet server URL and its token (pre-filled with the remembered ones)."""

    def __init__(self, url: str = "", token: str = "", parent: QWidget | None = None) -> None:
        super().__init__("Run detection on a server",
                         "A `nodulenet serve` server runs its own model on its own hardware.", parent)
        self.url = self._line_edit(url, "http://host:8000")
        self.token = self._line_edit(token, "the server's bearer token")
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self._add_rows([("Server URL", self.url), ("Token", self.token)])

    def values(self) -> tuple[str, str]:
        return self.url.text().strip(), self.token.text().strip()


class SshDialog(_RemoteDialog):
    """Asks for an SSH target ``user@host[:port]`` and how to run nodulenet there (remembered values)."""

    def __init__(self, target: str = "", remote_python: str = "", identity: str = "",
                 accept_new_host_key: bool = False, parent: QWidget | None = None) -> None:
        super().__init__("Run detection over SSH",
                         "nodulenet must be installed on the host; the scan is uploaded, results downloaded.", parent)
        self.target = self._line_edit(target, "user@host[:port]")
        self.remote_python = self._line_edit(remote_python, "default: the `nodulenet` command on the host's PATH")
        self.identity = self._line_edit(identity, "default: SSH agent and ~/.ssh keys")
        self.accept_new = QCheckBox("Trust a host that is not in known_hosts yet (a changed key is always refused)")
        self.accept_new.setChecked(accept_new_host_key)
        self._add_rows([("Host", self.target), ("Remote Python", self.remote_python), ("Private key", self.identity),
                        self.accept_new])

    def values(self) -> dict[str, Any]:
        return {"target": self.target.text().strip(), "remote_python": self.remote_python.text().strip(),
                "identity": self.identity.text().strip(), "accept_new_host_key": self.accept_new.isChecked()}


# ------------------------------------------------------------------------------------------ remote jobs


def server_job(scan: Path, out_dir: Path, *, url: str, token: str, threshold: float,
               parent: QObject | None = None) -> ThreadDetection:
    """Detection on a ``nodulenet serve`` server through its client (:func:`nodulenet.serve.client_predict.
    run_on_server`: upload, wait, download into ``out_dir/<name>/``), with the job's state shown as progress and
    Cancel deleting the job on the server."""

    def run(progress: Callable[[str], None], cancel: threading.Event) -> Any:
        from nodulenet.predict_api import PredictOptions
        from nodulenet.serve.client import ServerAuthError, ServerClient
        from nodulenet.serve.client_predict import run_on_server

        class ViewerClient(ServerClient):
            """The server client, reporting to the viewer and stopping (deleting the job) on Cancel."""

            def submit(self, scan: Any, **kwargs: Any) -> dict[str, Any]:
                progress(f"Uploading {Path(scan).name} to {self.url}")
                return super().submit(scan, **kwargs)

            def wait(self, job_id: str, **kwargs: Any) -> dict[str, Any]:
                relay = kwargs.pop("on_progress", None)

                def seen(job: dict[str, Any]) -> None:
                    if relay is not None:
                        relay(job)
                    if cancel.is_set():
                        self.delete(job_id)
                        raise DetectionCancelled(f"cancelled: job {job_id} deleted on {self.url}")
                    where = (f"queued (position {job.get('queue_position')})" if job.get("state") == "queued"
                             else str(job.get("stage") or job.get("state")))
                    progress(f"Server: {where}, {100 * float(job.get('progress') or 0):.0f}%")

                return super().wait(job_id, on_progress=seen, **kwargs)

        try:
            with ViewerClient(url, token or None) as client:
                return run_on_server([scan], out_dir, url=url, token=token or None,
                                     options=PredictOptions(threshold=threshold), client=client)
        except ServerAuthError:
            raise NoduleNetError(f"the server at {url} refused the token: check it (Detection > Run on a "
                                 "server)") from None

    return ThreadDetection("server", scan, out_dir, run, parent)


def ssh_job(scan: Path, out_dir: Path, *, target: str, remote_python: str | None, identity: str | None,
            accept_new_host_key: bool, threshold: float, known_hosts: Path | None = None,
            parent: QObject | None = None) -> ThreadDetection:
    """Detection on an SSH host with nodulenet installed (:func:`nodulenet.remote.ssh.predict_over_ssh`)."""

    def run(progress: Callable[[str], None], cancel: threading.Event) -> Any:
        from nodulenet.predict_api import PredictOptions
        from nodulenet.remote.ssh import predict_over_ssh

        return predict_over_ssh([scan], out_dir, target=target, options=PredictOptions(threshold=threshold),
                                remote_python=remote_python, identity_file=identity,
                                accept_new_host_key=accept_new_host_key, known_hosts=known_hosts,
                                progress=progress, cancel=cancel)

    return ThreadDetection("ssh", scan, out_dir, run, parent)
