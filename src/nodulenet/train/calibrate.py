"""Operating point of a trained model: make score 0.5 mean a chosen false-positive rate on calibration cases.

Why: ``nodulenet predict`` (and the server, the viewer, the demo) report detections scoring at least 0.5 by default.
What 0.5 means depends on the training run: a model trained with many hard negatives can rank nodules very well
(high CPM) and still give its false positives 0.6-0.9. Calibrating moves the threshold to where the user expects it
without changing what the model finds.

How: the final score is the RCNN's softmax probability of the nodule class, ``p = sigmoid(l_nodule - l_background)``.
Subtracting ``delta`` from the nodule logit's bias turns every score into ``sigmoid(logit(p) - delta)``: a monotone
map, so the ranking, the NMS, the boxes and masks and therefore FROC and CPM are exactly unchanged; only where 0.5
falls moves. ``delta`` is chosen on calibration cases (prepared cases with known nodules, not the cases a result is
reported on) so that ``fp_per_scan`` false positives per scan score at least 0.5 (LUNA16 matching: a candidate
within a nodule's radius is a hit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from nodulenet.data.cases import PreparedCase
from nodulenet.evaluate.froc import FrocCandidate, match_candidates
from nodulenet.model import NoduleNet

from .validate import case_candidates, case_findings, predict_case

_P_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _P_EPS, 1 - _P_EPS)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class OperatingPoint:
    """The shift applied to the nodule logit and what score 0.5 means afterwards on the calibration cases."""

    fp_per_scan: float  # the asked-for rate
    logit_shift: float  # subtracted from the nodule logit's bias
    n_scans: int
    n_nodules: int
    sensitivity_at_half: float  # on the calibration cases, after the shift
    false_positives_at_half: int
    sensitivity_at_half_before: float
    false_positives_at_half_before: int
    cases: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shift_for_rate(fp_scores: np.ndarray, n_scans: int, fp_per_scan: float) -> float:
    """Logit shift (>= 0) that leaves at most ``floor(fp_per_scan * n_scans)`` of ``fp_scores`` at or above 0.5.

    The new 0.5 sits halfway (in logits) between the last false positive kept and the first one dropped. The bar is
    never lowered: a model with fewer false positives than that at 0.5 keeps its scores (shift 0).
    """
    if n_scans < 1 or fp_per_scan < 0:
        raise ValueError("need at least one scan and a non-negative rate")
    logits = np.sort(_logit(fp_scores))[::-1]
    keep = int(math.floor(fp_per_scan * n_scans + 1e-9))
    if keep >= len(logits):
        return 0.0
    upper = logits[keep - 1] if keep > 0 else logits[keep] + 2.0
    return max(0.0, float((upper + logits[keep]) / 2.0))


def apply_logit_shift(target: NoduleNet | dict[str, torch.Tensor], delta: float) -> None:
    """Subtract ``delta`` from the nodule logit's bias (class 1 of the RCNN head), in place, in a model or in a
    checkpoint's ``state_dict``."""
    bias = target["rcnn_head.logit.bias"] if isinstance(target, dict) else target.rcnn_head.logit.bias
    with torch.no_grad():
        bias[1] -= float(delta)


def _counts(entries: Any, threshold_logit: float) -> tuple[int, int]:
    """(hits, false positives) scoring at least the threshold, from FROC entries."""
    counted = ~entries.missed
    above = _logit(entries.score) >= threshold_logit
    hits = int(np.sum(entries.is_nodule & counted & above))
    fps = int(np.sum(~entries.is_nodule & counted & above))
    return hits, fps


def calibrate_operating_point(model: NoduleNet, cases: Sequence[PreparedCase], fp_per_scan: float,
                              device: torch.device | str = "cpu", stages: Sequence[str] = ("rpn", "rcnn"),
                              autocast: Any = None) -> OperatingPoint:
    """Measure the model on ``cases`` and return the shift that makes 0.5 mean ``fp_per_scan`` (not applied)."""
    model.eval()
    candidates: list[FrocCandidate] = []
    nodules, excluded = [], []
    for case in cases:
        detections = predict_case(model, case, torch.device(device), stages, autocast)
        candidates += [FrocCandidate(cid, tuple(xyz), s) for cid, xyz, s in case_candidates(case, detections)]  # type: ignore[arg-type]
        found, excl = case_findings(case)
        nodules += found
        excluded += excl
    ids = [c.case_id for c in cases]
    entries, counts = match_candidates(candidates, nodules, excluded, ids)
    fp_scores = entries.score[~entries.is_nodule & ~entries.missed]
    delta = shift_for_rate(fp_scores, len(ids), fp_per_scan)
    hits_before, fps_before = _counts(entries, 0.0)
    hits_after, fps_after = _counts(entries, delta)
    n = max(counts.n_nodules, 1)
    return OperatingPoint(fp_per_scan=fp_per_scan, logit_shift=delta, n_scans=len(ids), n_nodules=counts.n_nodules,
                          sensitivity_at_half=hits_after / n, false_positives_at_half=fps_after,
                          sensitivity_at_half_before=hits_before / n, false_positives_at_half_before=fps_before,
                          cases=tuple(ids))
