"""Operating-point calibration: the logit shift puts 0.5 where asked and changes nothing but the scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nodulenet.data.cases import load_case
from nodulenet.infer.weights import load_model
from nodulenet.train.calibrate import apply_logit_shift, calibrate_operating_point, shift_for_rate
from nodulenet.train.validate import predict_case


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_shift_for_rate_hand_computed() -> None:
    # 4 false positives over 2 scans, 0.5 FP/scan allowed -> keep 1: the new 0.5 lies halfway between
    # logit(0.9) = ln 9 and logit(0.8) = ln 4, i.e. at ln 6.
    scores = np.array([0.3, 0.9, 0.6, 0.8])
    delta = shift_for_rate(scores, n_scans=2, fp_per_scan=0.5)
    assert delta == pytest.approx(math.log(6.0), rel=1e-9)
    shifted = _sigmoid(np.log(scores / (1 - scores)) - delta)
    assert int(np.sum(shifted >= 0.5)) == 1 and shifted.max() == pytest.approx(0.6)  # 9 / 6 = 1.5 odds
    # 0 FP/scan: 0.5 moves above the strongest false positive.
    assert _sigmoid(math.log(9.0) - shift_for_rate(scores, 2, 0.0)) < 0.5
    # The bar is never lowered: already fewer false positives at 0.5 than allowed -> no shift.
    assert shift_for_rate(np.array([0.2, 0.1]), n_scans=4, fp_per_scan=1.0) == 0.0
    assert shift_for_rate(np.array([0.7, 0.2]), n_scans=1, fp_per_scan=1.0) == 0.0
    with pytest.raises(ValueError):
        shift_for_rate(scores, n_scans=0, fp_per_scan=1.0)


def test_logit_shift_changes_scores_only(phantom_root: Path) -> None:
    torch.manual_seed(0)
    model = load_model(None, "cpu").model  # the shipped demo model: real detections, not a random net's noise
    case = load_case(phantom_root / "phantom-00001")
    before = predict_case(model, case, torch.device("cpu"), ("rpn", "rcnn"))
    assert len(before.scores) >= 3
    apply_logit_shift(model, 1.5)
    after = predict_case(model, case, torch.device("cpu"), ("rpn", "rcnn"))
    torch.testing.assert_close(after.boxes, before.boxes)
    p = before.scores.double().clamp(1e-6, 1 - 1e-6).numpy()
    expected = _sigmoid(np.log(p / (1 - p)) - 1.5)
    np.testing.assert_allclose(after.scores.double().numpy(), expected, atol=2e-4)


def test_calibration_meets_the_asked_rate(phantom_root: Path) -> None:
    model = load_model(None, "cpu").model
    cases = [load_case(phantom_root / "phantom-00001"), load_case(phantom_root / "phantom-00003")]
    op = calibrate_operating_point(model, cases, fp_per_scan=0.0)
    assert op.n_scans == 2 and op.n_nodules == 6 and op.logit_shift >= 0.0
    assert op.false_positives_at_half == 0
    assert op.false_positives_at_half <= op.false_positives_at_half_before
    assert op.sensitivity_at_half <= op.sensitivity_at_half_before
    # Applying it reproduces what it promised: no false positive at 0.5 on these cases.
    apply_logit_shift(model, op.logit_shift)
    again = calibrate_operating_point(model, cases, fp_per_scan=0.0)
    assert again.false_positives_at_half_before == 0 and again.logit_shift == pytest.approx(0.0, abs=1e-5)
    assert again.sensitivity_at_half_before == pytest.approx(op.sensitivity_at_half)
