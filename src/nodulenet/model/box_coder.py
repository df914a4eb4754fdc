"""Box regression encoding: boxes <-> deltas relative to anchors (or RCNN proposals).

Inputs and outputs are ``(z0, y0, x0, z1, y1, x1)`` boxes in voxels, ``z1`` exclusive (see
:mod:`nodulenet.model.box_ops`). Deltas are ``(dz, dy, dx, dd, dh, dw)``:

    dz = wz * (gz - az) / ad        dd = wd * log(gd / ad)

with ``(az, ay, ax)`` / ``(ad, ah, aw)`` the anchor centre / size, ``g`` the same for the target box and
``w`` the weights. This is the published NoduleNet ``box_transform`` (``net/layer/util.py``): weights
*multiply* on encode and divide on decode (as in Faster R-CNN / detectron2), and the published config uses
``box_reg_weight = [1, 1, 1, 1, 1, 1]``, our default. Centre offsets and size ratios do not depend on the
frame origin, so these deltas are interchangeable with the published ones.

Computation is in float32 (float64 if given float64) even under autocast: decoded coordinates of a few
hundred voxels need more precision than bf16's 3 significant digits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder", "DEFAULT_BOX_REG_WEIGHTS"]

#: Published NoduleNet ``box_reg_weight``.
DEFAULT_BOX_REG_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
# Largest log size ratio applied on decode: a box may grow at most 1000/16 = 62.5x its anchor (the
# detectron2 bound). Without it an untrained head's exp(delta) overflows to inf and NMS sees NaN IoUs.
_DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# Sizes below this (voxels) are treated as this on encode so log() stays finite for degenerate boxes.
_MIN_SIZE = 1e-6


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor]:
    return (boxes[:, :3] + boxes[:, 3:]) / 2, boxes[:, 3:] - boxes[:, :3]


class BoxCoder:
    """Encode/decode zyxzyx boxes as ``(dz, dy, dx, dd, dh, dw)`` deltas relative to reference boxes."""

    def __init__(
        self,
        weights: Sequence[float] = DEFAULT_BOX_REG_WEIGHTS,
        scale_clamp: float = _DEFAULT_SCALE_CLAMP,
    ) -> None:
        if len(weights) != 6 or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be 6 positive numbers (z, y, x, d, h, w), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def _weights(self, like: Tensor) -> Tensor:
        return torch.tensor(self.weights, dtype=like.dtype, device=like.device)

    @staticmethod
    def _dtype(*tensors: Tensor) -> torch.dtype:
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

    def encode(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """Deltas ``[N, 6]`` taking zyxzyx ``anchors[N, 6]`` to zyxzyx ``gt_boxes[N, 6]`` (row-wise pairs)."""
        if anchors.shape != gt_boxes.shape or anchors.dim() != 2 or anchors.shape[1] != 6:
            raise ValueError(f"anchors and gt_boxes must both be [N, 6], got {tuple(anchors.shape)} "
                             f"and {tuple(gt_boxes.shape)}")
        dtype = self._dtype(anchors, gt_boxes)
        a_centre, a_size = _centre_size(anchors.to(dtype))
        g_centre, g_size = _centre_size(gt_boxes.to(dtype))
        a_size = a_size.clamp(min=_MIN_SIZE)
        g_size = g_size.clamp(min=_MIN_SIZE)
        deltas = torch.cat([(g_centre - a_centre) / a_size, torch.log(g_size / a_size)], dim=1)
        return deltas * self._weights(deltas)

    def decode(self, anchors: Tensor, deltas: Tensor) -> Tensor:
        """Zyxzyx boxes ``[N, 6]`` obtained by applying ``deltas[N, 6]`` to zyxzyx ``anchors[N, 6]``.

        Log size ratios are clamped to ``+-scale_clamp`` first, so the result is finite for any finite
        delta. Gradients flow to ``deltas`` (the published decode ran in numpy, outside the graph).
        """
        if anchors.shape != deltas.shape or anchors.dim() != 2 or anchors.shape[1] != 6:
            raise ValueError(f"anchors and deltas must both be [N, 6], got {tuple(anchors.shape)} "
                             f"and {tuple(deltas.shape)}")
        dtype = self._dtype(anchors, deltas)
        deltas = deltas.to(dtype) / self._weights(deltas.to(dtype))
        a_centre, a_size = _centre_size(anchors.to(dtype))
        centre = a_centre + deltas[:, :3] * a_size
        size = a_size * torch.exp(deltas[:, 3:].clamp(min=-self.scale_clamp, max=self.scale_clamp))
        return torch.cat([centre - size / 2, centre + size / 2], dim=1)
