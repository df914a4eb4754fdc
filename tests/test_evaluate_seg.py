"""Per-nodule Dice/IoU on tiny hand-made label maps; expected values computed by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nodulenet.errors import InputError
from nodulenet.evaluate.seg_metrics import evaluate_segmentation, score_case, seg_table, write_seg_outputs

SHAPE = (12, 16, 20)  # (z, y, x)


def _cube(labels: np.ndarray, label: int, z: int, y: int, x: int, size: int = 4) -> None:
    labels[z:z + size, y:y + size, x:x + size] = label


def _two_nodule_case() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint16)
    _cube(gt, 1, 2, 2, 2)      # 4^3 = 64 voxels
    _cube(pred, 7, 2, 2, 4)    # same cube shifted 2 voxels in x: overlap 4*4*2 = 32
    _cube(gt, 2, 6, 10, 12)    # no prediction touches it: missed
    _cube(pred, 9, 8, 2, 14)   # a predicted instance away from every reference nodule
    return pred, gt


def test_two_cubes_with_known_overlap() -> None:
    pred, gt = _two_nodule_case()
    scores, unmatched = score_case(pred, gt, case_id="c", voxel_volume_mm3=0.5)
    first, second = scores
    # Dice = 2 * 32 / (64 + 64) = 0.5; IoU = 32 / (64 + 64 - 32) = 1/3.
    assert (first.gt_label, first.pred_label, first.intersection_voxels) == (1, 7, 32)
    assert first.dice == pytest.approx(0.5) and first.iou == pytest.approx(1 / 3)
    assert first.gt_volume_mm3 == pytest.approx(32.0)
    assert second.missed and second.pred_label is None and second.dice == 0.0 and second.iou == 0.0
    assert unmatched == 1


def test_best_overlap_wins_and_merged_prediction_scores_each_nodule() -> None:
    gt = np.zeros(SHAPE, np.int32)
    pred = np.zeros(SHAPE, np.int32)
    _cube(gt, 1, 0, 0, 0, size=4)             # 64 voxels, x 0..3
    pred[0:4, 0:4, 0:2] = 1                   # instance 1: half the cube (32 voxels) ...
    pred[6:12, 0:16, 0:6] = 1                 # ... plus 576 voxels elsewhere: 608, Dice 2*32/672 = 0.095
    pred[0:3, 0:4, 2:4] = 2                   # instance 2: 24 voxels, all inside: Dice 48/88 = 6/11
    scores, _ = score_case(pred, gt)
    # Instance 1 overlaps more voxels (32 > 24) but instance 2 overlaps better: it is the match.
    assert scores[0].pred_label == 2 and scores[0].intersection_voxels == 24
    assert scores[0].dice == pytest.approx(6 / 11) and scores[0].iou == pytest.approx(24 / 64)

    gt2 = np.zeros(SHAPE, np.int32)
    pred2 = np.zeros(SHAPE, np.int32)
    _cube(gt2, 1, 0, 0, 0, size=2)            # 8 voxels
    _cube(gt2, 2, 0, 0, 2, size=2)            # 8 voxels next to it
    pred2[0:2, 0:2, 0:4] = 5                  # one 16-voxel instance over both
    merged, _ = score_case(pred2, gt2)
    # Each nodule: Dice 2*8/(8+16) = 2/3, IoU 8/16 = 1/2.
    assert [s.pred_label for s in merged] == [5, 5]
    assert [s.dice for s in merged] == pytest.approx([2 / 3, 2 / 3])
    assert [s.iou for s in merged] == pytest.approx([0.5, 0.5])


def _write(array: np.ndarray, path: Path, spacing=(0.7, 0.7, 1.25)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-100.0, -50.0, 20.0))
    sitk.WriteImage(image, str(path))
    return path


def test_folders_summary_both_protocols(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    pred, gt = _two_nodule_case()
    _write(gt, gt_dir / "case1.nii.gz")
    _write(pred, pred_dir / "case1.nrrd")         # matched by name without suffix
    lone = np.zeros(SHAPE, np.uint8)
    _cube(lone, 3, 1, 1, 1)
    _write(lone, gt_dir / "case2.mha")           # no prediction: its nodule is missed
    _write(pred, pred_dir / "extra.nii.gz")      # no reference: listed, ignored
    (pred_dir / "notes.txt").write_text("not an image")
    result = evaluate_segmentation(pred_dir, gt_dir)
    assert (result.n_cases, result.n_nodules, result.n_missed) == (2, 3, 2)
    assert result.cases_without_prediction == ["case2"]
    assert result.predictions_without_reference == ["extra"]
    assert result.n_unmatched_predictions == 1
    # Dice per nodule: 0.5, 0, 0. Missed as 0: mean 1/6, sd sqrt(((1/3)^2 + 2 (1/6)^2) / 3) = sqrt(2)/6.
    assert result.dice_all.mean == pytest.approx(1 / 6) and result.dice_all.sd == pytest.approx(np.sqrt(2) / 6)
    # IoU 1/3, 0, 0: mean 1/9, sd sqrt(((2/9)^2 + 2 (1/9)^2) / 3) = sqrt(2)/9.
    assert result.iou_all.mean == pytest.approx(1 / 9) and result.iou_all.sd == pytest.approx(np.sqrt(2) / 9)
    # Detected only: the single 0.5 nodule, sd 0.
    assert (result.dice_detected.n, result.dice_detected.mean, result.dice_detected.sd) == (1, 0.5, 0.0)
    assert result.iou_detected.mean == pytest.approx(1 / 3)
    # Voxel volume from the reference's spacing: 64 * 0.7 * 0.7 * 1.25 mm^3.
    assert result.nodules[0].gt_volume_mm3 == pytest.approx(64 * 0.7 * 0.7 * 1.25)

    paths = write_seg_outputs(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["missed_as_zero"]["dice"]["mean"] == pytest.approx(1 / 6)
    assert data["detected_only"]["dice"] == {"n": 1, "mean": 0.5, "sd": 0.0}
    assert len(data["nodules"]) == 3 and data["nodules"][1]["missed"] is True
    rows = paths["csv"].read_text().splitlines()
    assert rows[0].startswith("case_id,gt_label,pred_label") and rows[1].startswith("case1,1,7,64,64,32,0.500000")

    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(seg_table(result))
    text = console.export_text()
    assert "0.1667 ± 0.2357" in text and "0.5000 ± 0.0000" in text


def test_geometry_mismatch_names_both_files(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    pred, gt = _two_nodule_case()
    gt_path = _write(gt, gt_dir / "a.nii.gz")
    pred_path = _write(pred, pred_dir / "a.nii.gz", spacing=(0.7, 0.7, 2.5))
    with pytest.raises(InputError) as err:
        evaluate_segmentation(pred_dir, gt_dir)
    assert err.value.path == pred_path and str(gt_path) in str(err.value) and "spacing" in str(err.value)
    _write(pred[:, :, :10], pred_path)
    with pytest.raises(InputError, match="size"):
        evaluate_segmentation(pred_dir, gt_dir)


def test_bad_inputs(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    with pytest.raises(InputError, match="no label maps"):
        evaluate_segmentation(pred_dir, gt_dir)
    with pytest.raises(InputError, match="not a folder"):
        evaluate_segmentation(pred_dir, tmp_path / "nowhere")
    probabilities = np.full(SHAPE, 0.5, np.float32)
    bad = _write(probabilities, gt_dir / "p.nii.gz")
    with pytest.raises(InputError, match="integer labels") as err:
        evaluate_segmentation(pred_dir, gt_dir)
    assert err.value.path == bad
    bad.unlink()
    (gt_dir / "broken.nrrd").write_bytes(b"NRRD0004\nnonsense\n")
    with pytest.raises(InputError, match="cannot read"):
        evaluate_segmentation(pred_dir, gt_dir)
