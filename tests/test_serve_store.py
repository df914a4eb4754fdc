"""The server's SQLite job store and start-up recovery: FIFO claims that never hand one job to two workers, crash
recovery that never leaves a job "running", a bounded queue, pagination."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from nodulenet.serve.server import recover
from nodulenet.serve.settings import ServerSettings
from nodulenet.serve.store import JobStore, NewJob
from nodulenet.serve.worker import RESULT_FILE, SERVER_STOPPED


def _new(i: int) -> NewJob:
    return NewJob(id=f"{i:032x}", input_kind="nifti", input_name=f"scan{i}.nii.gz", input_bytes=100 + i,
                  scan_path=f"input/scan{i}.nii.gz", options={"threshold": 0.5})


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_claims_are_first_in_first_out_and_each_job_is_claimed_once(store: JobStore) -> None:
    for i in range(3):
        assert store.create(_new(i), queue_limit=10) is not None
    claimed = [store.claim(worker_pid=100 + k, worker_started=1.0) for k in range(4)]
    assert [j.id if j else None for j in claimed] == [f"{0:032x}", f"{1:032x}", f"{2:032x}", None]
    first = store.get(f"{0:032x}")
    assert first is not None and (first.state, first.attempts, first.worker_pid) == ("running", 1, 100)
    assert first.started is not None and first.created <= first.started


def _claim_all(path: str, results: "multiprocessing.Queue[list[str]]") -> None:
    store = JobStore(path)
    got = []
    while (job := store.claim(os.getpid(), 1.0)) is not None:
        got.append(job.id)
    results.put(got)


def test_concurrent_worker_processes_never_claim_the_same_job(store: JobStore) -> None:
    for i in range(60):
        store.create(_new(i), queue_limit=100)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(store.path), results)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    ids = [i for got in claimed for i in got]
    assert sorted(ids) == sorted(f"{i:032x}" for i in range(60))  # every job once: none lost, none twice
    assert store.counts()["running"] == 60


def test_queue_limit_counts_only_queued_jobs(store: JobStore) -> None:
    assert store.create(_new(0), queue_limit=2) is not None
    assert store.create(_new(1), queue_limit=2) is not None
    assert store.create(_new(2), queue_limit=2) is None  # full
    store.claim(1, 1.0)  # one starts running: a place frees up
    assert store.create(_new(2), queue_limit=2) is not None
    assert store.counts() == {"queued": 2, "running": 1, "done": 0, "failed": 0, "cancelled": 0}


def test_finish_only_by_the_worker_that_runs_it_and_not_after_cancel(store: JobStore) -> None:
    store.create(_new(0), 10)
    store.create(_new(1), 10)
    a = store.claim(7, 1.0)
    b = store.claim(7, 1.0)
    assert a is not None and b is not None
    assert not store.finish(a.id, 8, "done", result={"x": 1})  # another worker
    assert store.finish(a.id, 7, "done", result={"x": 1})
    assert store.get(a.id).result == {"x": 1} and store.get(a.id).progress == 1.0
    assert store.cancel(b.id).state == "running"
    assert not store.finish(b.id, 7, "done", result={"x": 2})  # cancelled meanwhile: the result is not taken
    assert not store.set_progress(b.id, 7, 0.5, "predicting")
    assert store.get(b.id).state == "cancelled"


def test_cancelled_queued_job_is_never_claimed(store: JobStore) -> None:
    store.create(_new(0), 10)
    store.cancel(f"{0:032x}")
    assert store.claim(1, 1.0) is None


def test_recovery_requeues_once_then_fails_with_the_reason(store: JobStore) -> None:
    store.create(_new(0), 10)
    job = store.claim(1, 1.0)
    assert store.recover_running(None, max_attempts=2, reason=SERVER_STOPPED) == {job.id: "queued"}
    again = store.get(job.id)
    assert (again.state, again.attempts, again.worker_pid) == ("queued", 1, None)
    assert again.stage == f"re-queued: {SERVER_STOPPED}"
    assert store.claim(2, 1.0).attempts == 2
    assert store.recover_running(None, max_attempts=2, reason=SERVER_STOPPED) == {job.id: "failed"}
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.error == f"{SERVER_STOPPED} (attempt 2 of 2)"
    assert failed.finished is not None


def test_a_stop_that_was_ours_does_not_use_up_an_attempt(store: JobStore) -> None:
    store.create(_new(0), 10)
    job = store.claim(1, 1.0)
    store.recover_running([job.id], max_attempts=1, reason="the server was stopped", count_attempt=False)
    assert (store.get(job.id).state, store.get(job.id).attempts) == ("queued", 0)


def test_list_is_newest_first_with_total_and_state_filter(store: JobStore) -> None:
    for i in range(7):
        store.create(_new(i), 100)
    store.claim(1, 1.0)  # job 0 runs
    total, page = store.list(limit=3, offset=0)
    assert total == 7 and [j.id for j in page] == [f"{i:032x}" for i in (6, 5, 4)]
    total, page = store.list(limit=3, offset=6)
    assert [j.id for j in page] == [f"{0:032x}"]
    total, page = store.list(limit=10, offset=0, state="queued")
    assert total == 6 and f"{0:032x}" not in [j.id for j in page]
    assert store.queue_position(store.get(f"{1:032x}")) == 0
    assert store.queue_position(store.get(f"{6:032x}")) == 5


def test_start_up_recovery(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path, token="x" * 20, workers=0)
    store = JobStore(settings.db_path)
    for i in range(4):
        store.create(_new(i), 10)
        (settings.jobs_dir / f"{i:032x}" / "input").mkdir(parents=True)
    finished_before_crash = store.claim(os.getpid() + 10**6, 123.0)  # pid that cannot exist: a dead worker
    interrupted = store.claim(os.getpid() + 10**6, 123.0)
    cancelled = store.claim(1, 1.0)
    store.cancel(cancelled.id)
    # the worker renamed work/ -> result/ but died before marking the job done
    result_dir = settings.jobs_dir / finished_before_crash.id / "result"
    result_dir.mkdir()
    payload = {"scan_dir": "scan", "scan_result": {"n_findings": 0}, "files": [], "predict_config": {}}
    (result_dir / RESULT_FILE).write_text(json.dumps(payload))
    (settings.jobs_dir / f"{interrupted.id}" / "work").mkdir()
    orphan = settings.jobs_dir / ("f" * 32)  # an upload cut short by the crash: no job row
    (orphan / "upload").mkdir(parents=True)

    report = recover(settings, store)

    assert store.get(finished_before_crash.id).state == "done"
    assert store.get(finished_before_crash.id).result == payload
    assert store.get(interrupted.id).state == "queued"
    assert store.get(cancelled.id) is None and not (settings.jobs_dir / cancelled.id).exists()
    assert not orphan.exists()
    assert store.get(f"{3:032x}").state == "queued"
    assert store.counts()["running"] == 0
    assert set(report) >= {finished_before_crash.id, interrupted.id, cancelled.id, orphan.name}
