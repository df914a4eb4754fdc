"""Nodule type (solid / part-solid / ground-glass) against the truth: the phantom's kinds (on the generator's
masks and on the shipped demo model's masks through ``nodulenet predict``) and the LIDC-IDRI readers' texture
ratings of the real cases; plus the time ``nodulenet compare`` takes on a synthetic follow-up pair.

Run: ``.venv/bin/python benchmarks/nodule_type_calibration.py [--seeds 20] [--predict-seeds 6]``;
records benchmarks/results/nodule_type_calibration.json.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _record import record
from scipy import ndimage

from nodulenet.export.nodule_type import PHANTOM_KIND_TYPES, lidc_texture_type, nodule_composition, phantom_type_pairs
from nodulenet.io.findings import NoduleMask


def _table(pairs: list[tuple[str, str]]) -> dict:
    counts = Counter(pairs)
    agree = sum(n for (truth, got), n in counts.items() if truth == got)
    return {"agreement": round(agree / max(len(pairs), 1), 4), "n": len(pairs),
            "confusion": {f"{t} -> {g}": n for (t, g), n in sorted(counts.items())}}


def phantoms_on_truth_masks(seeds: range) -> dict:
    return _table(phantom_type_pairs(seeds))


def phantoms_on_model_masks(seeds: range, work: Path) -> dict:
    """The shipped model's findings matched to the true nodules (centre within the true radius + 3 mm)."""
    from nodulenet.export.labelmap import attach_masks_from_label_map
    from nodulenet.io.findings import read_findings_json
    from nodulenet.io.scan import read_scan
    from nodulenet.predict_api import PredictOptions, predict_scans
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom
    import json

    pairs, missed = [], 0
    options = PredictOptions(threshold=0.5, dicom_outputs=False)
    for seed in seeds:
        paths = write_phantom(work / f"ph{seed}", seed, PhantomConfig(n_nodules=5), fmt="nii.gz")
        run = predict_scans([paths["scan"]], work / f"out{seed}", options)
        folder = Path(run.results[0].out_dir)
        findings = attach_masks_from_label_map(read_findings_json(folder / "nodules.json"),
                                               read_scan(folder / "labels.nii.gz"))
        hu = read_scan(paths["scan"])
        for truth in json.loads(Path(paths["nodules"]).read_text())["nodules"]:
            near = [f for f in findings.findings if f.mask is not None and np.linalg.norm(
                np.subtract(f.center_world_xyz_mm, truth["center_world_xyz_mm"])) <= truth["diameter_mm"] / 2 + 3]
            if not near:
                missed += 1
                continue
            got = nodule_composition(near[0].mask, hu.array, hu.spacing_zyx).nodule_type
            pairs.append((PHANTOM_KIND_TYPES[truth["kind"]], got))
    return {**_table(pairs), "true_nodules_not_found_at_0.5": missed}


def lidc_readers(data_root: Path) -> dict:
    from nodulenet.io.scan import read_scan
    from nodulenet.preprocess.lidc_nodules import lidc_labels_for_series

    rows = []
    for patient in sorted(glob.glob(str(data_root / "LIDC-IDRI" / "LIDC-IDRI-*"))):
        series = [d for d in glob.glob(f"{patient}/*/*") if len(glob.glob(f"{d}/*.dcm")) > 50]
        if not series:
            continue
        volume = read_scan(series[0])
        labels = lidc_labels_for_series(series[0], volume, min_readers=1)
        for r in labels.nodules:
            texture = r.characteristics.get("texture")
            if texture is None:
                continue
            box = ndimage.find_objects(labels.instance_mask.array)[r.id - 1]
            mask = NoduleMask(labels.instance_mask.array[box] == r.id, tuple(s.start for s in box))
            c = nodule_composition(mask, volume.array, volume.spacing_zyx)
            rows.append({"patient": Path(patient).name, "nodule": r.id, "readers": r.n_readers,
                         "texture_mean": texture, "readers_type": lidc_texture_type(texture), "ours": c.nodule_type,
                         "mean_diameter_mm": c.mean_diameter_mm, "ground_glass_fraction": round(c.ground_glass_fraction, 3)})
    return {**_table([(r["readers_type"], r["ours"]) for r in rows]), "nodules": rows}


def compare_timing(work: Path) -> dict:
    from nodulenet.followup.compare_api import CompareOptions, compare_scans
    from nodulenet.followup.synthetic import write_followup_pair

    t0 = time.perf_counter()
    pair = write_followup_pair(work / "pair", 11)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = compare_scans(pair["prior"], pair["current"], work / "cmp", CompareOptions(interval_days=180))
    return {"make_pair_s": round(made, 2), "compare_s": round(time.perf_counter() - t0, 2),
            "registration_s": result.comparison["registration"]["seconds"],
            "counts": result.comparison["counts"], "exam_lung_rads": result.comparison["lung_rads"]["exam"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20, help="phantoms typed on their true masks")
    parser.add_argument("--predict-seeds", type=int, default=6, help="phantoms typed on the shipped model's masks")
    args = parser.parse_args()
    data = Path(os.environ.get("NODULENET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    figures = {"phantom_truth_masks": phantoms_on_truth_masks(range(args.seeds))}
    print("phantoms, true masks:", figures["phantom_truth_masks"])
    with tempfile.TemporaryDirectory() as tmp:
        figures["phantom_model_masks"] = phantoms_on_model_masks(range(100, 100 + args.predict_seeds), Path(tmp))
        print("phantoms, shipped model's masks:", figures["phantom_model_masks"])
        if (data / "LIDC-IDRI").is_dir():
            figures["lidc_readers_texture"] = lidc_readers(data)
            print("LIDC readers:", figures["lidc_readers_texture"])
        figures["compare_synthetic_pair"] = compare_timing(Path(tmp))
        print("compare:", figures["compare_synthetic_pair"])
    record("nodule_type_calibration", figures)


if __name__ == "__main__":
    main()
