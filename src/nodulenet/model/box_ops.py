"""3-D box operations: volume, IoU, NMS, clipping, format conversion.

Box format
----------
Every function here takes boxes as ``(z0, y0, x0, z1, y1, x1)`` ("zyxzyx", :attr:`BoxMode.ZYXZYX`):
float tensors of shape ``[N, 6]`` in voxels of the array they index, ``z1`` exclusive. Voxel ``i``
occupies the continuous interval ``[i, i + 1)``, so the box ``(2, 0, 0, 5, 1, 1)`` covers slices
2, 3 and 4, has depth 3 and centre ``z = 3.5``. Sizes are ``z1 - z0`` (no ``+ 1``), as in the
published NoduleNet overlap code, which works on continuous centre/size boxes.

The published code stores boxes as centre + size ``(z, y, x, d, h, w)`` with the centre in
voxel-*index* coordinates (the centre of voxel ``i`` is at ``i``, see ``masks2bboxes_masks`` in
``uci-cbcl/NoduleNet``): :attr:`BoxMode.ZYXDHW_INDEX`. Its centres are therefore ours minus 0.5.
IoU, NMS and the box coder are translation invariant, so they agree with the published ones whichever
frame is used, as long as anchors and ground truth share it.

Precision
---------
IoU and NMS compute in float32 (float64 if given float64) whatever the input dtype: under autocast the
network may hand over bf16/fp16 boxes, and bf16 keeps ~3 significant digits (a coordinate of 300 is
only known to +-1 voxel) while fp16 overflows box volumes above 65504 (a 41^3 box). Either would flip
IoU comparisons near the thresholds (0.1, 0.5) that decide suppression and training labels.

All functions are device-agnostic (CPU or CUDA; no host copies in the hot paths) and never read files.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

__all__ = [
    "BoxMode",
    "convert",
    "box_volume",
    "box_iou_3d",
    "nms_3d",
    "batched_nms_3d",
    "clip_boxes_3d",
    "remove_small_boxes",
]

# NMS decides sorted boxes this many at a time: the in-block greedy pass works on a [block, block] bool
# matrix, cheap enough (256 KiB) to iterate on, while the block count (and so the number of Python
# iterations and device syncs) stays at most N/512.
_NMS_BLOCK = 512
# Fixed-point steps tried inside a block before finishing it sequentially (see _greedy_keep_in_block).
_FIXED_POINT_STEPS = 8
# Upper bound on elements of one pairwise IoU tile ([rows, cols] plus ~6 temporaries of that size).
_IOU_TILE_ELEMENTS = 1 << 21


class BoxMode(enum.Enum):
    """Layout of the 6 numbers of a 3-D box (detectron2-style). Axis order is always z, y, x."""

    #: ``(z0, y0, x0, z1, y1, x1)``; corners, ``z1`` exclusive; voxel ``i`` spans ``[i, i + 1)``.
    ZYXZYX = "zyxzyx"
    #: ``(z, y, x, d, h, w)``; centre and size in the same frame as ZYXZYX (voxel ``i``'s centre is ``i + 0.5``).
    ZYXDHW = "zyxdhw"
    #: ``(z, y, x, d, h, w)`` with the centre in voxel-index coordinates (voxel ``i``'s centre is ``i``), the
    #: convention of the published NoduleNet labels and outputs. Centre = ZYXDHW centre - 0.5.
    ZYXDHW_INDEX = "zyxdhw_index"

    @staticmethod
    def convert(boxes: Tensor, from_mode: "BoxMode", to_mode: "BoxMode") -> Tensor:
        """Same as :func:`convert`."""
        return convert(boxes, from_mode, to_mode)


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 6:
        raise ValueError(f"{name} must have shape [N, 6], got {tuple(boxes.shape)}")


def _compute_dtype(boxes: Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (bf16, fp16, ints) computes in float32 (see module doc)."""
    return torch.float64 if boxes.dtype == torch.float64 else torch.float32


def convert(boxes: Tensor, from_mode: BoxMode, to_mode: BoxMode) -> Tensor:
    """Convert ``[N, 6]`` boxes between :class:`BoxMode` layouts. Returns a new tensor (dtype kept)."""
    _check_boxes(boxes)
    if from_mode == to_mode:
        return boxes.clone()
    if from_mode == BoxMode.ZYXZYX:
        lo, hi = boxes[:, :3], boxes[:, 3:]
        centre, size = (lo + hi) / 2, hi - lo
    else:
        centre, size = boxes[:, :3], boxes[:, 3:]
        if from_mode == BoxMode.ZYXDHW_INDEX:
            centre = centre + 0.5
    if to_mode == BoxMode.ZYXZYX:
        return torch.cat([centre - size / 2, centre + size / 2], dim=1)
    if to_mode == BoxMode.ZYXDHW_INDEX:
        centre = centre - 0.5
    return torch.cat([centre, size], dim=1)


def box_volume(boxes: Tensor) -> Tensor:
    """Volume in voxels of ``[N, 6]`` zyxzyx boxes -> ``[N]``; inverted sides count as 0, not negative."""
    _check_boxes(boxes)
    return (boxes[:, 3:] - boxes[:, :3]).clamp(min=0).prod(dim=1)


def _pairwise_iou(a: Tensor, b: Tensor, vol_a: Tensor, vol_b: Tensor) -> Tensor:
    """IoU ``[len(a), len(b)]`` of zyxzyx boxes already in the compute dtype, volumes precomputed."""
    lo = torch.maximum(a[:, None, :3], b[None, :, :3])
    hi = torch.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = (hi - lo).clamp_(min=0).prod(dim=2)
    union = vol_a[:, None] + vol_b[None, :] - inter
    # union == 0 only when both boxes are empty; define that IoU as 0 instead of 0/0 = NaN.
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def box_iou_3d(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise IoU of zyxzyx boxes ``a[N, 6]`` and ``b[M, 6]`` -> ``[N, M]`` float32 (float64 if given).

    Zero-size (or inverted) boxes have IoU 0 with everything, themselves included; never NaN.
    """
    _check_boxes(boxes_a, "boxes_a")
    _check_boxes(boxes_b, "boxes_b")
    dtype = torch.promote_types(_compute_dtype(boxes_a), _compute_dtype(boxes_b))
    a, b = boxes_a.to(dtype), boxes_b.to(dtype)
    return _pairwise_iou(a, b, box_volume(a), box_volume(b))


def _overlap_exceeds(a: Tensor, b: Tensor, vol_a: Tensor, vol_b: Tensor, iou_threshold: float) -> Tensor:
    """Bool ``[len(a), len(b)]``: IoU > threshold, without forming the IoU.

    ``inter / (va + vb - inter) > t``  <=>  ``inter * (1 + t) > t * (va + vb)`` for a non-negative union,
    which saves the division and the empty-union special case (both sides are 0 there, so False). Each
    axis is handled as its own [rows, cols] tensor, with in-place products, so no [rows, cols, 3]
    temporaries are made.
    """
    inter = None
    for axis in range(3):
        hi = torch.minimum(a[:, None, axis + 3], b[None, :, axis + 3])
        lo = torch.maximum(a[:, None, axis], b[None, :, axis])
        length = (hi - lo).clamp_(min=0)
        inter = length if inter is None else inter.mul_(length)
    assert inter is not None
    return inter.mul_(1.0 + iou_threshold) > (vol_a[:, None] + vol_b[None, :]).mul_(iou_threshold)


def _greedy_keep_in_block(overlaps: Tensor) -> Tensor:
    """Greedy keep-mask for score-sorted boxes given ``overlaps[i, j]`` (IoU > threshold, only ``i < j`` set).

    Solves ``keep[j] = not any(keep[i] and overlaps[i, j])`` by fixed-point iteration on the whole vector.
    After each step, the prefix on which two consecutive iterates agree is final (its entries depend only
    on earlier ones), so if a long suppression chain (boxes each overlapping only the next, e.g. a row of
    sliding windows) has not converged after ``_FIXED_POINT_STEPS`` steps, the rest is finished with the
    plain sequential pass from that prefix on, on the CPU copy of this small matrix.
    """
    size = overlaps.shape[0]
    keep = torch.ones(size, dtype=torch.bool, device=overlaps.device)
    for _ in range(_FIXED_POINT_STEPS):
        # A box survives if no *surviving* higher-ranked box overlaps it.
        next_keep = ~(overlaps & keep[:, None]).any(dim=0)
        if torch.equal(next_keep, keep):
            return keep
        differs = torch.nonzero(next_keep != keep)
        settled = int(differs[0, 0])
        keep = next_keep
    # Entries before `settled` are final; recompute the rest one box at a time.
    matrix = overlaps.cpu()
    result = keep.cpu().clone()
    result[settled:] = ~(matrix[:settled, settled:] & result[:settled, None]).any(dim=0)
    for j in range(settled, size - 1):
        if result[j]:
            result[j + 1:] &= ~matrix[j, j + 1:]
    return result.to(overlaps.device)


def nms_3d(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression of zyxzyx boxes.

    Returns the indices (LongTensor ``[K]``, on ``boxes.device``) of the boxes kept, by descending score;
    equal scores keep their input order. A box is suppressed when its IoU with a kept, higher-ranked box
    is strictly greater than ``iou_threshold`` (as in the published ``py_nms``: boxes with IoU <= threshold
    survive). The result equals the textbook one-box-at-a-time greedy loop exactly.

    How it stays fast without a compiled kernel: boxes are sorted by score and the still-undecided ones
    are taken 512 at a time. Inside such a block the greedy decision is the unique solution of
    ``keep[j] = not any(keep[i] and overlap[i, j] for i < j)``; ``overlap`` restricted to ``i < j`` is
    strictly upper-triangular, so iterating that equation on the whole vector (one [512, 512] bool op per
    step) reaches the solution in at most "longest suppression chain" steps, typically a handful, and we
    stop at the first fixed point. The block's kept boxes then remove every later undecided box they
    overlap (IoU tiles of bounded size, so memory never grows as N^2), exactly as the textbook loop would,
    and removed boxes are never looked at again. Python loops run per block and per chain step, not per
    box (except the rare sequential finish of a very long chain, see ``_greedy_keep_in_block``), so a CUDA
    tensor sees a few syncs per block rather than one per box. Work is O(kept x undecided): fast for the
    clustered boxes an RPN produces, slowest for many small, scattered boxes that nearly all survive.
    """
    _check_boxes(boxes)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)

    dtype = _compute_dtype(boxes)
    order = torch.argsort(scores.detach().to(_compute_dtype(scores)), descending=True, stable=True)
    sorted_boxes = boxes.detach().to(dtype)[order]
    volumes = box_volume(sorted_boxes)

    undecided = torch.arange(boxes.shape[0], device=boxes.device)  # positions in score order
    kept_blocks: list[Tensor] = []
    while undecided.numel() > 0:
        block, rest = undecided[:_NMS_BLOCK], undecided[_NMS_BLOCK:]
        block_boxes, block_vol = sorted_boxes[block], volumes[block]
        overlaps = torch.triu(
            _overlap_exceeds(block_boxes, block_boxes, block_vol, block_vol, iou_threshold), diagonal=1
        )
        kept = block[_greedy_keep_in_block(overlaps)]
        kept_blocks.append(kept)
        if rest.numel() == 0:
            break
        kept_boxes, kept_vol = sorted_boxes[kept], volumes[kept]
        cols_per_tile = max(1, _IOU_TILE_ELEMENTS // max(1, kept.shape[0]))
        hit_tiles = [
            _overlap_exceeds(
                kept_boxes, sorted_boxes[cols], kept_vol, volumes[cols], iou_threshold
            ).any(dim=0)
            for cols in torch.split(rest, cols_per_tile)
        ]
        undecided = rest[~torch.cat(hit_tiles)]

    return order[torch.cat(kept_blocks)]


def batched_nms_3d(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per value of ``idxs`` (batch index or class) -> kept indices by descending score.

    Boxes are zyxzyx. Implemented by the coordinate-offset trick: each group is shifted along all axes by
    ``idx * (extent + 1)`` so boxes of different groups can never overlap, then one :func:`nms_3d` runs.
    The shift is applied after subtracting the global minimum so float32 keeps sub-voxel precision.
    """
    _check_boxes(boxes)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs must have shape [{boxes.shape[0]}], got {tuple(idxs.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    dtype = _compute_dtype(boxes)
    as_float = boxes.detach().to(dtype)
    low = as_float.min()
    extent = as_float.max() - low
    offsets = idxs.to(dtype) * (extent + 1)
    shifted = as_float - low + offsets[:, None]
    return nms_3d(shifted, scores, iou_threshold)


def clip_boxes_3d(boxes: Tensor, shape_zyx: tuple[int, int, int] | torch.Size) -> Tensor:
    """Clip zyxzyx boxes to the volume ``[0, D) x [0, H) x [0, W)``: corners clamped to ``[0, size]``.

    A box entirely outside becomes zero-size (IoU 0, removed by :func:`remove_small_boxes`).
    Returns a new tensor of the input dtype.
    """
    _check_boxes(boxes)
    if len(shape_zyx) != 3:
        raise ValueError(f"shape_zyx must have 3 entries (z, y, x), got {tuple(shape_zyx)}")
    upper = torch.tensor([float(s) for s in shape_zyx] * 2, dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), upper)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (LongTensor) of zyxzyx boxes whose depth, height and width are all >= ``min_size`` voxels."""
    _check_boxes(boxes)
    sizes = boxes[:, 3:] - boxes[:, :3]
    return torch.nonzero((sizes >= min_size).all(dim=1)).squeeze(1)


# Largest [B, N, N] survival matrix nms_batched_top_k precomputes (1 byte each, built in row chunks of
# _NMS_MATRIX_CHUNK pairs); above it, IoUs per round. With the matrix a round is 4 tensor calls, without it 13.
# A GPU builds even the tiny network's training matrix (batch 16 x 6,000^2 = 576 M pairs) in milliseconds; one CPU
# core needs ~37 s for it (measured), and ~10 s for the published batch's 144 M pairs (its step went from 1.03 to
# 1.18 x the old step's time), against ~0.15 s for 300 rounds of per-round IoUs at batch 16: hence a limit per
# device.
_NMS_MATRIX_ELEMENTS = 1 << 25
_NMS_MATRIX_ELEMENTS_CUDA = 1 << 31
# With the matrix and fewer blocks of candidates than kept slots (N / _NMS_SCAN_BLOCK < k), the greedy pass instead
# scans the candidates this many at a time through lookup tables over the 2^block alive patterns (one byte):
# N / block steps of 6 calls, not k rounds of 4.
_NMS_SCAN_BLOCK = 8
_NMS_MATRIX_CHUNK = 1 << 24


def box_iou_batched(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU ``[B, N, M]`` of zyxzyx boxes ``a[B, N, 6]`` and ``b[B, M, 6]`` image by image (padding rows of zero
    size have IoU 0 with everything), float32 (float64 if given); the batched form of :func:`box_iou_3d`."""
    dtype = torch.promote_types(_compute_dtype(boxes_a), _compute_dtype(boxes_b))
    a, b = boxes_a.to(dtype), boxes_b.to(dtype)
    lo = torch.maximum(a[:, :, None, :3], b[:, None, :, :3])
    hi = torch.minimum(a[:, :, None, 3:], b[:, None, :, 3:])
    inter = (hi - lo).clamp_(min=0).prod(dim=3)
    vol_a = (a[..., 3:] - a[..., :3]).clamp(min=0).prod(dim=-1)
    vol_b = (b[..., 3:] - b[..., :3]).clamp(min=0).prod(dim=-1)
    union = vol_a[:, :, None] + vol_b[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def nms_batched_top_k(boxes: Tensor, valid: Tensor, iou_threshold: float, k: int) -> tuple[Tensor, Tensor]:
    """Greedy NMS of every image of a batch at once, with static shapes: the first ``k`` kept boxes.

    ``boxes [B, N, 6]`` zyxzyx, ALREADY SORTED by decreasing score (equal scores in the order wanted), ``valid
    [B, N]`` marks real candidates, which come first in each image (as sorting by score with padding at -1 puts
    them). Returns ``index [B, k]`` (positions in ``boxes``) and ``kept [B, k]`` (False
    for slots after an image's last kept box), the same boxes in the same order as :func:`nms_3d` truncated to
    ``k`` (suppression when IoU > threshold). Cost: ``k`` rounds of a few ``[B, N]`` ops - the greedy rule is
    sequential in the kept boxes, and an exact greedy NMS cannot stop early without reading a value back - and
    never a host round trip, so a GPU runs it without waiting. The images are one leading batch dimension of
    every call, so the number of calls does not depend on ``B``. While ``B * N * N`` fits
    ``_NMS_MATRIX_ELEMENTS`` (``_NMS_MATRIX_ELEMENTS_CUDA`` on a GPU) the pairwise survival matrix is built once
    and a round is 4 tensor calls (pick, index arithmetic, take a row, AND); above it 13 (:func:`_greedy_rounds`).
    """
    b, n = valid.shape
    dtype = _compute_dtype(boxes)
    if n == 0 or k == 0:
        return torch.zeros((b, k), dtype=torch.long, device=boxes.device), torch.zeros((b, k), dtype=torch.bool,
                                                                                       device=boxes.device)
    flat = boxes.detach().to(dtype).reshape(b, n, 6)
    limit = _NMS_MATRIX_ELEMENTS_CUDA if boxes.device.type == "cuda" else _NMS_MATRIX_ELEMENTS
    if b * n * n > limit:
        return _greedy_rounds(flat, valid, iou_threshold, k)
    lo, hi = flat[..., :3], flat[..., 3:]
    volume = (hi - lo).clamp(min=0).prod(dim=2)  # as box_volume
    image = torch.arange(b, device=boxes.device)
    rounds = min(k, n)
    picks = []
    # The whole survival matrix (uint8: argmax takes no bool), in row chunks that bound the float temporaries;
    # then a round is a pick and one row gather + AND.
    survives = torch.empty((b, n, n), dtype=torch.uint8, device=boxes.device)
    rows = max(1, _NMS_MATRIX_CHUNK // (b * n))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        inter = (torch.minimum(hi[:, r0:r1, None], hi[:, None]) - torch.maximum(lo[:, r0:r1, None], lo[:, None])
                 ).clamp_(min=0).prod(dim=3)
        # IoU > t  <=>  inter * (1 + t) > (v_a + v_b) * t, in the float operations of nms_3d's _overlap_exceeds
        # (t * v_a + t * v_b rounds differently: an IoU of exactly t could go either way).
        torch.le(inter.mul_(1.0 + iou_threshold), (volume[:, r0:r1, None] + volume[:, None]).mul_(iou_threshold),
                 out=survives[:, r0:r1])
    survives.diagonal(dim1=1, dim2=2).zero_()  # a box always removes itself, zero-volume ones included
    blocks = -(-n // _NMS_SCAN_BLOCK)
    if blocks < rounds and b * blocks * blocks << _NMS_SCAN_BLOCK <= limit:
        return _first_kept(_scan_keep(survives, valid), k)
    # A round: pick, one take of the pick's row (flat positions in a fixed buffer), AND; 4 calls.
    alive = valid.to(torch.uint8)
    flat_survives = survives.view(-1)
    row_start = (image * (n * n))[:, None] + torch.arange(n, device=boxes.device)
    row_index, row = torch.empty_like(row_start), torch.empty_like(alive)
    for _ in range(rounds):
        pick = alive.argmax(dim=1, keepdim=True)  # first alive = highest remaining score
        picks.append(pick)
        alive.bitwise_and_(torch.take(flat_survives, torch.add(row_start, pick, alpha=n, out=row_index), out=row))
    index = torch.cat(picks, dim=1)
    # Whether a round kept a box, read off the picks: the first pick is kept iff the best box is valid, a later
    # one iff it is not position 0 (position 0 is the first pick; argmax of an all-dead row returns 0).
    keep = torch.cat((valid[:, :1], index[:, 1:] > 0), dim=1)
    if k > n:
        index = torch.cat((index, index.new_zeros((b, k - n))), dim=1)
        keep = torch.cat((keep, keep.new_zeros((b, k - n))), dim=1)
    return index, keep


def _greedy_rounds(boxes: Tensor, valid: Tensor, iou_threshold: float, k: int) -> tuple[Tensor, Tensor]:
    """:func:`nms_batched_top_k` without the survival matrix: ``min(k, N)`` rounds, each comparing the pick of
    every image with all of that image's candidates in 13 tensor calls, none of them allocating a ``[B, N]`` tensor.

    ``boxes [B, N, 6]`` score-sorted, in the compute dtype. Nothing is sliced or allocated inside the loop: the
    pick's row (hi, -lo, volume) comes from one flat table by one ``take`` into a fixed buffer, and every operand
    is a view, made once, of a buffer that each call writes with ``out=``. The columns are component-major
    (``[B, 6, N]``), so each call is one long contiguous loop: on one CPU core the rounds take ~1/3 of the time of
    per-round ``[B, N, 6]`` temporaries (whose fresh pages cost more than the arithmetic). One ``minimum`` gives
    ``min(hi)`` and ``-max(lo)`` (negation is exact), one add their difference; the test is nms_3d's own,
    operation for operation: a box survives when ``inter * (1 + t) <= (v_a + v_b) * t``.

    A pick removes itself by its IoU of 1 with itself when ``t < 0.5`` (``1 + t`` and ``2t`` differ by far more
    than rounding); boxes of zero volume, which overlap nothing, would not, so they never enter the rounds: being
    never suppressed, they are all kept, merged into the keep mask at the end (each round keeps a box of positive
    volume while any is alive, so ``min(k, N)`` rounds still find the first ``k`` of the merged order). For
    ``t >= 0.5`` each round also clears its pick explicitly."""
    b, n = valid.shape
    device, dtype = boxes.device, boxes.dtype
    hi_neglo = torch.cat((boxes[..., 3:], -boxes[..., :3]), dim=2)  # [B, N, 6]
    columns = hi_neglo.transpose(1, 2).contiguous()  # [B, 6, N]
    sides = columns[:, :3] + columns[:, 3:]
    sides.clamp_min_(0)
    sides_z, sides_y, sides_x = sides.unbind(1)
    volume = (boxes[..., 3:] - boxes[..., :3]).clamp(min=0).prod(dim=2)  # as box_volume and the matrix path
    table = torch.cat((hi_neglo, volume[..., None]), dim=2).reshape(-1)  # [B * N * 7]
    row_start = (torch.arange(b, device=device) * (7 * n))[:, None] + torch.arange(7, device=device)
    row_index = torch.empty_like(row_start)
    row = torch.empty((b, 7), dtype=dtype, device=device)
    row_box, row_volume = row[:, :6, None], row[:, 6:]
    bounds = torch.empty_like(columns)
    bounds_hi, bounds_neglo = bounds[:, :3], bounds[:, 3:]
    inter, limit = torch.empty_like(volume), torch.empty_like(volume)
    survives = torch.empty((b, n), dtype=torch.bool, device=device)
    factor, threshold = (torch.tensor(x, dtype=dtype, device=device) for x in (1.0 + iou_threshold, iou_threshold))
    solid = volume > 0
    alive = valid & solid
    alive_bytes = alive.view(torch.uint8)  # argmax takes no bool; same storage
    picks = []
    for _ in range(min(k, n)):
        pick = alive_bytes.argmax(dim=1, keepdim=True)  # first alive = highest remaining score; [B, 1]
        picks.append(pick)
        torch.take(table, torch.add(row_start, pick, alpha=7, out=row_index), out=row)
        torch.minimum(columns, row_box, out=bounds)
        torch.add(bounds_hi, bounds_neglo, out=sides).clamp_min_(0)
        torch.mul(sides_z, sides_y, out=inter).mul_(sides_x).mul_(factor)
        torch.add(volume, row_volume, out=limit).mul_(threshold)
        alive.bitwise_and_(torch.le(inter, limit, out=survives))
        if iou_threshold >= 0.5:
            alive.scatter_(1, pick, False)
    index = torch.cat(picks, dim=1)
    # A round kept a box iff its pick was alive: the first iff that box is; a later one iff it is not position 0
    # (position 0 is the first pick or never alive; argmax of an all-dead row returns 0).
    first = index[:, :1]
    kept_pick = torch.cat(((valid & solid).gather(1, first), index[:, 1:] > 0), dim=1)
    keep = torch.zeros((b, n + 1), dtype=torch.bool, device=device)
    keep.scatter_(1, torch.where(kept_pick, index, n), True)  # column n collects the rounds that kept nothing
    return _first_kept(keep[:, :n] | (valid & ~solid), k)


def _scan_keep(survives: Tensor, valid: Tensor) -> Tensor:
    """Greedy keep mask ``[B, N]`` from the survival matrix (``survives[b, i, j]`` = 1 when ``j`` survives a kept
    ``i``, diagonal 0) of score-sorted candidates, ``_NMS_SCAN_BLOCK`` (m = 8) candidates per step.

    The state is one byte per block of m consecutive candidates: the pattern of which of them are still alive.
    For every block and each of the 2^m patterns it can have on entry, the in-block greedy result (which members
    are kept: m steps over ``[B, N/m, 2^m]``) and, for every block, the AND of the kept members' survival bits
    (``[B, N/m, 2^m, N/m]`` bytes) are tabulated up front; a scan step then reads its block's pattern and ANDs
    the looked-up bytes into all patterns: the one-box-at-a-time loop, in N/m steps of 6 tensor calls, with the
    step's positions in fixed index buffers that one add moves on (no slicing in the loop). Entries for the block
    itself and earlier ones are all ones, so each block keeps its pattern on entry, and the kept members are read
    off the final patterns at once."""
    b, n = valid.shape
    m = _NMS_SCAN_BLOCK
    device = valid.device
    pad = (-n) % m
    if pad:  # padding candidates: never alive, suppress nothing
        survives = torch.nn.functional.pad(survives, (0, pad, 0, pad), value=1)
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    blocks, size = (n + pad) // m, n + pad
    member = torch.arange(m, device=device)
    weights = (1 << member).to(torch.uint8)
    # packed[b, i, c]: which members of block c survive candidate i, member r at bit r.
    packed = (survives.view(b, size, blocks, m) * weights).sum(dim=3, dtype=torch.uint8).view(b, blocks, m, blocks)
    block = torch.arange(blocks, device=device)
    # A step leaves its own and earlier blocks' patterns alone (each block keeps its pattern on entry).
    packed.masked_fill_((block[None, :] <= block[:, None])[None, :, None, :], 255)
    # suppressors[b, j, i]: the earlier members of block j that remove its member i, as bits.
    inner = torch.diagonal(survives.view(b, blocks, m, blocks, m), dim1=1, dim2=3).permute(0, 3, 1, 2)  # [b,nb,e,i]
    earlier = member[:, None] < member[None, :]
    suppressors = ((inner == 0) & earlier).to(torch.uint8).mul_(weights[:, None]).sum(dim=2, dtype=torch.uint8)
    patterns = torch.arange(1 << m, device=device)
    kept = torch.zeros((b, blocks, 1 << m), dtype=torch.uint8, device=device)  # kept members per entry pattern
    masks = torch.full((b, blocks, 1 << m, blocks), 255, dtype=torch.uint8, device=device)
    survivors, not_kept = torch.empty_like(masks), torch.empty_like(kept)
    zero, full = torch.tensor(0, dtype=torch.uint8, device=device), torch.tensor(255, dtype=torch.uint8, device=device)
    # Member i's operands as views made once (unbind), and 0-dim constants: no slicing or scalar wrapping per i.
    for alive_on_entry, removed_by, member_bit, rows in zip(
            ((patterns[:, None] >> member) & 1).bool().unbind(1), suppressors[..., None].unbind(2),
            weights.unbind(0), packed[:, :, :, None, :].unbind(2)):
        # Member i is kept if alive on entry and no kept earlier member removes it.
        kept_i = torch.eq(torch.bitwise_and(kept, removed_by), zero).bitwise_and_(alive_on_entry)
        kept.bitwise_or_(torch.where(kept_i, member_bit, zero))
        # AND in its survival bits where it is kept: bits | 255 elsewhere (byte ops; a where here costs 7x more).
        torch.where(kept_i, zero, full, out=not_kept)
        masks.bitwise_and_(torch.bitwise_or(rows, not_kept[..., None], out=survivors))
    state = (valid.view(b, blocks, m).to(torch.uint8) * weights).sum(dim=2, dtype=torch.uint8)
    # positions[:, 0]: the step's block in the flat state; positions[:, 1:]: its masks for pattern 0 in the flat
    # table. Both start one step early: each step begins by moving them on.
    image_block = (torch.arange(b, device=device) * blocks - 1)[:, None]
    positions = torch.cat((image_block, (image_block << m) * blocks + block), dim=1)
    step = torch.tensor([1] + [blocks << m] * blocks, device=device)
    at_block, at_masks = positions[:, :1], positions[:, 1:]
    flat_state, flat_masks = state.view(-1), masks.view(-1)
    pattern, pattern_long = torch.empty((b, 1), dtype=torch.uint8, device=device), torch.empty_like(at_block)
    index, looked_up = torch.empty_like(at_masks), torch.empty_like(state)
    for _ in range(blocks):
        positions.add_(step)
        torch.take(flat_state, at_block, out=pattern)
        pattern_long.copy_(pattern)  # one copy_: an add of uint8 to int64 would convert through a temporary
        torch.take(flat_masks, torch.add(at_masks, pattern_long, alpha=blocks, out=index), out=looked_up)
        state.bitwise_and_(looked_up)
    kept_bits = kept.gather(2, state[..., None].long()).squeeze(2)  # [B, blocks]
    return ((kept_bits[..., None] >> member) & 1).view(b, size)[:, :n].bool()


def _first_kept(keep: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(index [B, k], kept [B, k])`` of :func:`nms_batched_top_k` from a keep mask ``[B, N]``: the first ``k`` kept
    positions in order, then 0 with ``kept`` False (as the picking rounds leave them)."""
    b, n = keep.shape
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    slots = torch.arange(order.shape[1], device=keep.device)
    kept = slots[None, :] < keep.sum(dim=1, keepdim=True)
    index = torch.where(kept, order, 0)
    if k > n:
        index = torch.cat((index, index.new_zeros((b, k - n))), dim=1)
        kept = torch.cat((kept, kept.new_zeros((b, k - n))), dim=1)
    return index, kept
