"""Candidates-only detection: every detection of the network, no mask head; flip TTA and model ensembles.

This is the path a full-FROC evaluation of a cohort needs (``nodulenet predict --candidates-only``, ``nodulenet
benchmark``): the LUNA16 score ranks *every* candidate, so nothing is cut by a report threshold, and the mask head
(most of the cost on an uncertain model, see :mod:`.network`) is not run. Without masks there is no mask-IoU NMS
either, so the candidates are the network's detections after its box NMS - a superset of what a full prediction
reports.

Test-time augmentation (TTA) and ensembles run the same image through several *passes* (a model and a flip of
the image) and merge the passes' boxes:

* ``"wbf"`` - weighted box fusion (Solovyev et al. 2021, "Weighted boxes fusion", adapted to 3-D): boxes of all
  passes, best first, join the first cluster whose fused box they overlap by more than ``iou``; a cluster's box
  is the score-weighted mean of its members and its score the mean member score times ``min(members, passes) /
  passes`` - so a candidate found by one pass of four keeps a quarter of its score, one found by all keeps it.
* ``"nms"`` - the passes' boxes pooled, then box NMS at ``iou``: each place keeps its best score.

Flips are exact on the voxel grid: a flip of axis ``a`` (size ``S``) maps the box ``[lo, hi)`` to ``[S - hi,
S - lo)``, so boxes are flipped back before merging and the merge happens on the preprocessed grid (1 mm
isotropic, the same for every model as long as they share the preparation settings - checked by the caller).

Conventions: boxes ``(z0, y0, x0, z1, y1, x1)`` float voxels of the preprocessed image, end exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TTA_MODES = ("none", "flips", "flips8")
MERGE_METHODS = ("wbf", "nms")
# Boxes of passes that overlap by more than this are one candidate; the network's own test NMS uses 0.1.
DEFAULT_MERGE_IOU = 0.1


def tta_flips(mode: str) -> list[tuple[int, ...]]:
    """The flips (axes of the ``(z, y, x)`` image to reverse) of a TTA mode.

    ``none``: the image as is. ``flips``: as is + each axis alone (4 passes). ``flips8``: every combination
    of the three axes (8 passes, as nnDetection's mirroring TTA).
    """
    if mode == "none":
        return [()]
    if mode == "flips":
        return [(), (0,), (1,), (2,)]
    if mode == "flips8":
        return [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    from nodulenet.errors import NoduleNetError

    raise NoduleNetError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")


def unflip_boxes(boxes: np.ndarray, axes: Sequence[int], shape_zyx: Sequence[int]) -> np.ndarray:
    """Boxes found on the image flipped along ``axes``, in the frame of the unflipped image."""
    out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 6)
    for a in axes:
        size = float(shape_zyx[a])
        lo, hi = out[:, a].copy(), out[:, a + 3].copy()
        out[:, a], out[:, a + 3] = size - hi, size - lo
    return out


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo = np.maximum(box[:3], boxes[:, :3])
    hi = np.minimum(box[3:], boxes[:, 3:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
    vol = np.prod(box[3:] - box[:3])
    vols = np.prod(boxes[:, 3:] - boxes[:, :3], axis=1)
    return inter / np.maximum(vol + vols - inter, 1e-12)


def weighted_box_fusion(passes: Sequence[tuple[np.ndarray, np.ndarray]], iou: float = DEFAULT_MERGE_IOU
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the ``(boxes [N, 6], scores [N])`` of several passes (see the module doc); by decreasing score.

    Hand-written (no 3-D WBF exists in a maintained package: ``ensemble-boxes`` has a 3-D variant, but it wants
    boxes normalised to [0, 1] and adds a dependency for ~30 lines); greedy in score order like the original.
    """
    n_passes = max(len(passes), 1)
    boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 6) for b, _ in passes]) if passes else \
        np.zeros((0, 6))
    scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for _, s in passes]) if passes else \
        np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    fused: list[np.ndarray] = []  # current fused box of each cluster
    members: list[list[int]] = []
    for i in order:
        if fused:
            overlaps = _iou_one_to_many(boxes[i], np.asarray(fused))
            best = int(np.argmax(overlaps))
            if overlaps[best] > iou:
                members[best].append(int(i))
                w = scores[members[best]]
                weight = w if w.sum() > 0 else np.ones_like(w)
                fused[best] = (boxes[members[best]] * weight[:, None]).sum(0) / weight.sum()
                continue
        fused.append(boxes[i].copy())
        members.append([int(i)])
    out_scores = np.asarray([scores[m].mean() * min(len(m), n_passes) / n_passes for m in members])
    out_boxes = np.asarray(fused).reshape(-1, 6)
    keep = np.argsort(-out_scores, kind="stable") if len(out_scores) else np.zeros(0, dtype=np.int64)
    return out_boxes[keep], out_scores[keep] if len(out_scores) else np.zeros(0)


def nms_merge(passes: Sequence[tuple[np.ndarray, np.ndarray]], iou: float = DEFAULT_MERGE_IOU
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pool the passes' boxes and keep, by box NMS at ``iou``, the best-scoring box of each place."""
    import torch

    from nodulenet.model.box_ops import nms_3d

    boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 6) for b, _ in passes]) if passes else \
        np.zeros((0, 6))
    scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for _, s in passes]) if passes else \
        np.zeros(0)
    if not len(scores):
        return boxes, scores
    keep = nms_3d(torch.from_numpy(boxes), torch.from_numpy(scores), float(iou)).numpy()
    return boxes[keep], scores[keep]


def merge_passes(passes: Sequence[tuple[np.ndarray, np.ndarray]], method: str = "wbf",
                 iou: float = DEFAULT_MERGE_IOU) -> tuple[np.ndarray, np.ndarray]:
    """One pass is returned as it is; several are merged by ``method`` (``wbf`` or ``nms``)."""
    if method not in MERGE_METHODS:
        from nodulenet.errors import NoduleNetError

        raise NoduleNetError(f"--merge must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if len(passes) == 1:
        b, s = passes[0]
        return np.asarray(b, dtype=np.float64).reshape(-1, 6), np.asarray(s, dtype=np.float64).reshape(-1)
    return weighted_box_fusion(passes, iou) if method == "wbf" else nms_merge(passes, iou)


@dataclass
class CandidateOutput:
    """Merged candidates on the preprocessed grid, by decreasing score, and what made them."""

    boxes: np.ndarray  # [N, 6] float64
    scores: np.ndarray  # [N] float64
    n_passes: int
    n_before_merge: int
    pass_seconds: list[float] = field(default_factory=list)


def run_passes(models: Sequence[Any], image_u8: np.ndarray, *, tta: str = "none", device: str = "cpu",
               precision: str = "fp32", memory_budget_bytes: float | None = None, channels_last: bool = False
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """``(boxes, scores)`` of every model on every TTA flip (boxes flipped back), and each pass's seconds."""
    import time

    from nodulenet.infer.network import run_network

    passes: list[tuple[np.ndarray, np.ndarray]] = []
    seconds: list[float] = []
    shape = image_u8.shape
    for model in models:
        for axes in tta_flips(tta):
            t0 = time.perf_counter()
            image = np.flip(image_u8, axis=axes) if axes else image_u8
            out = run_network(model, np.ascontiguousarray(image), device=device, precision=precision,
                              mask_threshold=None, memory_budget_bytes=memory_budget_bytes,
                              channels_last=channels_last)
            passes.append((unflip_boxes(out.boxes, axes, shape), out.scores))
            seconds.append(round(time.perf_counter() - t0, 3))
    return passes, seconds


def detect_candidates(models: Sequence[Any], image_u8: np.ndarray, *, tta: str = "none", merge: str = "wbf",
                      merge_iou: float = DEFAULT_MERGE_IOU, device: str = "cpu", precision: str = "fp32",
                      memory_budget_bytes: float | None = None, channels_last: bool = False) -> CandidateOutput:
    """Every detection of each model on each TTA flip of the preprocessed image (no mask head), merged."""
    passes, seconds = run_passes(models, image_u8, tta=tta, device=device, precision=precision,
                                 memory_budget_bytes=memory_budget_bytes, channels_last=channels_last)
    boxes, scores = merge_passes(passes, merge, merge_iou)
    return CandidateOutput(boxes=boxes, scores=scores, n_passes=len(passes),
                           n_before_merge=sum(len(s) for _, s in passes), pass_seconds=seconds)
