"""Decoupled RCNN: crop each proposal from the ENCODER map, pool to a fixed cube, classify and refine the box.

"Decoupled" (the NoduleNet paper's point): the RCNN reads ``out2`` - the stride-4 encoder map - not the decoder
output the RPN uses, so the false-positive-reduction branch does not share the RPN's last features.

Boxes are ``(z0, y0, x0, z1, y1, x1)`` in input voxels, end exclusive. Feature voxel ``j`` of a stride-``s`` map
covers input voxels ``[s*j, s*(j+1))``, so a box touches feature voxels ``floor(z0/s) .. ceil(z1/s) - 1``; the crop
is clamped to the map and kept at least one voxel wide, then adaptive-max-pooled to ``crop_size^3``.

Head outputs: class logits ``[N, num_classes]`` (softmax; class 1 = nodule) and deltas ``[N, num_classes*6]``
(per-class ``(dz, dy, dx, dd, dh, dw)``, class-major: class ``c`` owns columns ``6c .. 6c+5``), as published.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_coder import BoxCoder
from .box_ops import nms_3d
from .rpn import clamp_box_centres


def feature_crop_ranges(boxes: Tensor, stride: int, feature_shape_zyx: tuple[int, int, int]) -> Tensor:
    """Integer ``[N, 6]`` (start, end) feature-voxel ranges, end exclusive, each at least one voxel, inside the map."""
    sizes = torch.tensor(feature_shape_zyx, device=boxes.device, dtype=torch.long)
    start = torch.floor(boxes[:, :3].float() / stride).long()
    end = torch.ceil(boxes[:, 3:].float() / stride).long()
    start = torch.minimum(torch.clamp(start, min=0), sizes - 1)
    end = torch.maximum(torch.minimum(end, sizes), start + 1)
    return torch.cat((start, end), dim=1)


def crop_and_pool(
    features: Tensor, boxes: Tensor, batch_index: Tensor, stride: int, crop_size: int
) -> Tensor:
    """Max-pool the feature region under each box to ``[N, C, crop_size, crop_size, crop_size]``.

    ``features`` is ``[B, C, Z, Y, X]`` at ``stride``; ``batch_index[i]`` says which image box ``i`` is in.
    Same bins as ``F.adaptive_max_pool3d`` (the published op): bin ``i`` of a length-``L`` axis is
    ``[floor(i*L/k), ceil((i+1)*L/k))``. Regions of equal size are pooled as one batch by :func:`_adaptive_max_pool`
    (separable gathers + max) - ``F.adaptive_max_pool3d`` costs ~1 ms per small crop on CPU, and a whole scan
    has up to a thousand proposals. torchvision's RoI ops are 2-D only and not a dependency.
    """
    n = boxes.shape[0]
    if n == 0:
        return features.new_zeros((0, features.shape[1], crop_size, crop_size, crop_size))
    ranges = feature_crop_ranges(boxes, stride, tuple(features.shape[2:])).tolist()
    bidx = batch_index.tolist()
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (z0, y0, x0, z1, y1, x1) in enumerate(ranges):
        groups.setdefault((z1 - z0, y1 - y0, x1 - x0), []).append(i)
    pooled: list[Tensor] = []
    order: list[int] = []
    for size, members in groups.items():
        regions = torch.cat([
            features[bidx[i] : bidx[i] + 1, :, r[0] : r[3], r[1] : r[4], r[2] : r[5]]
            for i in members
            for r in (ranges[i],)
        ])
        pooled.append(_adaptive_max_pool(regions, size, crop_size))
        order += members
    out = torch.cat(pooled)
    inverse = torch.empty(n, dtype=torch.long, device=out.device)
    inverse[torch.tensor(order, device=out.device)] = torch.arange(n, device=out.device)
    return out[inverse]


def _bin_indices(length: int, bins: int, device: torch.device) -> Tensor:
    """``[bins, K]`` input indices of each adaptive-pooling bin; short bins repeat their last index (max-neutral)."""
    i = torch.arange(bins, device=device)
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = -torch.div(-(i + 1) * length, bins, rounding_mode="floor")
    k = int((end - start).max())
    idx = start[:, None] + torch.arange(k, device=device)[None, :]
    return torch.minimum(idx, end[:, None] - 1)


def _adaptive_max_pool(regions: Tensor, size: tuple[int, int, int], bins: int) -> Tensor:
    """Exact adaptive max pooling of ``[n, C, *size]`` to ``bins^3``, one axis at a time (max is separable)."""
    out = regions
    for axis, length in zip((2, 3, 4), size):
        idx = _bin_indices(length, bins, regions.device)
        out = out.index_select(axis, idx.flatten()).unflatten(axis, tuple(idx.shape)).amax(dim=axis + 1)
    return out


class RcnnHead(nn.Module):
    """fc(C*k^3 -> 512) - ReLU - fc(512 -> 256) - ReLU, then ``logit`` and ``delta`` (published ``rcnn_head``)."""

    def __init__(
        self,
        in_channels: int,
        crop_size: int = 7,
        fc_channels: tuple[int, int] = (512, 256),
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_channels * crop_size**3, fc_channels[0])
        self.fc2 = nn.Linear(fc_channels[0], fc_channels[1])
        self.logit = nn.Linear(fc_channels[1], num_classes)
        self.delta = nn.Linear(fc_channels[1], num_classes * 6)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        x = crops.flatten(1)
        x = F.relu(self.fc1(x), inplace=True)
        x = F.relu(self.fc2(x), inplace=True)
        return self.logit(x), self.delta(x)

    @staticmethod
    def foreground(class_logits: Tensor, deltas: Tensor, fg_class: int = 1) -> tuple[Tensor, Tensor]:
        """Foreground probability ``[N]`` and that class's deltas ``[N, 6]`` (both float32 for post-processing)."""
        probs = torch.softmax(class_logits.float(), dim=1)[:, fg_class]
        fg_deltas = deltas.float().view(deltas.shape[0], class_logits.shape[1], 6)[:, fg_class]
        return probs, fg_deltas


@torch.no_grad()
def refine_detections(
    proposals: Tensor,
    fg_probs: Tensor,
    fg_deltas: Tensor,
    image_shape_zyx: tuple[int, int, int],
    coder: BoxCoder,
    score_threshold: float,
    nms_iou: float,
) -> tuple[Tensor, Tensor]:
    """Detections of ONE image (published ``rcnn_nms``): probability > threshold, decode the nodule-class deltas
    on the proposals, clamp centres, NMS. Returns zyxzyx ``boxes [K, 6]`` and ``scores [K]`` by decreasing score.
    """
    idx = torch.nonzero(fg_probs > score_threshold).squeeze(1)
    if idx.numel() == 0:
        return proposals.new_zeros((0, 6)), fg_probs.new_zeros((0,))
    boxes = coder.decode(proposals[idx].float(), fg_deltas[idx].float()).float()
    boxes = clamp_box_centres(boxes, image_shape_zyx)
    keep = nms_3d(boxes, fg_probs[idx], nms_iou)
    return boxes[keep], fg_probs[idx][keep].float()
