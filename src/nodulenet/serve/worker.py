"""Inference worker processes of ``nodulenet serve`` and the pool that supervises them.

Each worker is a ``spawn``-ed process that loads the model once (:class:`~nodulenet.predict_api.Predictor`) and
then loops: claim the oldest queued job from the store, run exactly the local ``predict`` code
(:func:`~nodulenet.predict_api.predict_scans`) on the job's scan into ``<job>/work/``, write
``work/job_result.json`` (the scan result, the files with their sizes and SHA-256, the run's config), rename
``work/`` to ``result/`` (atomic), then mark the job done. A failure is recorded with its one-line error (the
traceback goes to the log). Progress is written per stage: reading (0.05), predicting (0.15), exporting (0.8).

The pool (in the web process) starts the workers and a supervisor thread that notices a worker that died
(out of memory, killed): its job is re-queued while ``attempts < max_attempts``, else failed with the reason, and a
new worker takes its slot. ``DELETE`` of a running job kills the worker running it (there is no safe way to stop
a prediction half-way) and the supervisor starts a new one. Workers die with the web process: ``PR_SET_PDEATHSIG``
(Linux) kills them if it is killed, and they also exit when they see their parent gone.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from nodulenet.errors import NoduleNetError
from nodulenet.infer.weights import file_sha256
from nodulenet.serve.privacy import setup_log
from nodulenet.serve.store import Job, JobStore

logger = logging.getLogger("nodulenet.serve")

RESULT_FILE = "job_result.json"
SERVER_STOPPED = "the server stopped while this job was running"
WORKER_DIED = "the worker process running this job stopped unexpectedly"


def process_started(pid: int) -> float | None:
    """A process's start time (seconds since the epoch), None if there is no such process."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (the server was killed)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def read_job_result(job_dir: Path) -> dict[str, Any] | None:
    """``result/job_result.json`` of a finished job, or None when the job has no complete result."""
    path = job_dir / "result" / RESULT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- the worker


def _staged_predictor_class() -> Any:
    from nodulenet.predict_api import Predictor

    class StagedPredictor(Predictor):
        """The local predictor, reporting when the network starts and when the export starts."""

        on_stage: Callable[[float, str], None] | None = None

        def predict_volume(self, ct: Any) -> Any:
            if self.on_stage is not None:
                self.on_stage(0.15, "predicting")
            out = super().predict_volume(ct)
            if self.on_stage is not None:
                self.on_stage(0.8, "exporting")
            return out

    return StagedPredictor


def worker_main(settings: dict[str, Any], slot: int) -> None:
    """Entry point of one worker process (``settings`` = :meth:`ServerSettings.to_public_dict`)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see commands/predict.py)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the server's to handle
    data_dir = Path(settings["data_dir"])
    pid = os.getpid()
    parent = os.getppid()
    setup_log(data_dir / "server.log", f"worker-{slot}[{pid}]")
    store = JobStore(data_dir / "jobs.sqlite3")
    store.worker_state(pid, slot, "loading")
    try:
        from nodulenet.predict_api import PredictOptions

        weights = settings.get("weights")
        base = PredictOptions(weights=Path(weights) if weights else None, device=settings["device"],
                              threshold=settings["threshold"], threads=settings["worker_threads"], redo=True)
        predictor = _staged_predictor_class()(base)
    except NoduleNetError as exc:
        logger.error("cannot load the model: %s", exc)
        store.worker_state(pid, slot, "failed", error=str(exc))
        sys.exit(3)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which stops with this message
        logger.error("cannot load the model:\n%s", traceback.format_exc())
        store.worker_state(pid, slot, "failed", error=f"{type(exc).__name__}: {exc}")
        sys.exit(3)
    store.worker_state(pid, slot, "ready", model=predictor.describe())
    logger.info("ready: %s on %s, %d thread(s)", predictor.model_info.name, base.device, settings["worker_threads"])
    started = process_started(pid) or time.time()
    jobs_dir = data_dir / "jobs"
    while True:
        if os.getppid() != parent:
            logger.info("the server is gone; stopping")
            return
        job = store.claim(pid, started)
        if job is None:
            time.sleep(float(settings.get("poll_s", 0.25)))
            continue
        run_job(job, jobs_dir / job.id, predictor, base, store, pid)


def run_job(job: Job, job_dir: Path, predictor: Any, base: Any, store: JobStore, pid: int) -> None:
    """Predict one claimed job (see the module docstring); never raises."""
    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import predict_scans

    t0 = time.perf_counter()
    work, result = job_dir / "work", job_dir / "result"
    logger.info("job %s: start (attempt %d, %s %s)", job.id, job.attempts, job.input_kind, job.input_name)

    def stage(progress: float, text: str) -> None:
        store.set_progress(job.id, pid, progress, text)

    scan = (job_dir / job.scan_path).resolve()

    def fail(error: str) -> None:
        # The client knows its scan by the name it uploaded, not by the server's folders.
        error = error.replace(str(scan), job.input_name).replace(str(job_dir.resolve()), f"job {job.id}")
        shutil.rmtree(work, ignore_errors=True)
        store.finish(job.id, pid, "failed", error=error)
        logger.info("job %s: failed after %.1f s: %s", job.id, time.perf_counter() - t0, error)

    try:
        shutil.rmtree(work, ignore_errors=True)  # a previous, interrupted attempt
        shutil.rmtree(result, ignore_errors=True)
        inputs = (job_dir / "input").resolve()
        if scan != inputs and inputs not in scan.parents:  # defence in depth: the store is ours, but be sure
            fail(f"scan path {job.scan_path!r} is outside the job's input folder")
            return
        opts = job.options
        predictor.options = replace(base, threshold=float(opts.get("threshold", base.threshold)),
                                    label_format=str(opts.get("label_format", base.label_format)),
                                    dicom_outputs=bool(opts.get("dicom_outputs", True)))
        predictor.on_stage = stage
        stage(0.05, "reading the scan")
        run = predict_scans([scan], work, predictor=predictor, shard=Shard(rank=0, world_size=1, local_rank=0))
        scan_result = run.results[0]
        if scan_result.status != "done":
            if scan_result.traceback:
                logger.error("job %s: %s", job.id, scan_result.traceback)
            fail(scan_result.error or f"prediction ended with status {scan_result.status}")
            return
        payload = _result_payload(scan_result, work, job_dir)
        (work / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(work, result)  # atomic: result/ is complete or absent
        if store.finish(job.id, pid, "done", result=payload):
            logger.info("job %s: done in %.1f s, %d finding(s)", job.id, time.perf_counter() - t0,
                        scan_result.n_findings)
        else:  # cancelled meanwhile
            shutil.rmtree(result, ignore_errors=True)
    except NoduleNetError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad job must not take the worker down; the log keeps the trace
        logger.error("job %s: internal error\n%s", job.id, traceback.format_exc())
        fail(f"internal error: {type(exc).__name__}: {exc}")
    finally:
        predictor.on_stage = None


def _result_payload(scan_result: Any, work: Path, job_dir: Path) -> dict[str, Any]:
    """``job_result.json``: the scan's result (paths relative to ``result/``), its files and the run config."""
    scan_dir = Path(scan_result.out_dir)
    kinds = {Path(p).name: kind for kind, p in scan_result.details.get("files", {}).items()}
    files = [{"name": p.name, "kind": kinds.get(p.name, "other"), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(scan_dir.iterdir()) if p.is_file()]
    d = scan_result.to_dict()
    d["scan"] = os.path.relpath(d["scan"], job_dir)
    d["out_dir"] = scan_dir.name
    d["details"]["files"] = {kind: Path(p).name for kind, p in d["details"].get("files", {}).items()}
    config = json.loads((work / "predict_config.json").read_text(encoding="utf-8"))
    return {"scan_dir": scan_dir.name, "scan_result": d, "files": files, "predict_config": config}


# ------------------------------------------------------------------------------------------------ the pool


class WorkerPool:
    """N worker processes and the supervisor thread that keeps them running (see the module docstring)."""

    def __init__(self, settings: Any, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}  # slot -> Process
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._killed_for_cancel: set[int] = set()
        self._failed_slots: dict[int, str] = {}  # slot -> why it is not restarted
        self._model: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._args = {**settings.to_public_dict(), "worker_threads": settings.worker_threads()}

    @property
    def size(self) -> int:
        return int(self.settings.workers)

    def start(self, timeout_s: float = 600.0) -> None:
        """Start the workers and wait until each has loaded the model; :class:`NoduleNetError` with the worker's
        message if one cannot (bad --weights, no CUDA)."""
        self.store.clear_workers()
        self._thread = threading.Thread(target=self._supervise, name="nodulenet-worker-supervisor", daemon=True)
        self._thread.start()
        self._started.wait(30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.store.workers()
            failed = [w for w in states if w["state"] == "failed"]
            if failed:
                self.stop()
                raise NoduleNetError(f"worker could not start: {failed[0]['error']}")
            if sum(w["state"] == "ready" for w in states) >= self.size:
                return
            with self._lock:
                broken = list(self._failed_slots.values())
            if broken:
                self.stop()
                raise NoduleNetError(f"worker could not start: {broken[0]}; see {self.settings.log_path}")
            time.sleep(0.1)
        self.stop()
        raise NoduleNetError(f"workers did not load the model within {timeout_s:.0f} s; see {self.settings.log_path}")

    def ready_count(self) -> int:
        return sum(w["state"] == "ready" for w in self.store.workers())

    def model_description(self) -> dict[str, Any] | None:
        """What the workers run (every worker loads the same model); kept while one is being replaced."""
        if self._model is None:
            for w in self.store.workers():
                if w["state"] == "ready" and w["model"]:
                    self._model = w["model"]
                    break
        return self._model

    def _spawn(self, slot: int) -> None:
        # daemon: multiprocessing kills them if the server exits without stop() (never left running)
        proc = self._ctx.Process(target=worker_main, args=(self._args, slot), name=f"nodulenet-worker-{slot}",
                                 daemon=True)
        proc.start()
        self._procs[slot] = proc
        logger.info("worker %d started (pid %d)", slot, proc.pid)

    def _supervise(self) -> None:
        # Workers are started from this thread: PR_SET_PDEATHSIG fires when the starting THREAD ends, and this
        # one lives as long as the pool.
        with self._lock:
            for slot in range(self.size):
                self._spawn(slot)
        self._started.set()
        while not self._stopping.wait(0.5):
            with self._lock:
                for slot, proc in list(self._procs.items()):
                    if proc.is_alive() or self._stopping.is_set():
                        continue
                    self._handle_death(slot, proc)

    def _handle_death(self, slot: int, proc: Any) -> None:
        pid, code = proc.pid, proc.exitcode
        ours = pid in self._killed_for_cancel
        self._killed_for_cancel.discard(pid)
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        jobs = [j.id for j in self.store.running_of(pid)]
        if jobs:
            actions = self.store.recover_running(jobs, max_attempts=self.settings.max_attempts,
                                                 reason=f"{WORKER_DIED} ({how})", count_attempt=not ours)
            for job_id, action in actions.items():
                logger.warning("job %s: worker %d (pid %d) stopped (%s); job %s", job_id, slot, pid, how, action)
        elif not ours:
            logger.warning("worker %d (pid %d) stopped (%s)", slot, pid, how)
        state = next((w for w in self.store.workers() if w["pid"] == pid), None)
        self.store.forget_worker(pid)
        if not ours and (state is None or state["state"] != "ready"):
            # It died loading the model: starting it again would fail the same way, in a loop.
            why = (state or {}).get("error") or f"worker process {pid} stopped while loading the model ({how})"
            logger.error("worker %d is not restarted: %s", slot, why)
            self._failed_slots[slot] = why
            del self._procs[slot]
            return
        self._spawn(slot)

    def stop_job(self, worker_pid: int | None) -> None:
        """Kill the worker ``worker_pid`` (it is running a job that was just cancelled); the supervisor starts a
        new one in its slot. Returns once the process is gone."""
        if worker_pid is None:
            return
        with self._lock:
            proc = next((p for p in self._procs.values() if p.pid == worker_pid), None)
            if proc is None or not proc.is_alive():
                return
            self._killed_for_cancel.add(worker_pid)
            proc.kill()
            proc.join(30)
            self.store.forget_worker(worker_pid)  # not "ready" any more, even before the supervisor notices
        logger.info("worker pid %d killed to stop a cancelled job", worker_pid)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every worker; a job that was running is re-queued (without counting the attempt)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        with self._lock:
            procs = list(self._procs.values())
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            deadline = time.monotonic() + grace_s
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            pids = [p.pid for p in procs]
            self._procs.clear()
        jobs = [j.id for pid in pids for j in self.store.running_of(pid)]
        if jobs:
            actions = self.store.recover_running(jobs, max_attempts=self.settings.max_attempts,
                                                 reason="the server was stopped", count_attempt=False)
            logger.info("server stopping: re-queued %s", ", ".join(actions))
        self.store.clear_workers()
