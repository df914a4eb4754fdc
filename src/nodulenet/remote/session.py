"""The remote side of one SSH run: nodulenet check, work folder, the streamed ``predict``, cleanup.

Every remote script runs under ``sh -c`` (whatever the login shell is). Transport failures become
:class:`~nodulenet.remote.connection.ConnectionLost` (naming the host and what was going on) or
:class:`~nodulenet.remote.connection.RemoteError`; the caller's cancel event becomes :class:`Cancelled`.

The remote ``nodulenet predict`` runs under a pty: when the connection drops, or the runner closes the channel
on cancel, the kernel hangs the process up (SIGHUP), so no orphan keeps a GPU busy. Its first output line is its
PID (``echo MARK $$; exec ...``), so cleanup can also TERM/KILL it explicitly before removing the work folder.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodulenet.errors import NoduleNetError
from nodulenet.predict_api import PredictOptions
from nodulenet.remote.connection import ConnectionLost, RemoteError, Target
from nodulenet.remote.progress import Reporter

PID_MARK = "__nodulenet_remote_pid__"
WORK_PREFIX = "nodulenet-remote."
COMMAND_TIMEOUT_S = 60.0
_RESULT_LINE = re.compile(r"^(done|failed|skipped) ")


class Cancelled(RemoteError):
    """The caller's cancel event was set: the transfer or the remote process was stopped."""


@dataclass
class RemoteState:
    """What exists on the remote side right now (what cleanup must undo)."""

    work: str | None = None  # the work folder (made by mktemp; removed at the end)
    pid: int | None = None  # the remote predict process
    channel: Any = None  # its pty channel while it runs
    exit_code: int | None = None
    tail: list[str] = field(default_factory=list)  # its last output lines (for error messages)


def remote_path(path: str | Path) -> str:
    """Quote a path for the remote POSIX shell; a leading ``~/`` still means the remote user's home."""
    text = str(path)
    if text == "~":
        return '"$HOME"'
    if text.startswith("~/"):
        return '"$HOME"/' + shlex.quote(text[2:])
    return shlex.quote(text)


def sh(script: str) -> str:
    """Run ``script`` with sh whatever the remote login shell is (fish or tcsh would misread it)."""
    return f"sh -c {shlex.quote(script)}"


def nodulenet_words(remote_python: str | None) -> list[str]:
    return [remote_path(remote_python), "-m", "nodulenet"] if remote_python else ["nodulenet"]


def remote_predict_command(options: PredictOptions, scans_file: str, out: str, remote_python: str | None) -> str:
    """The remote ``nodulenet predict`` call (shell words, quoted) for ``options``.

    ``options.weights`` is a path ON THE REMOTE machine; ``channels_last`` has no CLI flag and is left to the
    remote default."""
    words = [*nodulenet_words(remote_python), "predict", shlex.quote(scans_file), "-o", shlex.quote(out),
             "--threshold", repr(float(options.threshold)), "--device", shlex.quote(options.device),
             "--precision", shlex.quote(options.precision), "--label-format", shlex.quote(options.label_format)]
    if options.weights is not None:
        words += ["--weights", remote_path(options.weights)]
    if options.max_memory_gb is not None:
        words += ["--max-memory", repr(float(options.max_memory_gb))]
    if options.threads is not None:
        words += ["--threads", str(int(options.threads))]
    if options.runtime != "auto":  # only when chosen: a remote nodulenet without --runtime still runs the rest
        words += ["--runtime", shlex.quote(options.runtime)]
    if not options.dicom_outputs:
        words.append("--no-dicom")
    if options.redo:
        words.append("--redo")
    if options.series_instance_uid is not None:
        words += ["--series", shlex.quote(options.series_instance_uid)]
    return " ".join(words)


def is_work_dir(path: str) -> bool:
    """Only folders this module made are ever removed (``rm -rf`` on anything else would be a disaster)."""
    name = posixpath.basename(path)
    return path.startswith("/") and "\n" not in path and name.startswith(WORK_PREFIX) and len(name) > len(WORK_PREFIX)


class Session:
    """One SSH connection and the remote commands of one run."""

    def __init__(self, client: Any, target: Target, reporter: Reporter, cancel: threading.Event | None) -> None:
        self.client = client
        self.target = target
        self.reporter = reporter
        self.cancel = cancel
        self.phase = "connecting"  # what is going on, for error messages
        self._sftp: Any = None

    @property
    def transport(self) -> Any:
        return self.client.get_transport()

    def alive(self) -> bool:
        t = self.transport
        return t is not None and t.is_active()

    def settled_alive(self) -> bool:
        """paramiko closes the channels a moment before it marks a dead transport inactive: wait that moment."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            time.sleep(0.05)
        return self.alive()

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled while {self.phase} on {self.target}")

    def lost(self, detail: str = "") -> ConnectionLost:
        why = f" ({detail})" if detail else ""
        return ConnectionLost(f"lost the SSH connection to {self.target} while {self.phase}{why}")

    def failure(self, exc: BaseException) -> NoduleNetError:
        """A transport/SFTP exception as one line: a lost connection, or what the remote side refused."""
        if isinstance(exc, NoduleNetError):
            return exc
        if not self.settled_alive():
            return self.lost(str(exc) or type(exc).__name__)
        return RemoteError(f"{self.phase} on {self.target} failed: {exc or type(exc).__name__}")

    @property
    def sftp(self) -> Any:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def run(self, script: str, timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, str, str]:
        """A short POSIX-sh script without a pty: ``(exit code, stdout, stderr)``."""
        _stdin, stdout, stderr = self.client.exec_command(sh(script), timeout=timeout)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        return stdout.channel.recv_exit_status(), out, err

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not hide the real error
            pass
        self.client.close()

    # ------------------------------------------------------------------------------------------ steps

    def check_nodulenet(self, remote_python: str | None) -> str:
        """The remote nodulenet version; RemoteError saying how to fix a missing one."""
        self.phase = "checking the remote nodulenet"
        command = " ".join(nodulenet_words(remote_python)) + " version"
        rc, out, err = self.run(command)
        version = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if rc == 0 and re.match(r"^\d+\.\d+", version):
            return version
        said = (err.strip() or out.strip() or f"exit code {rc}").splitlines()[-1].strip()
        if remote_python:
            raise RemoteError(f"nodulenet is not installed on {self.target} for {remote_python} (`{command}` "
                              f"failed: {said}); pass --remote-python with the Python of an environment there "
                              f"that has nodulenet")
        raise RemoteError(f"nodulenet is not installed on {self.target} (`{command}` failed: {said}); "
                          f"pass --remote-python /path/to/python of an environment there that has nodulenet")

    def make_work_dir(self) -> str:
        self.phase = "creating the remote work folder"
        rc, out, err = self.run(f'mktemp -d "${{TMPDIR:-/tmp}}/{WORK_PREFIX}XXXXXXXXXX"')
        work = out.strip()
        if rc != 0 or not is_work_dir(work):
            raise RemoteError(f"cannot create a work folder on {self.target} (mktemp -d: "
                              f"{err.strip() or out.strip() or rc})")
        return work

    def stream_predict(self, state: RemoteState, command: str, n_scans: int, rewrite: Callable[[str], str]) -> int:
        """Run the remote predict under a pty, relaying its lines; its exit code (-1: killed by a signal)."""
        self.phase = "running nodulenet predict"
        channel = self.transport.open_session(timeout=COMMAND_TIMEOUT_S)
        state.channel = channel
        # TERM=dumb, NO_COLOR and a wide terminal keep rich from drawing live bars and colours or wrapping lines
        # (on a dumb terminal rich takes COLUMNS only together with LINES, else 80 columns); PYTHONUNBUFFERED
        # streams lines as they are printed.
        channel.get_pty(term="dumb", width=1000, height=50)
        channel.exec_command(sh(f"cd {shlex.quote(state.work or '/')} && echo {PID_MARK} $$ && exec env "
                                f"PYTHONUNBUFFERED=1 NO_COLOR=1 TERM=dumb COLUMNS=1000 LINES=50 {command}"))
        channel.settimeout(0.2)
        self.reporter.start_remote(n_scans)
        pending = b""

        def emit(raw: bytes) -> None:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if state.pid is None and line.startswith(PID_MARK):
                state.pid = int(line.split()[1])
            elif line.strip():
                line = rewrite(line)
                state.tail = [*state.tail[-39:], line]
                self.reporter.remote_line(line, is_result=bool(_RESULT_LINE.match(line)))

        while True:
            self.check_cancel()
            try:
                data = channel.recv(65536)
            except socket.timeout:
                if not self.alive():
                    raise self.lost() from None
                continue
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                emit(raw)
        if pending:
            emit(pending)
        while not channel.exit_status_ready():
            self.check_cancel()
            if not self.alive():
                raise self.lost()
            time.sleep(0.05)
        code = channel.recv_exit_status()
        if code == -1 and not self.settled_alive():
            raise self.lost()
        state.exit_code, state.channel = code, None
        channel.close()
        return code

    def cleanup(self, state: RemoteState) -> str | None:
        """Stop the remote predict if it may still run, remove the work folder; a problem to report, or None."""
        if state.channel is not None:
            state.channel.close()  # closing the pty hangs the remote process up (SIGHUP)
            state.channel = None
        if state.work is None:
            return None
        if not self.alive():
            return "connection lost"  # the caller reconnects once to clean up
        try:
            rc, _, err = self.run(cleanup_script(state), timeout=30)
        except Exception as exc:  # noqa: BLE001 - reported; never hides the error that brought us here
            detail = f"removing {self.target}:{state.work} failed ({exc or type(exc).__name__})"
        else:
            if rc == 0:
                self.reporter.note(f"removed the remote work folder {state.work}")
                state.work = None
                return None
            detail = f"removing {self.target}:{state.work} failed ({err.strip() or rc})"
        self.reporter.note(f"warning: {detail}")
        return detail


def cleanup_script(state: RemoteState) -> str:
    """Stop the remote predict if it may still run (TERM, up to 5 s, then KILL), then remove the work folder."""
    parts = []
    if state.pid is not None and state.exit_code is None:
        pid = int(state.pid)
        parts.append(f"kill -TERM {pid} 2>/dev/null; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 50 ]; "
                     f"do sleep 0.1; i=$((i+1)); done; kill -KILL {pid} 2>/dev/null")
    if state.work is not None and is_work_dir(state.work):
        parts.append(f"rm -rf -- {shlex.quote(state.work)}")
    return "; ".join([*parts, "true"])


def remote_error_line(state: RemoteState) -> str:
    """The remote CLI's ``error: ...`` line (exit code 2), else its last lines."""
    for line in reversed(state.tail):
        if line.lower().startswith("error:"):
            return line.split(":", 1)[1].strip()
    return " | ".join(state.tail[-3:]) or "no output"
