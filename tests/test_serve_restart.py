"""Crash and restart of the real server: ``kill -9`` of the server while a job runs; its workers die with it; after a
restart the job ends done (re-run) or failed - never stuck running - and nothing is lost: the job list, earlier
results byte for byte, the queued job. Then a clean stop (SIGTERM) puts a running job back in the queue."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from _serverproc import running_server, wait_group_gone
from nodulenet.preprocess.phantom import PhantomConfig, write_phantom
from nodulenet.serve.store import JobStore

pytestmark = pytest.mark.timeout(400)

SMALL = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                      slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0))
THRESHOLD = 0.9


def _wait_for_stage(client, job_id: str, stage: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.job(job_id)["stage"] != stage:
        assert time.monotonic() < deadline, f"job {job_id} never reached {stage!r}"
        time.sleep(0.05)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_9_during_a_job_then_restart_loses_nothing(tmp_path: Path) -> None:
    scan = write_phantom(tmp_path / "phantom", 4, SMALL)["scan"]
    data = tmp_path / "data"
    with running_server(data, workers=1) as first:
        client = first.client()
        finished = client.submit(scan, threshold=THRESHOLD)["id"]
        client.wait(finished, poll_s=0.1)
        files = {f["name"]: f["sha256"] for f in client.job(finished)["files"]}
        result_dir = data / "jobs" / finished / "result"
        interrupted = client.submit(scan, threshold=THRESHOLD)["id"]
        waiting = client.submit(scan, threshold=THRESHOLD)["id"]
        _wait_for_stage(client, interrupted, "predicting")
        first.kill()
        assert wait_group_gone(first.process.pid) == []  # the worker dies with its server (PR_SET_PDEATHSIG)
        store = JobStore(data / "jobs.sqlite3")
        assert store.get(interrupted).state == "running"  # as the crash left it
        assert store.get(waiting).state == "queued"

    with running_server(data, workers=1) as second:
        client = second.client()
        listed = client.list_jobs(limit=10)
        assert listed["total"] == 3 and {j["id"] for j in listed["jobs"]} == {finished, interrupted, waiting}
        assert client.job(interrupted)["state"] in ("queued", "running")  # re-queued at start, not stuck
        rerun = client.wait(interrupted, poll_s=0.2, timeout_s=120)
        assert rerun["state"] == "done" and rerun["attempts"] == 2
        later = client.wait(waiting, poll_s=0.2, timeout_s=120)
        assert later["state"] == "done" and later["attempts"] == 1
        # the result finished before the crash is intact, byte for byte, and served as before
        assert {p.name: _sha256(p) for p in (result_dir / "scan").iterdir()} == files
        before, after = client.job(finished), client.job(interrupted)  # same scan: the re-run gives the same result
        assert before["result"]["findings"] == after["result"]["findings"]
        same = ("candidates.csv", "labels.nii.gz")
        assert [f for f in before["files"] if f["name"] in same] == [f for f in after["files"] if f["name"] in same]
        assert "re-queued" in second.log.read_text()

        # a clean stop while a job runs: the job goes back to the queue without using up an attempt
        stopped = client.submit(scan, threshold=THRESHOLD)["id"]
        _wait_for_stage(client, stopped, "predicting")
        assert second.terminate() == 0
        assert not (data / "server.json").exists()
        assert wait_group_gone(second.process.pid) == []
    job = JobStore(data / "jobs.sqlite3").get(stopped)
    assert (job.state, job.attempts, job.stage) == ("queued", 0, "re-queued: the server was stopped")
