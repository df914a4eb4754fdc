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


CROP_FRAMES = ("published", "voxel_corner")


def feature_crop_ranges(
    boxes: Tensor, stride: int, feature_shape_zyx: tuple[int, int, int], frame: str = "published"
) -> Tensor:
    """Integer ``[N, 6]`` (start, end) feature-voxel ranges, end exclusive, each at least one voxel, inside the map.

    ``frame="published"`` (default) gives the published ``CropRoi`` ranges exactly: it works on the box in the
    voxel-INDEX frame (centre of voxel ``i`` at ``i``, i.e. our corner coordinates minus 0.5), as
    ``c0 = centre - size / 2``, ``c1 = c0 + size``, ``floor(c0 / s)``, ``ceil(c1 / s)``. ``"voxel_corner"`` is the
    range of feature voxels the box's corner-frame extent touches (``floor(z0 / s) .. ceil(z1 / s)``); the two
    differ by one feature voxel at an end whenever the 0.5 shift carries a corner across a multiple of ``s``
    (about a third of random proposals). Both clamp to the map; a range is kept at least one voxel wide (the
    published code would pool an empty crop there and fail).
    """
    if frame not in CROP_FRAMES:
        raise ValueError(f"frame must be one of {CROP_FRAMES}, got {frame!r}")
    sizes = torch.tensor(feature_shape_zyx, device=boxes.device, dtype=torch.long)
    lo, hi = boxes[:, :3].float(), boxes[:, 3:].float()
    if frame == "published":
        side = hi - lo
        c0 = (lo + hi) / 2 - 0.5 - side / 2
        lo, hi = c0, c0 + side
    start = torch.floor(lo / stride).long()
    end = torch.ceil(hi / stride).long()
    start = torch.minimum(torch.clamp(start, min=0), sizes - 1)
    end = torch.maximum(torch.minimum(end, sizes), start + 1)
    return torch.cat((start, end), dim=1)


def crop_and_pool(
    features: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    stride: int,
    crop_size: int,
    frame: str = "published",
    max_region: int | None = None,
) -> Tensor:
    """Max-pool the feature region under each box to ``[N, C, crop_size, crop_size, crop_size]`` in one batched op.

    ``features`` is ``[B, C, Z, Y, X]`` at ``stride``; ``batch_index[i]`` says which image box ``i`` is in.
    Same bins as ``F.adaptive_max_pool3d`` (the published op): bin ``i`` of a length-``L`` axis is
    ``[floor(i*L/k), ceil((i+1)*L/k))``; see :func:`roi_adaptive_max_pool3d`. ``max_region`` bounds the region
    length on every axis when the caller knows it (prediction passes the measured one, which keeps the lookup
    tables small); the default, the map size, needs no look at the boxes, so a training step never waits on them.
    """
    ranges = feature_crop_ranges(boxes, stride, tuple(features.shape[2:]), frame)
    return roi_adaptive_max_pool3d(features, ranges, batch_index.to(features.device), crop_size, max_region)


def _max_bin_width(length: int, bins: int) -> int:
    return max(-((-(i + 1) * length) // bins) - (i * length) // bins for i in range(bins))


def _table_widths(max_width: int) -> list[int]:
    """Sliding-maximum widths (ascending, from 1) such that every bin width ``w <= max_width`` has a table width
    ``h`` with ``h <= w <= 2h``: its maximum is then that of two overlapping lookups, ``T_h[lo]`` and
    ``T_h[hi - h]``. Chosen top-down (``h = ceil(need / 2)``), which needs fewer tables than powers of two: bins
    up to 6 wide (a 32-voxel map, 7 bins) take widths {1, 3}, 2 per axis and 8 tables in 3-D, not 27."""
    widths, need = [], max_width
    while need >= 1:
        widths.append(max(1, -(-need // 2)))
        need = widths[-1] - 1
    return sorted(set(widths))


# Elements of one chunk of lookup tables (values + int32 indices, ~8 bytes each): bounds the transient memory.
_TABLE_CHUNK_ELEMENTS = 1 << 26


def roi_adaptive_max_pool3d(
    features: Tensor, ranges: Tensor, batch_index: Tensor, bins: int, max_region: int | None = None
) -> Tensor:
    """Exact ``adaptive_max_pool3d`` of the regions ``ranges [N, 6]`` (feature voxels, end exclusive) of
    ``features [B, C, Z, Y, X]`` to ``[N, C, bins, bins, bins]``, for all regions at once with static shapes.

    How: every bin is an axis-aligned box of width ``w <= W`` per axis (``W`` from the largest possible region).
    A range maximum over ``[p, p + w)`` equals ``max(T_h[p], T_h[p + w - h])`` for a sliding maximum ``T_h`` of
    width ``h`` with ``h <= w <= 2h`` (a sparse table, as in range-minimum queries; widths from
    :func:`_table_widths`), so with the tables of the 3-D sliding maxima every bin is the maximum of 8 table
    lookups. Building the tables is a few dozen whole-map ``maximum`` ops, the lookups are one gather for all
    regions: no per-region slices, no host round trip (the old per-proposal slicing issued ~35,000 tensor calls
    per tiny-network training step). Values equal ``F.adaptive_max_pool3d`` bit for bit, and so does the
    gradient (it reaches each bin's arg-max voxel; see :func:`_pool_from_tables` for exact ties).
    """
    n = ranges.shape[0]
    b_size, channels = features.shape[:2]
    spatial = tuple(int(s) for s in features.shape[2:])
    if n == 0:
        return features.new_zeros((0, channels, bins, bins, bins))
    limit = [s if max_region is None else max(1, min(s, max_region)) for s in spatial]
    widths = [_table_widths(max(_max_bin_width(length, bins) for length in range(1, lim + 1))) for lim in limit]
    lookups = _bin_lookups(ranges, bins, widths, spatial)
    pooled = _pool_from_tables(features, batch_index, lookups, widths)
    return pooled.permute(0, 2, 1).reshape(n, channels, bins, bins, bins)


def _bin_lookups(ranges: Tensor, bins: int, widths: list[list[int]], spatial: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per region and bin: the table number ``[N, bins^3]`` and the 8 flat positions ``[8, N, bins^3]``."""
    i = torch.arange(bins, device=ranges.device)
    tables = None
    corners: list[Tensor] = []
    for axis in range(3):
        start, length = ranges[:, axis, None], (ranges[:, axis + 3] - ranges[:, axis])[:, None]
        lo = start + torch.div(i * length, bins, rounding_mode="floor")
        hi = start - torch.div(-(i + 1) * length, bins, rounding_mode="floor")
        width = hi - lo
        level = torch.zeros_like(width)
        for h in widths[axis][1:]:
            level += (width >= h).long()  # the widest table not wider than the bin
        table_width = torch.tensor(widths[axis], device=ranges.device)[level]
        tables = level if tables is None else tables[..., None] * len(widths[axis]) + level[:, None, :]
        corners.append(torch.stack((lo, hi - table_width)))  # [2, N, bins]
        if axis == 1:
            tables = tables.flatten(1)
    assert tables is not None
    tables = tables.flatten(1)
    sy, sx = spatial[1] * spatial[2], spatial[2]
    cz, cy, cx = corners
    pos = (cz[:, None, None, :, :, None, None] * sy + cy[None, :, None, :, None, :, None] * sx
           + cx[None, None, :, :, None, None, :])  # [2, 2, 2, N, bins, bins, bins]
    return tables, pos.reshape(8, ranges.shape[0], -1)


def _widen(values: Tensor, dim: int, have: int, want: int) -> Tensor:
    """Sliding maximum of width ``want`` along ``dim`` from one of width ``have`` (positions past the end repeat
    the last one; lookups never read a window that runs past the map)."""
    size = values.shape[dim]
    while have < want:
        shift = min(have, want - have)
        ahead = torch.clamp(torch.arange(shift, size + shift, device=values.device), max=size - 1)
        values = torch.maximum(values, values.index_select(dim, ahead))
        have += shift
    return values


def _build_tables(features: Tensor, widths: list[list[int]]) -> Tensor:
    """``[T * B * Z*Y*X, C]`` sliding-maximum tables (T = product of the widths' counts, z slowest; rows of C)."""
    c = features.shape[1]
    current = [features.permute(0, 2, 3, 4, 1)]  # [B, Z, Y, X, C]: a lookup reads one C-long row
    for axis in range(3):  # after the loop: table (lz, ly, lx) at lz*Ly*Lx + ly*Lx + lx
        grown = []
        for values in current:
            per_width = [values]
            for have, want in zip(widths[axis], widths[axis][1:]):
                per_width.append(_widen(per_width[-1], axis + 1, have, want))
            grown.extend(per_width)
        current = grown
    return torch.stack(current).reshape(-1, c)


def _pool_from_tables(features: Tensor, batch_index: Tensor, lookups: tuple[Tensor, Tensor],
                      widths: list[list[int]]) -> Tensor:
    """``[N, bins^3, C]`` pooled maxima: per bin the max of its 8 table lookups. Plain differentiable ops, so
    autograd routes the gradient back through the lookups and the ``maximum``s to the arg-max voxels (an exact
    tie of two different voxels shares it, as ``amax`` does; in practice only ReLU zeros tie, and the ReLU drops
    their gradient)."""
    tables, positions = lookups
    b, c = features.shape[:2]
    zyx = features.shape[2] * features.shape[3] * features.shape[4]
    n, cells = tables.shape
    n_tables = len(widths[0]) * len(widths[1]) * len(widths[2])
    rows_base = (tables * b + batch_index[:, None]) * zyx  # row of (table, image, position 0)
    per_chunk = max(1, _TABLE_CHUNK_ELEMENTS // max(1, n_tables * b * zyx))
    rows = (rows_base[None] + positions).flatten()
    out = []
    for c0 in range(0, c, per_chunk):
        values = _build_tables(features[:, c0 : c0 + per_chunk], widths)
        # One gather for the 8 corners (its backward is one scatter into the tables, not eight).
        corners = values.index_select(0, rows)
        out.append(corners.view(8, n * cells, -1).amax(dim=0))
    return (torch.cat(out, dim=1) if len(out) > 1 else out[0]).view(n, cells, c)


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
