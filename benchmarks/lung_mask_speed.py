"""The lung mask on the real LIDC scans: the coarse first pass (the default) against the single full-resolution
pass (``lung.coarse_grid_mm = 0``, the mask before it), interleaved in one process.

Each scan is read and put on the prepared 1 mm grid once (``canonical_hu``, as ``predict`` and ``prepare`` do);
then the two masks run alternately (single, coarse, single, coarse, ...) ``--repeats`` times each, so both see
the same machine load. Recorded per scan: median wall and CPU seconds of each, their ratio, the stage times of
the last run of each, the peak memory each allocates (an untimed run under tracemalloc), and the Dice per lung
label of the coarse mask against the single pass.

    .venv/bin/python benchmarks/lung_mask_speed.py [--repeats 3] [--phantoms 20] [--data PATH] [--name NAME]

``--phantoms N`` also runs both masks once each on the phantoms of seeds 2000.. (the acceptance set of
tests/test_preprocess_lung_mask_coarse.py) and records their Dice per lung and CPU seconds.

The load average at the start and end is recorded: the figures that travel between machines are the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, lidc_series  # noqa: E402
from _record import peak_rss_mib, record  # noqa: E402

PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0002")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def _timed(fn: Any) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - t0, time.process_time() - c0, value


def _peak_traced_mib(fn: Any) -> float:
    """Peak memory that ``fn`` allocates above what is live when it starts (numpy reports its arrays to
    tracemalloc), in an untimed run of its own: tracing slows the Python parts."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return round((peak - base) / 2**20, 1)


def _one_scan(series_dir: Path, repeats: int) -> dict[str, Any]:
    from nodulenet.io.dicom import read_dicom_series
    from nodulenet.preprocess.config import LungMaskConfig, PrepareConfig
    from nodulenet.preprocess.lung_mask import segment_lungs
    from nodulenet.preprocess.prepare import canonical_hu

    ct = canonical_hu(read_dicom_series(series_dir), PrepareConfig())[0]
    variants = {"single_pass": LungMaskConfig(coarse_grid_mm=0.0), "coarse_first": LungMaskConfig(coarse_grid_mm=2.0)}
    runs: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in variants}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, config in variants.items():
            wall, cpu, result = _timed(lambda: segment_lungs(ct, config))  # noqa: B023 (called at once)
            runs[name]["wall_s"].append(round(wall, 3))
            runs[name]["cpu_s"].append(round(cpu, 3))
            last[name] = result
    single, coarse = last["single_pass"], last["coarse_first"]
    figures: dict[str, Any] = {"shape_zyx": list(ct.shape_zyx)}
    for name, config in variants.items():
        figures[name] = {
            **runs[name],
            "median_wall_s": round(statistics.median(runs[name]["wall_s"]), 3),
            "median_cpu_s": round(statistics.median(runs[name]["cpu_s"]), 3),
            "stage_seconds_last_run": last[name].stage_seconds,
            "peak_traced_mib": _peak_traced_mib(lambda: segment_lungs(ct, config)),  # noqa: B023 (called at once)
        }
    for key in ("median_wall_s", "median_cpu_s"):
        figures[f"speedup_{key[7:]}"] = round(figures["single_pass"][key] / figures["coarse_first"][key], 2)
    figures["dice_per_lung"] = [round(_dice(coarse.lungs == k, single.lungs == k), 5)
                                for k in range(1, single.n_lungs + 1)]
    figures["dice_kept"] = round(_dice(coarse.kept, single.kept), 5)
    figures["n_lungs"] = [single.n_lungs, coarse.n_lungs]
    figures["separation_erosion_mm"] = [single.separation_erosion_mm, coarse.separation_erosion_mm]
    return figures


def _phantoms(n: int) -> dict[str, Any]:
    from nodulenet.preprocess.config import LungMaskConfig, PrepareConfig
    from nodulenet.preprocess.lung_mask import segment_lungs
    from nodulenet.preprocess.phantom import PhantomConfig, make_phantom
    from nodulenet.preprocess.prepare import canonical_hu

    per_seed: dict[str, Any] = {}
    cpu = {"single_pass": 0.0, "coarse_first": 0.0}
    for seed in range(2000, 2000 + n):
        ct = canonical_hu(make_phantom(seed, PhantomConfig()).image, PrepareConfig())[0]
        results = {}
        for name, config in (("single_pass", LungMaskConfig(coarse_grid_mm=0.0)), ("coarse_first", LungMaskConfig(coarse_grid_mm=2.0))):
            _, seconds, results[name] = _timed(lambda: segment_lungs(ct, config))  # noqa: B023 (called at once)
            cpu[name] += seconds
        single, coarse = results["single_pass"], results["coarse_first"]
        per_seed[str(seed)] = {
            "dice_per_lung": [round(_dice(coarse.lungs == k, single.lungs == k), 5)
                              for k in range(1, single.n_lungs + 1)],
            "dice_kept": round(_dice(coarse.kept, single.kept), 5),
            "separation_erosion_mm": [single.separation_erosion_mm, coarse.separation_erosion_mm],
        }
    worst = min(min(v["dice_per_lung"]) for v in per_seed.values())
    return {"seeds": per_seed, "min_dice_per_lung": worst, "total_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "speedup_cpu_s": round(cpu["single_pass"] / cpu["coarse_first"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--phantoms", type=int, default=0, help="also compare on this many phantoms (seeds 2000..)")
    parser.add_argument("--name", default="lung_mask_speed", help="name of the JSON record")
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "repeats": args.repeats,
        "cases": {},
    }
    for patient in PATIENTS:
        case = _one_scan(lidc_series(patient, args.data), args.repeats)
        figures["cases"][patient] = case
        print(f"{patient}: single pass {case['single_pass']['median_wall_s']:.2f} s wall "
              f"({case['single_pass']['median_cpu_s']:.2f} s CPU), coarse first "
              f"{case['coarse_first']['median_wall_s']:.2f} s ({case['coarse_first']['median_cpu_s']:.2f} s CPU): "
              f"x{case['speedup_wall_s']} wall, x{case['speedup_cpu_s']} CPU; Dice per lung {case['dice_per_lung']}, "
              f"kept {case['dice_kept']}; peak allocated {case['single_pass']['peak_traced_mib']:.0f} -> "
              f"{case['coarse_first']['peak_traced_mib']:.0f} MiB")
        print(f"  stages single {case['single_pass']['stage_seconds_last_run']}")
        print(f"  stages coarse {case['coarse_first']['stage_seconds_last_run']}")
    if args.phantoms:
        figures["phantoms"] = _phantoms(args.phantoms)
        print(f"{args.phantoms} phantoms: min Dice per lung {figures['phantoms']['min_dice_per_lung']}, CPU "
              f"{figures['phantoms']['total_cpu_s']} (x{figures['phantoms']['speedup_cpu_s']})")
    figures["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    record(args.name, figures)


if __name__ == "__main__":
    main()
