"""Run a real ``nodulenet serve`` (uvicorn in a subprocess) for tests: :func:`running_server`.

    with running_server(tmp_path / "data", workers=1) as server:
        client = server.client()          # a ServerClient with the right token
        ...

The server listens on a free loopback port (``--port 0``; the URL is read from ``<data>/server.json``), gets the token
through ``NODULENET_TOKEN`` (not argv, where ``ps`` shows it), and runs torch with one thread. The context waits until
``/health`` says every worker has loaded the model, and ALWAYS stops the server and its workers on the way out
(SIGTERM, then SIGKILL of the whole process group), also when the test failed. ``server.kill()`` is ``kill -9`` of
the server process alone (its workers must die with it), for crash tests. Used by the server tests and the viewer's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TOKEN = "test-token-for-nodulenet-serve-0123456789"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    url: str
    token: str
    data_dir: Path
    process: subprocess.Popen
    output: Path  # the server's stdout + stderr

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    def client(self, **kwargs: Any) -> Any:
        from nodulenet.serve.client import ServerClient

        return ServerClient(self.url, self.token, **kwargs)

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def kill(self) -> None:
        """``kill -9`` of the server process only (a crash); waits until it is gone."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (a clean stop); returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def tail(self, n: int = 40) -> str:
        parts = []
        for path in (self.output, self.log):
            if path.exists():
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)


def group_processes(pgid: int) -> list[int]:
    """Pids still alive in process group ``pgid`` (the server and its workers)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return alive


def wait_group_gone(pgid: int, timeout_s: float = 15.0) -> list[int]:
    """Wait until no process of group ``pgid`` is left (the workers and multiprocessing's resource tracker exit
    shortly after the server); returns the pids still there at the timeout (empty: all gone)."""
    deadline = time.monotonic() + timeout_s
    while (alive := group_processes(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of the group (workers of a server that was killed, a server that hung)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)


@contextmanager
def running_server(data_dir: Path | None = None, *, token: str = DEFAULT_TOKEN, workers: int = 1,
                   args: Sequence[str] = (), timeout_s: float = 180.0, wait_ready: bool = True,
                   verify: Any = True) -> Iterator[ServerProcess]:
    """Start ``python -m nodulenet serve`` on 127.0.0.1 and a free port; see the module docstring.

    ``data_dir`` None: a temp folder removed afterwards. ``args``: extra CLI flags (``--max-upload-mb 5`` ...).
    ``verify``: how to check a TLS server's certificate while waiting for it (the PEM of a self-signed one).
    """
    if isinstance(verify, (str, Path)):
        import ssl

        verify = ssl.create_default_context(cafile=str(verify))
    own_dir = data_dir is None
    data = Path(tempfile.mkdtemp(prefix="nodulenet-serve-")) if own_dir else Path(data_dir)  # type: ignore[arg-type]
    data.mkdir(parents=True, exist_ok=True)
    output = data.parent / f"{data.name}.server-output-{int(time.time() * 1000)}.txt"
    env = {**os.environ, "NODULENET_TOKEN": token, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "nodulenet", "serve", "--host", "127.0.0.1", "--port", "0", "--data", str(data),
           "--workers", str(workers), "--threads", "1", *args]
    with open(output, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO_ROOT, start_new_session=True)
    server = ServerProcess(url="", token=token, data_dir=data, process=proc, output=output)
    try:
        deadline = time.monotonic() + timeout_s
        state = data / "server.json"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nodulenet serve exited with code {proc.returncode}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodulenet serve did not start within {timeout_s:.0f} s:\n{server.tail()}")
            try:
                info = json.loads(state.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("pid") == proc.pid:
                server.url = info["url"]
                try:
                    health = httpx.get(f"{server.url}/health", timeout=5, verify=verify).json()
                    if health.get("ready") or not wait_ready:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        yield server
    finally:
        _stop(proc)
        if own_dir:
            import shutil

            shutil.rmtree(data, ignore_errors=True)
        output.unlink(missing_ok=True)
