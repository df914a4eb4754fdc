"""How close ``nodulenet compare``'s volume doubling time comes to the truth, over several synthetic follow-up pairs.

Each pair (:func:`nodulenet.followup.synthetic.write_followup_pair`, one seed each) has one nodule that grows by a
known partial-volume volume between the scans, one stable, one gone and one new, and a known rigid move. ``compare``
runs the whole chain on both scans (detection and masks by the model, registration, matching, volumes, VDT); the
error of the grown nodule's VDT against the generator's is what a reader gets from the model's segmentation, so it
is a figure of the MODEL (one pair is one sample of it, not a bound). Several models (``--weights``, default the
shipped one) are measured on the same pairs in one run. Pairs where the model does not match the grown nodule
across the scans count as "not matched".

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/followup_vdt_accuracy.py [--seeds 11 12 ...]
        [--weights A.pt --weights B.pt] [--name followup_vdt_accuracy]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

INTERVAL_DAYS = 180.0


def measure_pair(pair: dict[str, Path], weights: str | None, out: Path) -> dict[str, Any]:
    from nodulenet.followup.synthetic import FollowupTruth

    truth = FollowupTruth(**json.loads(pair["truth"].read_text()))
    true_vdt = INTERVAL_DAYS * math.log(2) / math.log(truth.current["grown"]["volume_mm3"]
                                                       / truth.prior["grown"]["volume_mm3"])
    command = [sys.executable, "-m", "nodulenet", "compare", str(pair["prior"]), str(pair["current"]), "-o", str(out),
               "--interval-days", str(INTERVAL_DAYS)] + (["--weights", weights] if weights else [])
    res = subprocess.run(command, capture_output=True, text=True)
    if res.returncode != 0:
        return {"true_vdt_days": true_vdt, "error": res.stderr.strip().splitlines()[-1:]}
    comparison = json.loads((out / "comparison.json").read_text())
    persistent = [n for n in comparison["nodules"] if n["status"] == "persistent"]
    grown_centre = np.asarray(truth.current["grown"]["center_world_xyz_mm"])
    grown = min(persistent, default=None,
                key=lambda n: float(np.linalg.norm(np.asarray(n["current"]["center_world_xyz_mm"]) - grown_centre)))
    matched = grown is not None and float(np.linalg.norm(
        np.asarray(grown["current"]["center_world_xyz_mm"]) - grown_centre)) < 3.0
    vdt = grown.get("volume_doubling_time_days") if matched else None
    return {"true_vdt_days": round(true_vdt, 1), "measured_vdt_days": vdt,
            "relative_error": None if vdt is None else round(vdt / true_vdt - 1, 3),
            "prior_volume_mm3": grown["prior"].get("volume_mm3") if matched else None,
            "current_volume_mm3": grown["current"].get("volume_mm3") if matched else None,
            "true_prior_volume_mm3": round(truth.prior["grown"]["volume_mm3"], 1),
            "true_current_volume_mm3": round(truth.current["grown"]["volume_mm3"], 1),
            "statuses": {s: sum(n["status"] == s for n in comparison["nodules"])
                         for s in ("persistent", "new", "resolved")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(11, 19)))
    parser.add_argument("--weights", action="append", default=None, help="model(s); default: the shipped one")
    parser.add_argument("--name", default="followup_vdt_accuracy")
    args = parser.parse_args()
    from nodulenet.followup.synthetic import write_followup_pair

    models = args.weights or [None]
    start = time.perf_counter()
    figures: dict[str, Any] = {"seeds": args.seeds, "interval_days": INTERVAL_DAYS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = {seed: write_followup_pair(root / f"pair-{seed}", seed, interval_days=INTERVAL_DAYS)
                 for seed in args.seeds}
        for m, weights in enumerate(models):
            rows = {}
            for seed, pair in pairs.items():
                rows[str(seed)] = measure_pair(pair, weights, root / f"model{m}-{seed}")
                print(f"{weights or 'shipped'} seed {seed}: {rows[str(seed)]}", flush=True)
            errors = [abs(r["relative_error"]) for r in rows.values() if r.get("relative_error") is not None]
            figures["models"][weights or "shipped demo model"] = {
                "pairs": rows, "n_matched": len(errors), "n_pairs": len(rows),
                "median_abs_relative_error": round(float(np.median(errors)), 3) if errors else None,
                "max_abs_relative_error": round(max(errors), 3) if errors else None,
                "within_15_percent": sum(e <= 0.15 for e in errors), "within_25_percent": sum(e <= 0.25 for e in errors)}
    figures["seconds"] = round(time.perf_counter() - start, 1)
    for name, summary in figures["models"].items():
        print(name, {k: v for k, v in summary.items() if k != "pairs"})
    record(args.name, figures)


if __name__ == "__main__":
    main()
