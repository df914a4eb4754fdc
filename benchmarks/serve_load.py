"""Bounded load test of ``nodulenet serve``: N small phantom scans submitted by C concurrent clients.

A real server (subprocess, fresh data folder, W workers with one torch thread each) on 127.0.0.1. Each client thread
loops over its share of the scans: upload, poll until the job ends, download ``nodules.json``. Checks:

- every job completes ``done``; the job ids are unique; the server lists exactly N jobs (none lost, none duplicated);
- each result matches the scan it came from: its findings equal (ids, scores to 1e-6, centres to 1e-4 mm) those of
  LOCAL predict on that scan, computed before the load phase (so it does not compete for the CPU). The scans are
  ``--distinct`` different phantoms (seeds), repeated under different names up to N, so a mix-up between jobs of
  different scans cannot pass. A seed whose phantom local predict refuses (none since the lung-mask fix of
  2026-11-25; before it, seed 101 lost both lungs) is skipped for the next seed: the load test measures the server.

Figures: throughput (scans/min, first upload to last result), latency per scan (upload start -> job done, p50/p95/max),
the server's own time per scan (p50), the server's peak resident memory summed over its process tree (the web
process + workers, psutil every 0.2 s), the 503 retries, and the load average before/after (the build machine is
shared). Recorded in ``benchmarks/results/serve_load.json``.

    nice -n 10 .venv/bin/python benchmarks/serve_load.py [--scans 50] [--clients 10] [--workers 2] [--distinct 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _record import machine_info, record  # noqa: E402
from _serverproc import running_server  # noqa: E402

THRESHOLD = 0.9


def _phantom_config() -> Any:
    from nodulenet.preprocess.phantom import PhantomConfig

    return PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                         slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class TreeMemory(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.peak_parts: dict[str, float] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            parts: dict[str, float] = {}
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    parts[f"{p.pid}:{p.name()}"] = p.memory_info().rss / 2**20
                except psutil.Error:
                    continue
            total = sum(parts.values())
            self.samples += 1
            if total > self.peak_mib:
                self.peak_mib, self.peak_parts = total, parts
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=50, help="Different phantoms among the scans (seeds).")
    parser.add_argument("--keep", type=Path, default=None, help="Keep scans and the server's data folder here.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from nodulenet.errors import NoduleNetError
    from nodulenet.io.findings import read_findings_json
    from nodulenet.preprocess.phantom import write_phantom
    from nodulenet.serve.client import ServerBusy

    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import PredictOptions, Predictor, predict_scans

    root = args.keep or Path(tempfile.mkdtemp(prefix="nodulenet-serve-load-"))
    root.mkdir(parents=True, exist_ok=True)
    config = _phantom_config()
    t0 = time.perf_counter()
    distinct = min(args.distinct, args.scans)
    predictor = Predictor(PredictOptions(threshold=THRESHOLD, threads=1))
    originals: dict[int, Path] = {}
    reference: dict[int, Any] = {}
    skipped_seeds: dict[int, str] = {}
    seed = 100
    while len(originals) < distinct:
        scan = write_phantom(root / "phantoms" / f"seed{seed}", seed, config)["scan"]
        run = predict_scans([scan], root / "local" / f"seed{seed}", predictor=predictor,
                            shard=Shard(rank=0, world_size=1, local_rank=0))
        if run.results[0].status == "done":
            originals[seed] = scan
            reference[seed] = read_findings_json(Path(run.results[0].out_dir) / "nodules.json").findings
        else:
            skipped_seeds[seed] = str(run.results[0].error).rsplit(": ", 2)[-2]
        seed += 1
    seeds = list(originals)
    scans: list[tuple[int, Path]] = []
    for i in range(args.scans):  # repeats are copies under their own names: separate uploads, separate jobs
        seed = seeds[i % distinct]
        path = originals[seed] if i < distinct else root / "copies" / f"scan{i:03d}.nii.gz"
        if i >= distinct:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(originals[seed].read_bytes())
        scans.append((seed, path))
    print(f"{args.scans} scans ({distinct} distinct phantoms, seeds skipped: {sorted(skipped_seeds)}) written and "
          f"predicted locally in {time.perf_counter() - t0:.0f} s")
    del predictor

    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    busy_retries = 0
    lock = threading.Lock()
    with running_server(root / "server-data", workers=args.workers, args=["--queue-size", "100"]) as server:
        memory = TreeMemory(server.process.pid)
        memory.start()
        work = list(enumerate(scans))

        def client_loop(k: int) -> None:
            nonlocal busy_retries
            client = server.client(timeout=120)
            mine = work[k::args.clients]
            for index, (seed, path) in mine:
                t_start = time.perf_counter()
                try:
                    while True:
                        try:
                            job = client.submit(path, threshold=THRESHOLD)
                            break
                        except ServerBusy as busy:
                            with lock:
                                busy_retries += 1
                            time.sleep(busy.retry_after)
                    t_uploaded = time.perf_counter()
                    done = client.wait(job["id"], poll_s=0.25)
                    t_done = time.perf_counter()
                    nodules = client.fetch(job["id"], "nodules", root / "got" / f"{index:03d}.json")
                    with lock:
                        results.append({"index": index, "seed": seed, "job": job["id"], "t_start": t_start,
                                        "upload_s": t_uploaded - t_start, "latency_s": t_done - t_start,
                                        "server_s": done["seconds"], "attempts": done["attempts"],
                                        "nodules": nodules, "state": done["state"]})
                except NoduleNetError as exc:
                    with lock:
                        errors.append(f"scan {index} ({path.name}): {exc}")

        (root / "got").mkdir(exist_ok=True)
        t_load = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_load
        memory.stop()
        listed = server.client().list_jobs(limit=500)
    load_after = os.getloadavg()

    # -- checks ----------------------------------------------------------------------------------------------
    ids = [r["job"] for r in results]
    listed_ids = {j["id"] for j in listed["jobs"]}
    mismatches = []
    for r in results:
        got = read_findings_json(r["nodules"]).findings
        want = reference[r["seed"]]
        same = [f.id for f in got] == [f.id for f in want] and all(
            abs(a.score - b.score) <= 1e-6 and max(abs(x - y) for x, y in zip(a.center_world_xyz_mm,
                                                                              b.center_world_xyz_mm)) <= 1e-4
            for a, b in zip(got, want))
        if not same:
            mismatches.append(r["index"])
    distinct_results = len({tuple(round(f.score, 6) for f in reference[s]) for s in seeds})

    latencies = [r["latency_s"] for r in results]
    figures = {
        "scans": args.scans, "distinct_phantoms": distinct, "distinct_reference_results": distinct_results,
        "skipped_seeds": skipped_seeds,
        "clients": args.clients, "workers": args.workers, "torch_threads_per_worker": 1, "threshold": THRESHOLD,
        "phantom": {"shape_yx": list(config.shape_yx), "spacing_yx_mm": list(config.spacing_yx_mm),
                    "extent_z_mm": config.extent_z_mm, "slice_mm": config.slice_thickness_range_mm[0]},
        "all_done": len(results) == args.scans and all(r["state"] == "done" for r in results) and not errors,
        "errors": errors[:10],
        "job_ids_unique": len(set(ids)) == len(ids),
        "server_listed_jobs": listed["total"], "listed_equals_submitted": listed_ids == set(ids),
        "results_matching_local_predict": len(results) - len(mismatches), "mismatches": mismatches,
        "re_run_jobs": sum(r["attempts"] > 1 for r in results), "busy_503_retries": busy_retries,
        "wall_s": round(wall, 1),
        "throughput_scans_per_min": round(len(results) / wall * 60, 2),
        "latency_s": {"p50": round(_percentile(latencies, 0.5), 2), "p95": round(_percentile(latencies, 0.95), 2),
                      "max": round(max(latencies), 2), "min": round(min(latencies), 2)},
        "upload_s_p50": round(statistics.median(r["upload_s"] for r in results), 3),
        "server_predict_s_p50": round(statistics.median(r["server_s"] for r in results), 2),
        "server_peak_rss_mib": round(memory.peak_mib, 1),
        "server_peak_rss_parts_mib": {k: round(v, 1) for k, v in sorted(memory.peak_parts.items())},
        "memory_samples": memory.samples,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "niceness": os.nice(0),
    }
    for key, value in figures.items():
        print(f"{key:<34} {value}")
    record("serve_load", figures)
    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cpu_count']} cores)")
    ok = (figures["all_done"] and figures["job_ids_unique"] and figures["listed_equals_submitted"]
          and not mismatches and listed["total"] == args.scans)
    if not ok:
        raise SystemExit("load test FAILED: see the figures above")
    print("load test passed: every job done, none lost or duplicated, every result matches its scan")


if __name__ == "__main__":
    main()
