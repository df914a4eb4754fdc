"""Per-nodule mask quality of one or more models on held-out phantoms, side by side in one run.

For every phantom nodule (the generator's instance mask ``nodule_mask.nii.gz``), the predicted instance of
``nodulenet predict`` (threshold 0.05, the held-out path of ``benchmarks/demo_model_quality.py``) that overlaps it
best by Dice; its Dice and its volume ratio (predicted / true voxels). A nodule no prediction touches has Dice 0.
Summary per model: the held-out CPM, Dice mean and median, the median |log2 volume ratio| and the median volume
ratio of the small nodules (under 300 voxels, about 8 mm), whose volumes drive a follow-up's doubling time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/heldout_mask_quality.py --weights A.pt --weights B.pt
        [--seeds 2000-2009 1000-1019 by default] [--name heldout_mask_quality]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

SMALL_VOXELS = 300


def _scores(phantom: Path, predicted_labels: Path) -> list[dict[str, Any]]:
    """Each phantom nodule against its best-overlapping predicted instance (``nodulenet evaluate``'s matching:
    :func:`nodulenet.evaluate.seg_metrics.score_case`), with the volume ratio of the pair."""
    import SimpleITK as sitk

    from nodulenet.evaluate.seg_metrics import score_case

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "nodule_mask.nii.gz")))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted_labels)))
    if pred.shape != truth.shape:
        raise SystemExit(f"{predicted_labels}: shape {pred.shape} is not the phantom's {truth.shape}")
    scores, _ = score_case(pred, truth, case_id=phantom.name)
    return [{"phantom": s.case_id, "label": s.gt_label, "true_voxels": s.gt_voxels, "dice": round(s.dice, 4),
             "volume_ratio": None if s.missed else round(s.pred_voxels / s.gt_voxels, 4)} for s in scores]


def measure(weights: Path | None, seeds: list[int], out: Path) -> dict[str, Any]:
    from nodulenet.heldout import evaluate_on_heldout_phantoms

    result = evaluate_on_heldout_phantoms(out, seeds, weights=weights, threads=2)
    by_source = {}
    for folder in (out / "predict").iterdir():
        if (folder / "labels.nii.gz").is_file():
            by_source[Path(json.loads((folder / "nodules.json").read_text())["source"]["path"]).parent] = folder
    rows = []
    for phantom in sorted((out / "phantoms").iterdir()):
        rows += _scores(phantom, by_source[phantom] / "labels.nii.gz")
    dice = np.array([r["dice"] for r in rows])
    ratios = np.array([r["volume_ratio"] for r in rows if r["volume_ratio"]])
    small = [r["volume_ratio"] for r in rows if r["volume_ratio"] and r["true_voxels"] < SMALL_VOXELS]
    return {"cpm": round(result.cpm, 4), "n_nodules": len(rows), "dice_mean": round(float(dice.mean()), 4),
            "dice_median": round(float(np.median(dice)), 4),
            "median_abs_log2_volume_ratio": round(float(np.median(np.abs(np.log2(ratios)))), 4),
            "small_nodules": len(small), "small_volume_ratio_median": round(float(np.median(small)), 4),
            "nodules": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, action="append", default=None, help="model(s); default: shipped")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(2000, 2010)) + list(range(1000, 1020)))
    parser.add_argument("--name", default="heldout_mask_quality")
    args = parser.parse_args()
    figures: dict[str, Any] = {"seeds": args.seeds, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for m, weights in enumerate(args.weights or [None]):
            summary = measure(weights, args.seeds, Path(tmp) / f"model{m}")
            figures["models"][str(weights or "shipped demo model")] = summary
            print(weights or "shipped", {k: v for k, v in summary.items() if k != "nodules"}, flush=True)
    record(args.name, figures)


if __name__ == "__main__":
    main()
