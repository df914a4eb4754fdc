"""``nodulenet benchmark lidc`` on the two real LIDC-IDRI patients: two folds by patient, a few fine-tuning steps
from the shipped demo model, full prediction of the held-out patient, per-nodule Dice/IoU against the nodules of
>= 3 and >= 4 readers. The figures are checked against a Dice computed here with numpy on the written label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from typer.testing import CliRunner

from nodulenet.cli import app
from nodulenet.infer.weights import shipped_weights_path

pytestmark = pytest.mark.slow  # ~2-3 min of CPU: two real scans prepared, trained on and predicted with masks


def _dice_by_hand(pred: Path, ref: Path) -> list[float]:
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))
    r = sitk.GetArrayFromImage(sitk.ReadImage(str(ref)))
    assert p.shape == r.shape
    out = []
    for label in sorted(set(np.unique(r)) - {0}):
        nodule = r == label
        best = 0.0
        for other in set(np.unique(p[nodule])) - {0}:
            mine = p == other
            best = max(best, 2 * float((mine & nodule).sum()) / float(mine.sum() + nodule.sum()))
        out.append(best)
    return out


def test_lidc_benchmark_scores_dice_per_nodule(lidc_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": "tiny", "init_checkpoint": str(shipped_weights_path()), "epochs": 1, "batch_size": 1,
        "optimizer": "adamw", "lr": 1.0e-6, "rcnn_start_fraction": 0.0, "mask_start_fraction": 0.0, "workers": 0,
        "threads": 1, "val_every_epochs": 0, "amp": "off",
        "crop": {"crop_size_zyx": [48, 48, 48], "positive_margin_voxels": 4, "samples_per_epoch": 2}}))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", "lidc", str(lidc_root), "-o", str(out), "--folds", "2",
                                      "--config", str(config), "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    ge3, ge4 = results["segmentation"][">= 3 readers"], results["segmentation"][">= 4 readers"]
    # LIDC-IDRI-0001's nodule (in LUNA16's annotations.csv) counts; LIDC-IDRI-0002's has 2 readers only.
    assert ge3["n_cases"] == 2 and ge3["n_nodules"] >= 1 and ge4["n_nodules"] <= ge3["n_nodules"]
    dice = [d for case in ("LIDC-IDRI-0001", "LIDC-IDRI-0002")
            for d in _dice_by_hand(out / "seg" / "predicted" / f"{case}.nii.gz",
                                   out / "seg" / "reference_ge3" / f"{case}.nii.gz")]
    assert ge3["missed_as_zero"]["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-9)
    found = [d for d in dice if d > 0]
    assert found, "the shipped model (trained with these patients' lungs) outlines LIDC-IDRI-0001's nodule"
    assert ge3["detected_only"]["dice"]["mean"] == pytest.approx(np.mean(found), abs=1e-9)
    assert "| >= 3 readers |" in (out / "results.md").read_text()
    state = json.loads((out / "benchmark_state.json").read_text())
    assert {"prepare", "fold_0.train", "fold_0.predict", "fold_1.train", "fold_1.predict", "evaluate"} <= \
        set(state["stages"])
