"""Validation during training (FROC/CPM on WHOLE validation cases) and hard-negative mining.

Whole cases, not crops: the CPM is defined per scan (false positives per scan), and a crop-based figure would
count neither the false positives outside the crops nor the nodules a sliding window cuts. Each prepared case goes
through the network in one piece (the network pads it to a multiple of 16 itself), in ``eval`` mode (BatchNorm
running statistics) with the heads trained so far. Under DDP each rank predicts its share of the cases and the
candidates are gathered, so every rank computes the same FROC.

Conventions: detection boxes ``(z0, y0, x0, z1, y1, x1)`` are voxels of the prepared image with voxel ``k`` covering
``[k, k + 1)``, so a box's centre index is ``(lo + hi) / 2 - 0.5``; candidates are placed in the world (DICOM LPS mm,
``(x, y, z)``) through the case's geometry and scored exactly as LUNA16 does
(:func:`nodulenet.evaluate.froc.compute_froc` with ``n_bootstrap=0``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from nodulenet.data.cases import PreparedCase
from nodulenet.data.dataset import normalised_case_image
from nodulenet.data.sampling import HardNegative
from nodulenet.evaluate.froc import DEFAULT_DIAMETER_MM, FrocCandidate, FrocFinding, compute_froc
from nodulenet.model.nodulenet import Detections, NoduleNet

from .distributed import DistInfo, gather_objects


def box_centers_zyx(boxes: torch.Tensor) -> np.ndarray:
    b = boxes.detach().cpu().double().numpy().reshape(-1, 6)
    return (b[:, :3] + b[:, 3:]) / 2.0 - 0.5


def predict_case(model: NoduleNet, case: PreparedCase, device: torch.device, stages: Sequence[str],
                 autocast: Any = None) -> Detections:
    """Detections of ``model`` (eval mode) on the whole prepared image of ``case`` (CPU tensors)."""
    image = normalised_case_image(case).to(device)
    with torch.no_grad(), (autocast if autocast is not None else nullcontext()):
        return model.predict(image, stages=tuple(stages))[0].cpu()


def case_candidates(case: PreparedCase, detections: Detections) -> list[tuple[str, list[float], float]]:
    """(case id, world centre x, y, z mm, score) of every detection, JSON-able for gathering across ranks."""
    centers = box_centers_zyx(detections.boxes)
    world = case.geometry.voxel_to_world(centers) if len(centers) else np.zeros((0, 3))
    scores = detections.scores.detach().float().cpu().numpy().reshape(-1)
    return [(case.case_id, [float(v) for v in w], float(s)) for w, s in zip(world, scores)]


def case_findings(case: PreparedCase) -> tuple[list[FrocFinding], list[FrocFinding]]:
    """The case's nodules and excluded findings for the FROC (unknown diameter -> -1, read as 10 mm)."""
    nodules = [FrocFinding(case.case_id, n.center_world_xyz_mm, n.diameter_mm if n.diameter_mm else -1.0)
               for n in case.nodules]
    excluded = [FrocFinding(case.case_id, tuple(e["center_world_xyz_mm"]),  # type: ignore[arg-type]
                            e["diameter_mm"] if e["diameter_mm"] else -1.0) for e in case.excluded_nodules]
    return nodules, excluded


def validate(model: NoduleNet, cases: Sequence[PreparedCase], info: DistInfo, stages: Sequence[str],
             autocast: Any = None) -> dict[str, Any]:
    """FROC/CPM of ``model`` over ``cases`` (see the module doc); same result on every rank."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    mine = [case_candidates(c, predict_case(model, c, info.device, stages, autocast))
            for c in cases[info.rank :: info.world_size]]
    model.train(was_training)
    gathered = [row for part in gather_objects(mine, info) for rows in part for row in rows]
    candidates = [FrocCandidate(cid, tuple(xyz), score) for cid, xyz, score in gathered]  # type: ignore[arg-type]
    nodules: list[FrocFinding] = []
    excluded: list[FrocFinding] = []
    for case in cases:
        n, e = case_findings(case)
        nodules += n
        excluded += e
    result: dict[str, Any] = {"mode": "whole-case", "stages": list(stages), "n_cases": len(cases),
                              "n_nodules": len(nodules), "n_candidates": len(candidates)}
    try:
        froc = compute_froc(candidates, nodules, excluded, [c.case_id for c in cases], n_bootstrap=0)
    except ValueError as exc:  # no nodule in the validation cases: sensitivity undefined
        result.update(cpm=None, note=str(exc))
    else:
        result.update(cpm=froc.cpm, sensitivities_at={str(k): v for k, v in froc.sensitivities_at.items()},
                      n_hits=froc.n_hits, n_false_positives=froc.n_false_positives,
                      sensitivity_ceiling=froc.sensitivity_ceiling)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _is_near_finding(case: PreparedCase, center_zyx: np.ndarray) -> bool:
    """Within a nodule's (or excluded finding's) radius - the LUNA16 hit rule, 10 mm for unknown sizes."""
    world = case.geometry.voxel_to_world(center_zyx)
    findings = [(n.center_world_xyz_mm, n.diameter_mm) for n in case.nodules] + \
               [(tuple(e["center_world_xyz_mm"]), e["diameter_mm"]) for e in case.excluded_nodules]
    for center, diameter in findings:
        radius = (diameter if diameter and diameter > 0 else DEFAULT_DIAMETER_MM) / 2.0
        if math.dist(world, center) < radius:
            return True
    return False


def mine_hard_negatives(model: NoduleNet, cases: Sequence[PreparedCase], info: DistInfo, stages: Sequence[str],
                        per_case: int, min_score: float, autocast: Any = None) -> list[HardNegative]:
    """The ``per_case`` most confident detections of each training case that hit no nodule (all ranks)."""
    was_training = model.training
    model.eval()
    found: list[dict[str, Any]] = []
    for case in cases[info.rank :: info.world_size]:
        det = predict_case(model, case, info.device, stages, autocast)
        centers = box_centers_zyx(det.boxes)
        scores = det.scores.float().numpy().reshape(-1)
        kept = 0
        for k in np.argsort(-scores, kind="stable"):
            if kept >= per_case or scores[k] < min_score:
                break
            if not _is_near_finding(case, centers[k]):
                found.append(HardNegative(case.case_id, tuple(centers[k]), float(scores[k])).to_dict())  # type: ignore[arg-type]
                kept += 1
    model.train(was_training)
    rows = [row for part in gather_objects(found, info) for row in part]
    return sorted((HardNegative.from_dict(r) for r in rows), key=lambda h: (h.case_id, -h.score, h.center_zyx))
