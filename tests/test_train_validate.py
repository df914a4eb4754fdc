"""Validation FROC on whole cases and hard-negative mining, with hand-made detections (golden values by hand).

A detection box centred on a nodule's mask centre must be a hit once mapped to world mm through the case's geometry;
one 2 x (radius + 5) mm away is a false positive. With the hit scored above the false positive the LUNA16 CPM is 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodulenet.data.cases import load_case
from nodulenet.model.nodulenet import Detections
from nodulenet.train import validate as validate_module
from nodulenet.train.config import TrainConfig
from nodulenet.train.distributed import DistInfo
from nodulenet.train.loop import train
from nodulenet.train.validate import mine_hard_negatives, validate

SINGLE = DistInfo(0, 0, 1, torch.device("cpu"), None)



def box_at(center_zyx: np.ndarray, size: float) -> list[float]:
    # Voxel k covers [k, k + 1): a box centred on voxel-centre index c spans c + 0.5 -/+ size / 2.
    c = np.asarray(center_zyx) + 0.5
    return [*(c - size / 2), *(c + size / 2)]


def fake_detections(case: Any, hit_score: float, fp_score: float) -> Detections:
    nodule = case.nodules[0]
    away = nodule.center_zyx + np.array([0.0, 0.0, (nodule.diameter_mm or 10) / 2 + 5.0])
    boxes = torch.tensor([box_at(nodule.center_zyx, 8.0), box_at(away, 8.0)], dtype=torch.float32)
    scores = torch.tensor([hit_score, fp_score])
    order = torch.argsort(scores, descending=True)
    return Detections(boxes=boxes[order], scores=scores[order], proposals=boxes, proposal_scores=scores)


def test_validation_cpm_and_hard_negatives(phantom_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = load_case(phantom_root / "phantom-00001")
    # Only the first nodule counts: keep a one-nodule view of the case.
    case.nodules = case.nodules[:1]
    monkeypatch.setattr(validate_module, "predict_case", lambda model, c, *a, **k: fake_detections(c, 0.9, 0.8))
    model = torch.nn.Module()
    result = validate(model, [case], SINGLE, ("rpn", "rcnn"))  # type: ignore[arg-type]
    assert result["n_hits"] == 1 and result["n_false_positives"] == 1 and result["cpm"] == pytest.approx(1.0)
    monkeypatch.setattr(validate_module, "predict_case", lambda model, c, *a, **k: fake_detections(c, 0.3, 0.8))
    worse = validate(model, [case], SINGLE, ("rpn",))  # type: ignore[arg-type]
    # Hit ranked below one FP per scan: sensitivity 0 below 1 FP/scan, 1 from 1 FP/scan on (0.125..0.5 -> 0).
    assert worse["sensitivities_at"]["0.5"] == 0.0 and worse["sensitivities_at"]["2.0"] == 1.0
    mined = mine_hard_negatives(model, [case], SINGLE, ("rpn",), per_case=5, min_score=0.5)  # type: ignore[arg-type]
    assert len(mined) == 1 and mined[0].score == pytest.approx(0.8)  # the hit is not a hard negative
    far = case.nodules[0].center_zyx + np.array([0.0, 0.0, (case.nodules[0].diameter_mm or 10) / 2 + 5.0])
    np.testing.assert_allclose(mined[0].center_zyx, far, atol=2e-3)  # stored to 3 decimals
    assert mine_hard_negatives(model, [case], SINGLE, ("rpn",), per_case=5, min_score=0.85) == []  # type: ignore[arg-type]


def test_hard_negative_stage_in_the_loop(phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    seen: list[str] = []
    monkeypatch.setattr(validate_module, "predict_case", lambda model, c, *a, **k: fake_detections(c, 0.9, 0.8))
    cfg = TrainConfig.from_dict(dict(
        prepared_roots=[str(phantom_root)], train_cases=["phantom-00001"], model="tiny", model_width=0.5,
        model_config={"blocks_per_stage": [1] * 6},
        crop={"crop_size_zyx": [32, 32, 32], "positive_margin_voxels": 2, "samples_per_epoch": 4,
              "positive_fraction": 0.5, "hard_negative_fraction": 0.5},
        epochs=2, batch_size=4, workers=0, val_every_epochs=0, hard_negative_every_epochs=1, threads=1,
    ))
    from nodulenet.data import dataset as dataset_module

    original = dataset_module.CropDataset.sample

    def spy(self: Any, index: int) -> Any:
        s = original(self, index)
        seen.append(f"{self.epoch}:{s.kind}")
        return s

    monkeypatch.setattr(dataset_module.CropDataset, "sample", spy)
    summary = train(cfg, tmp_path / "run", show_progress=False)
    assert summary.status == "finished"
    mined = json.loads((tmp_path / "run" / "hard_negatives" / "epoch_0001.json").read_text())
    assert len(mined["hard_negatives"]) == 1 and mined["hard_negatives"][0]["case_id"] == "phantom-00001"
    assert sorted(seen) == ["0:lung", "0:lung", "0:positive", "0:positive",
                            "1:hard_negative", "1:hard_negative", "1:positive", "1:positive"]
