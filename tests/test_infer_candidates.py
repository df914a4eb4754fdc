"""Candidates-only prediction (``predict --candidates-only``), flip TTA and ensembles merged by WBF or NMS."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nodulenet.cli import app
from nodulenet.infer.candidates import (
    merge_passes,
    nms_merge,
    tta_flips,
    unflip_boxes,
    weighted_box_fusion,
)
from nodulenet.infer.weights import shipped_weights_path

PASS_A = (np.array([[0, 0, 0, 10, 10, 10]], float), np.array([0.9]))
PASS_B = (np.array([[1, 1, 1, 11, 11, 11], [50, 50, 50, 60, 60, 60]], float), np.array([0.6, 0.8]))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_unflip_maps_a_box_back_and_is_its_own_inverse() -> None:
    box = np.array([[2.0, 3.0, 4.0, 5.0, 6.5, 7.0]])
    shape = (10, 20, 30)
    assert unflip_boxes(box, (0,), shape).tolist() == [[5.0, 3.0, 4.0, 8.0, 6.5, 7.0]]
    assert unflip_boxes(box, (1, 2), shape).tolist() == [[2.0, 13.5, 23.0, 5.0, 17.0, 26.0]]
    for axes in tta_flips("flips8"):
        assert np.array_equal(unflip_boxes(unflip_boxes(box, axes, shape), axes, shape), box)
    # The flipped image's voxel i is the original's voxel S-1-i: a box around voxel 2 comes back around voxel 7.
    image = np.zeros(shape)
    image[2, 5, 9] = 1
    flipped = np.flip(image, axis=(0, 2))
    z, y, x = np.argwhere(flipped)[0]
    back = unflip_boxes(np.array([[z, y, x, z + 1, y + 1, x + 1]], float), (0, 2), shape)[0]
    assert back.tolist() == [2, 5, 9, 3, 6, 10]


def test_weighted_box_fusion_golden_values() -> None:
    boxes, scores = weighted_box_fusion([PASS_A, PASS_B], iou=0.1)
    # Boxes A0 and B0 overlap (IoU 729/1271 = 0.57): fused by score weights (0.9, 0.6); mean score 0.75 x 2/2.
    # B1 alone: 0.8 x 1/2 passes.
    assert scores.tolist() == pytest.approx([0.75, 0.4])
    assert boxes[0].tolist() == pytest.approx([0.4, 0.4, 0.4, 10.4, 10.4, 10.4])
    assert boxes[1].tolist() == [50, 50, 50, 60, 60, 60]
    # Above their IoU nothing fuses: three candidates, each with its score halved.
    _, scores = weighted_box_fusion([PASS_A, PASS_B], iou=0.6)
    assert scores.tolist() == pytest.approx([0.45, 0.4, 0.3])


def test_nms_merge_keeps_the_best_box_of_each_place() -> None:
    boxes, scores = nms_merge([PASS_A, PASS_B], iou=0.1)
    assert scores.tolist() == pytest.approx([0.9, 0.8])
    assert boxes.tolist() == [[0, 0, 0, 10, 10, 10], [50, 50, 50, 60, 60, 60]]
    assert merge_passes([PASS_B], "nms")[1].tolist() == [0.6, 0.8]  # one pass: as it is


@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodulenet.data.synthetic import SMALL_PHANTOM
    from nodulenet.preprocess.phantom import write_phantom

    folder = tmp_path_factory.mktemp("cand_phantom")
    return Path(write_phantom(folder, 2004, replace(SMALL_PHANTOM, n_nodules=4), fmt="nii.gz")["scan"])


def _predict(scan: Path, out: Path, *args: str) -> object:
    result = CliRunner().invoke(app, ["predict", str(scan), "-o", str(out), "--threads", "1", *args])
    assert result.exit_code == 0, result.output
    return result


def test_candidates_only_keeps_every_detection_of_the_full_prediction(phantom_scan: Path, tmp_path: Path) -> None:
    _predict(phantom_scan, tmp_path / "full", "--threshold", "0.0", "--no-dicom")
    _predict(phantom_scan, tmp_path / "cand", "--candidates-only")
    name = "scan"
    full_scores = sorted(f["score"] for f in json.loads((tmp_path / "full" / name / "nodules.json").read_text())
                         ["findings"])
    cand_dir = tmp_path / "cand" / name
    assert sorted(p.name for p in cand_dir.iterdir()) == ["candidates.csv", "candidates.json"]  # no masks, no maps
    rows = [line.split(",") for line in (cand_dir / "candidates.csv").read_text().splitlines()[1:]]
    cand_scores = sorted(float(r[4]) for r in rows)
    # Mask-IoU NMS only removes detections: every finding of the full run (threshold 0) is a candidate, same score.
    assert len(cand_scores) >= len(full_scores) > 0
    for s in full_scores:
        assert min(abs(s - c) for c in cand_scores) < 1e-4
    truth = json.loads((phantom_scan.parent / "nodules.json").read_text())["nodules"]
    centres = np.array([[float(v) for v in r[1:4]] for r in rows])
    for nodule in truth:  # the shipped model finds the phantom's nodules: a candidate within each radius
        d = np.linalg.norm(centres - np.array(nodule["center_world_xyz_mm"]), axis=1)
        assert d.min() < nodule["diameter_mm"] / 2
    identity = json.loads((cand_dir / "candidates.json").read_text())["identity"]
    assert identity["tta"] == "none" and len(identity["weights_sha256"]) == 1

    # A rerun with the same settings is skipped; with TTA it is redone and records it.
    rerun = _predict(phantom_scan, tmp_path / "cand", "--candidates-only")
    assert "skipped" in rerun.output
    tta = _predict(phantom_scan, tmp_path / "cand", "--candidates-only", "--tta", "flips")
    assert "skipped" not in tta.output
    stored = json.loads((cand_dir / "candidates.json").read_text())
    assert stored["identity"]["tta"] == "flips" and stored["identity"]["merge"] == "wbf"
    # Every nodule is still found with TTA.
    rows = [line.split(",") for line in (cand_dir / "candidates.csv").read_text().splitlines()[1:]]
    centres = np.array([[float(v) for v in r[1:4]] for r in rows])
    for nodule in truth:
        d = np.linalg.norm(centres - np.array(nodule["center_world_xyz_mm"]), axis=1)
        assert d.min() < nodule["diameter_mm"] / 2


@pytest.mark.parametrize("merge", ["wbf", "nms"])
def test_an_ensemble_of_one_model_twice_equals_the_model(phantom_scan: Path, tmp_path: Path, merge: str) -> None:
    weights = str(shipped_weights_path())
    _predict(phantom_scan, tmp_path / "one", "--candidates-only", "--weights", weights)
    _predict(phantom_scan, tmp_path / "two", "--candidates-only", "--weights", weights, "--weights", weights,
             "--merge", merge)
    one = (tmp_path / "one" / "scan" / "candidates.csv").read_text().splitlines()[1:]
    two = (tmp_path / "two" / "scan" / "candidates.csv").read_text().splitlines()[1:]
    parse = lambda lines: np.array([[float(v) for v in line.split(",")[1:]] for line in lines])
    # Identical passes fuse into the same boxes with the same mean score (WBF) or keep the first (NMS).
    assert parse(one).shape == parse(two).shape
    assert np.allclose(parse(one), parse(two), atol=1e-9)
    identity = json.loads((tmp_path / "two" / "scan" / "candidates.json").read_text())["identity"]
    assert len(identity["weights_sha256"]) == 2 and identity["merge"] == merge


def test_tta_and_ensembles_need_candidates_only(phantom_scan: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(phantom_scan), "-o", str(tmp_path), "--tta", "flips"])
    assert result.exit_code != 0 and "--candidates-only" in str(result.exception or result.output)
    result = CliRunner().invoke(app, ["predict", str(phantom_scan), "-o", str(tmp_path), "--candidates-only",
                                      "--tta", "mirror"])
    assert result.exit_code != 0 and "--tta must be one of" in str(result.exception or result.output)
