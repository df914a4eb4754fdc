"""How long preparing one real LIDC-IDRI case takes, how much memory it needs, and scans per hour.

Each case runs in a fresh (spawned) process so its peak resident memory is its own: read DICOM + XML,
resample to 1 mm, lung mask, normalise, crop, write the case folder with overlay. Then, unless
``--quick``, both cases are prepared together with ``prepare_lidc(workers=2)`` for the parallel rate.

    .venv/bin/python benchmarks/prepare_speed.py [--quick] [--data PATH]

Wall-clock figures depend on what else runs on the machine: the load average at the start is recorded,
and CPU seconds (user + system of the worker) are given beside wall seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, lidc_series  # noqa: E402
from _record import machine_info, record  # noqa: E402

PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0002")


def _one_case(series_dir: str, patient: str, out_root: str, queue: Any) -> None:
    """Child process: prepare one case and report wall/CPU seconds, peak RSS and the stage times."""
    from nodulenet.preprocess.config import PrepareConfig
    from nodulenet.preprocess.prepare_dataset import LidcCase, _prepare_one

    case = LidcCase(patient, Path(series_dir), "")
    t0, c0 = time.perf_counter(), time.process_time()
    summary = _prepare_one(case, out_root, PrepareConfig().to_dict())
    queue.put(
        {
            "status": summary["status"],
            "error": summary["error"],
            "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(time.process_time() - c0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            "stage_seconds": summary["stage_seconds"],
            "lung_volume_l": round((summary["lung_volume_ml"] or 0) / 1000.0, 3),
            "shape_zyx": summary["shape_zyx"],
            "n_nodules": summary["n_nodules"],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LIDC-IDRI-0001 only, no parallel run")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    patients = PATIENTS[:1] if args.quick else PATIENTS
    figures: dict[str, Any] = {"load_average_at_start": list(os.getloadavg()), "cases": {}}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="prepare_speed_") as tmp:
        for patient in patients:
            queue = context.Queue()
            child = context.Process(target=_one_case, args=(str(lidc_series(patient, args.data)), patient, tmp, queue))
            child.start()
            result = queue.get()
            child.join()
            if result["status"] != "done":
                raise SystemExit(f"{patient} failed: {result['error']}")
            figures["cases"][patient] = result
            print(f"{patient}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
                  f"peak {result['peak_rss_mib']:.0f} MiB, lungs {result['lung_volume_l']:.2f} L, "
                  f"stages {result['stage_seconds']}")
        walls = [c["wall_s"] for c in figures["cases"].values()]
        figures["mean_wall_s_per_case"] = round(sum(walls) / len(walls), 2)
        figures["scans_per_hour_one_worker"] = round(3600.0 / figures["mean_wall_s_per_case"], 1)
        print(f"one worker: {figures['scans_per_hour_one_worker']:.0f} scans/hour")
        if not args.quick:
            from nodulenet.preprocess.prepare_dataset import prepare_lidc

            src = Path(tmp) / "src"
            src.mkdir()
            for patient in patients:
                os.symlink(args.data / "LIDC-IDRI" / patient, src / patient)
            workers = min(len(patients), os.cpu_count() or 1)
            t0 = time.perf_counter()
            run = prepare_lidc(src, Path(tmp) / "parallel", workers=workers, show_progress=False)
            wall = time.perf_counter() - t0
            if run.count("done") != len(patients):
                raise SystemExit(f"parallel run failed: {[c.error for c in run.failed]}")
            figures["parallel"] = {"workers": workers, "cases": len(patients), "wall_s": round(wall, 2),
                                   "scans_per_hour": round(3600.0 * len(patients) / wall, 1)}
            print(f"{workers} workers: {len(patients)} scans in {wall:.1f} s = "
                  f"{figures['parallel']['scans_per_hour']:.0f} scans/hour")
    figures["cpu_count"] = machine_info()["cpu_count"]
    record("prepare_speed", figures)


if __name__ == "__main__":
    main()
