"""Time from the last DICOM instance received to SEG + SR stored in the PACS, for the demo phantom, with a real Orthanc.

Push (the hospital path): a real Orthanc (tests/_orthanc.py, loopback) holds the demo phantom (seed 0, the default
``PhantomConfig``: 82 slices of 288 x 288) as a CT series and C-STOREs it (REST ``/modalities/nodulenet/store``) to
``nodulenet serve --dicom-port`` (1 worker, 1 torch thread, ``--dicom-idle-s`` I); the listener queues the job when
the series has been idle for I s, the worker predicts, SEG + SR go back to Orthanc by C-STORE (``--dest dimse``) or
STOW-RS (``--dest stow``). Per round:

- ``last_instance_to_stored_s``: the listener's "last instance received" time (recorded in the job) to the moment
  Orthanc lists both the new SEG and SR series (polled every 0.05 s; same machine, same clock);
- its parts from the server's own records: idle wait (last instance -> job queued; I s by design), queue wait
  (queued -> a worker starts), the job (start -> done: read, predict, export), and the send (done -> Orthanc has both);
- ``transfer_s``: Orthanc's C-STORE of the 82 instances (the REST call, synchronous).

Pull: ``predict --dicomweb --store-results`` in this process (model loaded once, outside the timing): QIDO + WADO
fetch, predict, STOW of SEG + SR.

Recorded in ``benchmarks/results/pacs_roundtrip.json``.

    .venv/bin/python benchmarks/pacs_roundtrip.py [--rounds 3] [--idle-s 2] [--dest dimse|stow]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _orthanc import PASSWORD, USER, free_port, running_orthanc  # noqa: E402
from _record import machine_info, record  # noqa: E402
from _serverproc import running_server  # noqa: E402


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _job(server: Any, job_id: str | None, series_uid: str, seen: set[str], timeout_s: float = 600) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in httpx.get(f"{server.url}/v1/jobs", headers=server.headers(), timeout=30).json()["jobs"]:
            if job["id"] not in seen and series_uid in job["input"]["name"] and job["state"] in ("done", "failed"):
                return job
        time.sleep(0.05)
    raise RuntimeError(f"no finished job within {timeout_s} s:\n{server.tail()}")


def push_rounds(orthanc: Any, study_uid: str, series_uid: str, rounds: int, idle_s: float, dest: str,
                workdir: Path) -> list[dict[str, float]]:
    port = free_port()
    orthanc.add_modality("nodulenet", "NODULENET", port)
    auth = workdir / "stow.credentials"
    auth.write_text(f"{USER}:{PASSWORD}\n")
    os.chmod(auth, 0o600)
    destination = (["--dicom-dest", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"] if dest == "dimse" else
                   ["--dicom-dest", orthanc.dicomweb_url, "--dicom-dest-auth", f"basic:{auth}"])
    args = ["--dicom-port", str(port), "--dicom-allow-ae", "ORTHANC", "--dicom-idle-s", str(idle_s), *destination]
    ct_id = next(s["ID"] for s in orthanc.find_series(study_uid) if s["MainDicomTags"]["Modality"] == "CT")
    out = []
    seen: set[str] = set()
    with running_server(workdir / "serve", workers=1, args=args) as server:
        for r in range(rounds):
            before = {s["ID"] for s in orthanc.find_series(study_uid)}
            t_push = time.time()
            orthanc.rest("POST", "/modalities/nodulenet/store", json={"Resources": [ct_id], "Synchronous": True})
            transfer_s = time.time() - t_push
            while True:  # Orthanc lists both results: the moment they are stored
                new = [s for s in orthanc.find_series(study_uid) if s["ID"] not in before]
                if {s["MainDicomTags"]["Modality"] for s in new if s["Instances"]} >= {"SEG", "SR"}:
                    t_stored = time.time()
                    break
                if time.time() - t_push > 600:
                    raise RuntimeError(f"SEG + SR did not arrive:\n{server.tail()}")
                time.sleep(0.05)
            job = _job(server, None, series_uid, seen)
            seen.add(job["id"])
            last = _epoch(job["options"]["dicom"]["last_received"])
            queued, started, finished = (_epoch(job["options"]["dicom"]["queued"]), _epoch(job["started"]),
                                         _epoch(job["finished"]))
            figures = {"last_instance_to_stored_s": t_stored - last, "idle_wait_s": queued - last,
                       "queue_wait_s": started - queued, "job_s": finished - started, "send_s": t_stored - finished,
                       "transfer_s": transfer_s, "n_findings": job["n_findings"]}
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
            out.append(figures)
    return out


def pull_once(orthanc: Any, study_uid: str, workdir: Path) -> dict[str, float]:
    from nodulenet.pacs.auth import parse_auth
    from nodulenet.pacs.predict_dicomweb import predict_from_dicomweb
    from nodulenet.predict_api import PredictOptions, Predictor

    auth = workdir / "pull.credentials"
    auth.write_text(f"{USER}:{PASSWORD}\n")
    os.chmod(auth, 0o600)
    options = PredictOptions(threads=1, redo=True)
    Predictor(options)  # load once outside the timing: weights and torch are then in the page cache
    t0 = time.perf_counter()
    run = predict_from_dicomweb(orthanc.dicomweb_url, study_uid, workdir / "pull", options,
                                auth=parse_auth(f"basic:{auth}"), store_results=True)
    total = time.perf_counter() - t0
    scan = run.run.results[0]
    figures = {"total_s": total, "fetch_s": run.fetch_s, "predict_s": scan.seconds, "store_s": run.store_s,
               "n_instances": run.n_instances, "n_findings": scan.n_findings}
    print("pull: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=2.0)
    parser.add_argument("--dest", choices=("dimse", "stow"), default="dimse")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pydicom

    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        work = Path(tmp)
        paths = write_phantom(work / "phantom", 0, PhantomConfig(), fmt="dicom")
        files = sorted(paths["scan"].glob("*.dcm"))
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        with running_orthanc(work) as orthanc:
            orthanc.upload(files)
            rounds = push_rounds(orthanc, str(head.StudyInstanceUID), str(head.SeriesInstanceUID), args.rounds,
                                 args.idle_s, args.dest, work)
            pull = pull_once(orthanc, str(head.StudyInstanceUID), work)
    keys = [k for k in rounds[0] if k != "n_findings"]
    summary = {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}
    print("median over rounds: " + ", ".join(f"{k} {v:.2f} s" for k, v in summary.items()))
    record(f"pacs_roundtrip_{args.dest}" if args.dest != "dimse" else "pacs_roundtrip", {
        "phantom": "demo (seed 0, default PhantomConfig)", "n_slices": len(files), "dest": args.dest,
        "idle_s": args.idle_s, "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
        "median": summary, "pull": {k: round(v, 3) for k, v in pull.items()},
        "load_average": os.getloadavg(), "cpu_count": machine_info().get("cpu_count")})


if __name__ == "__main__":
    main()
