"""Before/after figures of a fine-tuned demo model against the shipped one, in one run (issue 19's ship rule).

For each model: held-out phantom CPM on seeds 1000-1019 and 2000-2009 (the model card's sets, classic ground-glass
nodules; ``benchmarks/demo_model_quality.py``'s code path: the whole ``nodulenet predict`` path at threshold 0.05),
hits and false positives at 0.05 and at 0.5; ``nodulenet predict`` on LIDC-IDRI-0001 and -0002 (their findings at
0.5 and the score of LIDC-IDRI-0002's readers' nodule, a 2-reader ground-glass finding of LUNA16's
annotations_excluded.csv); the operating point on the calibration cases. The fine-tuned training checkpoint is first
given its operating point the way the shipped model got its own (``scripts/ship_demo_model.py``:
:func:`nodulenet.train.calibrate.calibrate_operating_point` on the same calibration cases, 0.25 false positives per
scan at 0.5), and that calibrated file is what is measured. Ship rule: CPM >= 0.95 on both sets and no more false
positives at 0.5 on the two real scans (LUNA16 rules: a finding on an annotations_excluded.csv entry is none).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_finetune_compare.py --after runs/ft/run/best.pt \
        --calibrate-cases runs/ft/data/calib_adult --lidc ../shared/data/LIDC-IDRI --luna ../shared/data/LUNA16 \
        --out runs/ft/compare
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

HELDOUT_SETS = {"1000": range(1000, 1020), "2000": range(2000, 2010)}
SHIP_MIN_CPM = 0.95
# LIDC-IDRI-0002's readers' nodule (LUNA16 annotations_excluded.csv; its 2-reader rows agree to 3 mm).
READERS_NODULE_WORLD = (61.03, 72.25, -100.75)
READERS_NODULE_DIAMETER_MM = 25.0


def calibrated_copy(checkpoint_path: Path, cases_root: Path, fp_per_scan: float, out: Path) -> tuple[Path, dict]:
    """``checkpoint_path`` with its operating point set on ``cases_root`` (as scripts/ship_demo_model.py ship)."""
    import torch

    from nodulenet.data.cases import find_case_dirs, load_cases
    from nodulenet.infer.weights import load_model
    from nodulenet.train.calibrate import apply_logit_shift, calibrate_operating_point
    from nodulenet.train.checkpoint_files import export_model

    report = load_cases(find_case_dirs([cases_root]))
    if report.problems or not report.cases:
        raise SystemExit(f"calibration cases under {cases_root}: {len(report.cases)} loaded, problems {report.problems}")
    op = calibrate_operating_point(load_model(checkpoint_path, "cpu").model, report.cases, fp_per_scan)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    apply_logit_shift(checkpoint["state_dict"], op.logit_shift)
    checkpoint["extra"]["operating_point"] = {**op.to_dict(), "calibration_cases_root": str(cases_root)}
    return export_model(checkpoint, out), op.to_dict()


def operating_point_of(weights: Path | None, cases_root: Path, fp_per_scan: float) -> dict:
    """What 0.5 means on the calibration cases for an already calibrated model (its shift would be 0 if kept)."""
    from nodulenet.data.cases import find_case_dirs, load_cases
    from nodulenet.infer.weights import load_model, shipped_weights_path
    from nodulenet.train.calibrate import calibrate_operating_point

    report = load_cases(find_case_dirs([cases_root]))
    model = load_model(weights or shipped_weights_path(), "cpu").model
    return calibrate_operating_point(model, report.cases, fp_per_scan).to_dict()


def heldout(weights: Path | None, seeds: range, out: Path) -> dict[str, Any]:
    from nodulenet.evaluate.froc import (
        compute_froc,
        read_candidates_csv,
        read_findings_csv,
        read_seriesuids_csv,
    )
    from nodulenet.heldout import evaluate_on_heldout_phantoms

    result = evaluate_on_heldout_phantoms(out, list(seeds), weights=weights, threads=1)
    candidates = read_candidates_csv(out / "candidates.csv")
    at_half = compute_froc([c for c in candidates if c.probability >= 0.5], read_findings_csv(out / "annotations.csv"),
                           [], read_seriesuids_csv(out / "seriesuids.csv"), n_bootstrap=0)
    froc = json.loads((out / "froc.json").read_text())
    return {"cpm": round(result.cpm, 4), "n_nodules": result.n_nodules, "hits_at_0.05": result.n_hits,
            "fps_at_0.05": result.n_false_positives, "hits_at_0.5": at_half.n_hits,
            "fps_at_0.5": at_half.n_false_positives, "sensitivities_at": result.sensitivities_at,
            "failed": result.failed,
            # What benchmarks/demo_model_quality.py records for the same phantoms (the model card reads it).
            "quality_record": {"weights": str(weights or "shipped demo model"), "ground_glass": "classic",
                               **result.to_dict(), "cpm_ci95": froc.get("cpm_ci"), "threads": 1, "target_cpm": 0.90}}


def lidc(weights: Path | None, lidc_root: Path, luna_root: Path, out: Path) -> dict[str, Any]:
    """``nodulenet predict`` (threshold 0.05) on the two real scans; findings at 0.5 scored with LUNA16's rules
    against its annotations.csv (hits) and annotations_excluded.csv (neither hit nor false positive)."""
    from nodulenet.evaluate.froc import (
        FrocCandidate,
        match_candidates,
        read_findings_csv,
    )
    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import PredictOptions, Predictor, predict_scans

    nodules = read_findings_csv(luna_root / "annotations.csv")
    excluded = read_findings_csv(luna_root / "annotations_excluded.csv")
    figures: dict[str, Any] = {}
    predictor = Predictor(PredictOptions(weights=weights, threshold=0.05, dicom_outputs=False, redo=True, threads=1))
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        series = next((lidc_root / patient).glob("*/*/*.xml")).parent
        uid = series.name
        run = predict_scans([series], out / patient, shard=Shard(rank=0, world_size=1, local_rank=0),
                            predictor=predictor)
        (result,) = run.results
        scores = sorted((float(f["score"]) for f in result.findings), reverse=True)
        at_half = [FrocCandidate(uid, tuple(f["center_world_xyz_mm"]), float(f["score"]))
                   for f in result.findings if float(f["score"]) >= 0.5]
        mine = [n for n in nodules if n.seriesuid == uid]
        _, counts = match_candidates(at_half, mine, [e for e in excluded if e.seriesuid == uid], [uid])
        entry: dict[str, Any] = {"findings_at_0.5": len(at_half), "hits_at_0.5": counts.n_hits,
                                 "fps_at_0.5": counts.n_false_positives,
                                 "on_excluded_at_0.5": counts.n_ignored_on_excluded, "n_nodules": len(mine),
                                 "top_scores": [round(s, 3) for s in scores[:5]], "status": result.status}
        if patient == "LIDC-IDRI-0002":
            near = [float(f["score"]) for f in result.findings
                    if math.dist(f["center_world_xyz_mm"], READERS_NODULE_WORLD) < READERS_NODULE_DIAMETER_MM / 2]
            entry["readers_nodule_score"] = round(max(near), 3) if near else None
        figures[patient] = entry
    return figures


def measure(name: str, weights: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    out = args.out / name
    figures: dict[str, Any] = {"weights": str(weights or "shipped demo model")}
    for key, seeds in HELDOUT_SETS.items():
        figures[f"heldout_{key}"] = heldout(weights, seeds, out / f"heldout_{key}")
        print(f"{name}: held-out {key}: {figures[f'heldout_{key}']}", flush=True)
    figures["lidc"] = lidc(weights, args.lidc, args.luna, out / "lidc")
    print(f"{name}: {figures['lidc']}", flush=True)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=Path, required=True, help="the fine-tuned training checkpoint (best.pt)")
    parser.add_argument("--before", type=Path, default=None, help="the model to compare with (default: shipped)")
    parser.add_argument("--calibrate-cases", type=Path, required=True)
    parser.add_argument("--fp-per-scan", type=float, default=0.25)
    parser.add_argument("--lidc", type=Path, required=True, help="LIDC-IDRI root with LIDC-IDRI-0001 and -0002")
    parser.add_argument("--luna", type=Path, required=True, help="the LUNA16 CSVs (annotations*.csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="demo_finetune_compare")
    parser.add_argument("--write-ship-records", action="store_true",
                        help="when the after model passes, also record its held-out figures as demo_model_quality"
                             "(_2000).json, the records the model card is written from")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    calibrated, op_after = calibrated_copy(args.after, args.calibrate_cases, args.fp_per_scan,
                                           args.out / "after_calibrated.pt")
    print(f"after: operating point {op_after}", flush=True)
    before = measure("before", args.before, args)
    before["operating_point"] = operating_point_of(args.before, args.calibrate_cases, args.fp_per_scan)
    after = measure("after", calibrated, args)
    after["operating_point"] = op_after
    after["checkpoint"] = str(args.after)
    fps_before = sum(v["fps_at_0.5"] for v in before["lidc"].values())
    fps_after = sum(v["fps_at_0.5"] for v in after["lidc"].values())
    passes = {
        "cpm_1000": after["heldout_1000"]["cpm"] >= SHIP_MIN_CPM,
        "cpm_2000": after["heldout_2000"]["cpm"] >= SHIP_MIN_CPM,
        "real_fps_at_0.5_not_more": fps_after <= fps_before,
    }
    verdict = {"ship": all(passes.values()), "checks": passes, "real_fps_at_0.5_before_after": [fps_before, fps_after]}
    print(json.dumps(verdict), flush=True)
    records = {(name, key): figures[f"heldout_{key}"].pop("quality_record")
               for name, figures in (("before", before), ("after", after)) for key in HELDOUT_SETS}
    record(args.name, {"before": before, "after": after, "verdict": verdict, "ship_min_cpm": SHIP_MIN_CPM,
                       "calibration_cases": str(args.calibrate_cases), "fp_per_scan": args.fp_per_scan})
    if verdict["ship"] and args.write_ship_records:
        # The card's held-out lines for the model about to ship (scripts/ship_demo_model.py ship --heldout ...).
        record("demo_model_quality", records[("after", "1000")])
        record("demo_model_quality_2000", records[("after", "2000")])


if __name__ == "__main__":
    main()
