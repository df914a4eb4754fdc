"""Run the server: :func:`run_server` (what ``nodulenet serve`` does), and start-up recovery.

Start-up, in order:

1. take ``<data>/server.lock`` (``flock``): a second server on the same data folder is refused;
2. recover the store (:func:`recover`): a job left ``running`` by a server that died is ``done`` if its result was
   complete (``result/job_result.json``), else re-queued while ``attempts < max_attempts``, else ``failed`` with
   "the server stopped while this job was running"; a worker process of the dead server still alive (it should have
   died with it) is killed first; half-deleted jobs and upload folders without a job are removed;
3. bind the socket (``--port 0`` takes a free port), start the workers and wait until each has loaded the model;
4. write ``<data>/server.json`` (pid, url) and serve with uvicorn until SIGTERM/SIGINT; then stop the workers (a
   running job goes back to the queue, its attempt not counted) and remove ``server.json``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

import nodulenet
from nodulenet.errors import NoduleNetError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.serve.privacy import make_data_private, setup_log
from nodulenet.serve.settings import DISCLAIMER, ServerSettings
from nodulenet.serve.store import JobStore, utc_now
from nodulenet.serve.worker import SERVER_STOPPED, WorkerPool, process_started, read_job_result

logger = logging.getLogger("nodulenet.serve")


def acquire_lock(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` held for the life of the process (the kernel drops it on any exit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise NoduleNetError(f"{path.parent}: another nodulenet server (pid {holder}) is using this data folder; "
                             "stop it or give another --data") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def recover(settings: ServerSettings, store: JobStore) -> dict[str, str]:
    """Bring the store and the job folders back to a consistent state (step 2 of the module docstring).
    Returns ``{job id: what happened}`` for the log."""
    import psutil

    report: dict[str, str] = {}
    for job in store.running():
        if job.worker_pid and job.worker_started and process_started(job.worker_pid) == job.worker_started:
            try:  # a worker of the dead server still running: it must not write into a job we re-assign
                psutil.Process(job.worker_pid).kill()
                psutil.Process(job.worker_pid).wait(10)
            except psutil.Error:
                pass
            report[f"{job.id} worker"] = f"killed leftover worker pid {job.worker_pid}"
        payload = read_job_result(settings.jobs_dir / job.id)
        if payload is not None and store.finish(job.id, None, "done", result=payload):
            report[job.id] = "done (its result was complete)"
    actions = store.recover_running(None, max_attempts=settings.max_attempts, reason=SERVER_STOPPED)
    report.update({k: "re-queued" if v == "queued" else f"failed: {SERVER_STOPPED}" for k, v in actions.items()})
    known = store.all_ids()
    for job_id in list(known):
        job = store.get(job_id)
        if job is not None and job.state == "cancelled":  # a DELETE cut short
            shutil.rmtree(settings.jobs_dir / job_id, ignore_errors=True)
            store.delete(job_id)
            report[job_id] = "deleted (its DELETE was interrupted)"
        elif job is not None and job.state == "queued":
            shutil.rmtree(settings.jobs_dir / job_id / "work", ignore_errors=True)
    if settings.jobs_dir.is_dir():
        for folder in settings.jobs_dir.iterdir():
            if folder.name not in known:  # an upload the server died during: never became a job
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
                report[folder.name] = "removed (an interrupted upload)"
    store.clear_workers()
    return report


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise NoduleNetError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise NoduleNetError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server running there? "
                             "Choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def server_url(settings: ServerSettings, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    return f"{'https' if settings.tls else 'http'}://{host}:{port}"


def run_server(settings: ServerSettings, *, token_source: str, say: Callable[[str], None] = print,
               services: Sequence[Any] = ()) -> None:
    """Run until SIGTERM/SIGINT (see the module docstring). ``say`` prints the start-up lines for the user.

    ``services`` run beside the HTTP API (the DICOM listener, :class:`nodulenet.pacs.service.DicomService`): each
    has ``before_recover(store)``, ``start(store, say)`` (after the workers are ready) and ``stop()`` (before
    the workers stop)."""
    try:
        import fastapi
        import uvicorn

        del fastapi  # only checked here; nodulenet.serve.app imports it
    except ImportError as exc:
        raise NoduleNetError(f"nodulenet serve needs the server extra ({exc.name} is missing): "
                             "pip install 'nodulenet[server]'") from None

    from nodulenet.serve.app import create_app
    from nodulenet.serve.settings import check_bind, token_fingerprint

    check_bind(settings.host, settings.tls, settings.insecure)
    make_data_private(settings.data_dir)  # before anything is written: the log, store and results are 0600
    lock_fd = acquire_lock(settings.lock_path)
    setup_log(settings.log_path, f"server[{os.getpid()}]")
    logger.info("starting nodulenet %s server: %s", nodulenet.__version__, json.dumps(settings.to_public_dict()))
    logger.info("token %s (%s)", token_fingerprint(settings.token), token_source)
    store = JobStore(settings.db_path)
    for service in services:
        service.before_recover(store)
    recovered = recover(settings, store)
    for what, action in recovered.items():
        logger.warning("recovery: job %s: %s", what, action)
    if recovered:
        say(f"recovered after an unclean stop: {len(recovered)} job folder(s) put right (see {settings.log_path})")
    sock = bind_socket(settings.host, settings.port)
    url = server_url(settings, sock)
    pool = WorkerPool(settings, store)
    started: list[Any] = []
    try:
        if settings.workers:
            say(f"loading the model in {settings.workers} worker(s)...")
            pool.start()
        for service in services:
            service.start(store, say)
            started.append(service)
        app = create_app(settings, store=store, pool=pool)
        config = uvicorn.Config(app, host=settings.host, port=sock.getsockname()[1], log_config=None,
                                access_log=True, lifespan="off", timeout_graceful_shutdown=10,
                                ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
                                ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None)
        server = uvicorn.Server(config)
        described = pool.model_description()
        model = f"{described['model']['name']} on {settings.device}" if described else "no workers: jobs are only stored"
        write_json_atomic(settings.state_path, {"pid": os.getpid(), "url": url, "started_utc": utc_now(),
                                                "version": nodulenet.__version__, "workers": settings.workers})
        say(f"nodulenet {nodulenet.__version__} server on {url} ({settings.workers} worker(s), {model})")
        say(f"token: {token_source}; clients pass it as --token or NODULENET_TOKEN")
        say(f"data: {settings.data_dir}  log: {settings.log_path}")
        say(DISCLAIMER)
        logger.info("listening on %s", url)
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal into the handlers that were
        # there before: make those record it, so the workers are stopped below instead of the process just dying.
        stopped_by: list[int] = []
        previous = {sig: signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped_by:
            logger.info("stopping on %s", signal.Signals(stopped_by[0]).name)
    finally:
        for service in reversed(started):
            service.stop()
        pool.stop()
        sock.close()
        try:
            if json.loads(settings.state_path.read_text()).get("pid") == os.getpid():
                settings.state_path.unlink()
        except (OSError, ValueError):
            pass
        logger.info("stopped")
        os.close(lock_fd)
