"""Mask head: per detection, a small U-Net decoder over the detection's crop of comb2, out1 and the image.

Boxes are ``(z0, y0, x0, z1, y1, x1)`` in (padded) input voxels, end exclusive. Each detection box is turned into
an integer CROP BOX extended outwards to multiples of 4 (the published ``ext2factor(4)``) and clipped to the image,
so its stride-4 and stride-2 crops are whole feature voxels and two 2x up-samplings land exactly on the image crop.

Outputs stay CROP-LOCAL: one logit volume per detection with the shape of its crop box, plus the crop boxes.
The published code pastes every detection's logits into a full-size volume, which at ~170 detections on a whole
scan is 170 x 208x320x320 floats (14 GB) - it runs out of memory; a crop is a few thousand voxels.

Also here: :func:`mask_nms`, the published mask-IoU suppression of final detections, computed on the crops (two
masks can only overlap inside the intersection of their crop boxes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .box_ops import box_iou_3d


def mask_crop_boxes(
    boxes: Tensor, image_shape_zyx: tuple[int, int, int], multiple: int = 4, frame: str = "voxel_corner"
) -> Tensor:
    """Integer ``[N, 6]`` crop boxes: ``boxes`` extended outwards to multiples of ``multiple``, clipped to the image.

    ``frame="voxel_corner"``: every voxel the box touches (``floor(z0) .. ceil(z1)``), then out to multiples.
    ``frame="published"``: the published crop (``center_box_to_coord_box``, ``astype(int32)``, ``ext2factor``) on
    the box in the voxel-INDEX frame (our coordinates minus 0.5): ``trunc(c -+ d/2)``, start floored and end
    ceiled to multiples. It leaves out a voxel the box covers less than half of at the end, so for most boxes
    one end is a block of ``multiple`` short of the corner-frame crop; published weights learned on it.
    Image sizes are multiples of 16 inside the network, so the clipped boxes stay multiples of ``multiple``.
    A box that clips to nothing (fully outside) becomes the ``multiple``-cube at the nearest image corner.
    """
    if frame not in ("published", "voxel_corner"):
        raise ValueError(f"frame must be 'published' or 'voxel_corner', got {frame!r}")
    sizes = torch.tensor(image_shape_zyx, device=boxes.device, dtype=torch.long)
    lo, hi = boxes[:, :3].float(), boxes[:, 3:].float()
    if frame == "published":
        centre, half = (lo + hi) / 2 - 0.5, (hi - lo) / 2
        lo, hi = torch.trunc(centre - half), torch.trunc(centre + half)
    start = torch.div(torch.floor(lo).long(), multiple, rounding_mode="floor") * multiple
    end = -torch.div(-torch.ceil(hi).long(), multiple, rounding_mode="floor") * multiple
    start = torch.minimum(torch.clamp(start, min=0), sizes - multiple)
    end = torch.maximum(torch.minimum(end, sizes), start + multiple)
    return torch.cat((start, end), dim=1)


def _instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm (affine, no running stats) as GroupNorm with one channel per group - the same function and
    the same ``weight``/``bias`` parameters as the published ``nn.InstanceNorm3d(affine=True)``, but PyTorch's CPU
    ``instance_norm`` (a batch norm over a reshaped tensor) is ~100x slower on the small crops the mask head sees.
    """
    return nn.GroupNorm(channels, channels, eps=1e-5, affine=True)


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # Index 1 / 2 (conv / norm) match the published up2/up3 Sequential layout; index 0 is the parameter-free upsample.
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
        _instance_norm(out_channels),
        nn.ReLU(inplace=True),
    )


def _fuse_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
        _instance_norm(out_channels),
        nn.ReLU(inplace=True),
    )


class MaskHead(nn.Module):
    """``up2`` (comb2 crop x2) -> ``back2`` (+ out1 crop) -> ``up3`` (x2) -> ``back3`` (+ image crop) -> ``logits1``.

    The published module also defines ``up1``, ``back1`` and ``logits2``, which its forward never uses (442,817
    parameters); they are not built here and the checkpoint importer drops them.
    """

    def __init__(self, comb2_channels: int, out1_channels: int, image_channels: int = 1, channels: int = 64) -> None:
        super().__init__()
        self.up2 = _up_block(comb2_channels, channels)
        self.back2 = _fuse_block(channels + out1_channels, channels)
        self.up3 = _up_block(channels, channels)
        self.back3 = _fuse_block(channels + image_channels, channels)
        self.logits1 = nn.Conv3d(channels, 1, kernel_size=1)

    def forward(
        self, image: Tensor, out1: Tensor, comb2: Tensor, crop_boxes: Tensor, batch_index: Tensor
    ) -> list[Tensor]:
        """Mask logits ``[d, h, w]`` for each crop box (stride-4-aligned, from :func:`mask_crop_boxes`).

        Crops of equal size run as one batch (exact: every layer here acts per sample - instance norm included),
        which on a whole scan with hundreds of detections turns hundreds of tiny kernel calls into a handful.
        """
        boxes = crop_boxes.tolist()
        bidx = batch_index.tolist()
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (z0, y0, x0, z1, y1, x1) in enumerate(boxes):
            groups.setdefault((z1 - z0, y1 - y0, x1 - x0), []).append(i)
        logits: list[Tensor | None] = [None] * len(boxes)
        for size, members in groups.items():
            # Bound the activation memory of one batch (~64 channels x this many voxels per tensor).
            per_chunk = max(1, _MAX_BATCH_VOXELS // (size[0] * size[1] * size[2]))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                f4 = torch.cat([_crop(comb2, bidx[i], boxes[i], 4) for i in chunk])
                f2 = torch.cat([_crop(out1, bidx[i], boxes[i], 2) for i in chunk])
                im = torch.cat([_crop(image, bidx[i], boxes[i], 1) for i in chunk])
                out = self._decode(f4, f2, im)
                for j, i in enumerate(chunk):
                    logits[i] = out[j, 0]
        return [t for t in logits if t is not None]

    def _decode(self, f4: Tensor, f2: Tensor, im: Tensor) -> Tensor:
        x = self.up2(f4)
        # .to(x.dtype): under autocast the norm layers return fp32 while the cropped features are bf16.
        x = self.back2(torch.cat((x, f2.to(x.dtype)), dim=1))
        x = self.up3(x)
        x = self.back3(torch.cat((x, im.to(x.dtype)), dim=1))
        return self.logits1(x)


_MAX_BATCH_VOXELS = 1 << 20


def _crop(volume: Tensor, b: int, box: list[int], stride: int) -> Tensor:
    z0, y0, x0, z1, y1, x1 = (v // stride for v in box)
    return volume[b : b + 1, :, z0:z1, y0:y1, x0:x1]


def _padded_positions(extent: Tensor, size: tuple[int, int, int]) -> tuple[list[Tensor], Tensor]:
    """For crops of ``extent [n, 3]`` voxels padded to ``size``: per axis the crop-local position of every padded
    voxel with the padding repeating the crop's last voxel (``[n, size_a]`` each), and the float 0/1 mask
    ``[n, 1, d, h, w]`` of the voxels inside the crop."""
    local, inside = [], None
    for axis in range(3):
        p = torch.arange(size[axis], device=extent.device)[None, :]
        local.append(torch.minimum(p, extent[:, axis, None] - 1))
        shape = [-1, 1, 1, 1, 1]
        shape[axis + 2] = size[axis]
        ok = (p < extent[:, axis, None]).view(shape)
        inside = ok if inside is None else inside & ok
    assert inside is not None
    return local, inside.float()


def _take_crops(volume: Tensor, batch_index: Tensor, start: Tensor | None, local: list[Tensor]) -> Tensor:
    """``[n, C, d, h, w]``: ``volume [B, C, Z, Y, X]`` read for crop ``i`` in image ``batch_index[i]`` at the voxel
    positions ``start[i] + local[axis][i]`` (``start [n, 3]`` or None for 0; ``local`` ``[n, d]``, ``[n, h]``,
    ``[n, w]``): one ``take`` of flat positions (a ``put_`` in its backward), ~20 tensor calls, where advanced
    indexing makes ~55 and an ``index_put_`` backward ~3x the calls of ``take``'s."""
    channels, depth, height, width = volume.shape[1:]
    n, (d, h, w) = batch_index.shape[0], (p.shape[1] for p in local)
    voxels = depth * height * width
    strides = torch.tensor([height * width, width, 1], device=volume.device)
    first = (batch_index * (channels * voxels)).view(n, 1) + torch.arange(channels, device=volume.device) * voxels
    if start is not None:
        first = first + (start * strides).sum(dim=1, keepdim=True)
    spatial = ((local[0] * strides[0]).view(n, d, 1, 1) + (local[1] * strides[1]).view(n, 1, h, 1)
               + local[2].view(n, 1, 1, w))
    return volume.take(first.view(n, channels, 1, 1, 1) + spatial.view(n, 1, d, h, w))


def _gather_padded(volume: Tensor, batch_index: Tensor, start: Tensor, local: list[Tensor]) -> Tensor:
    """``[n, C, d, h, w]``: ``volume``'s crops at ``start`` read at the crop-local positions ``local`` (padding
    repeats each crop's last voxel), one gather."""
    return _take_crops(volume, batch_index, start, local)


def _repeat_edges(x: Tensor, local: list[Tensor]) -> Tensor:
    """``x [n, C, d, h, w]`` with every voxel past a crop's extent replaced by the crop's nearest edge voxel."""
    return _take_crops(x, torch.arange(x.shape[0], device=x.device), None, local)


def _masked_instance_norm(x: Tensor, norm: nn.GroupNorm, inside: Tensor, count: Tensor) -> Tensor:
    """``norm`` (GroupNorm, one channel per group: instance norm) with each crop's statistics taken over its own
    voxels ``inside`` only (``count`` of them), as the norm of the unpadded crop computes them."""
    mean = (x * inside).sum(dim=(2, 3, 4), keepdim=True) / count
    centred = x - mean
    var = (centred.square() * inside).sum(dim=(2, 3, 4), keepdim=True) / count
    scale = torch.rsqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1, 1)
    return centred * scale + norm.bias.view(1, -1, 1, 1, 1)


def _decode_padded(head: "MaskHead", f4: Tensor, f2: Tensor, im: Tensor, local2: list[Tensor], inside2: Tensor,
                   inside1: Tensor) -> Tensor:
    """:meth:`MaskHead._decode` of crops of different extents padded to one size (``local2``/``inside2``: the
    stride-2 positions and inside mask from :func:`_padded_positions`, ``inside1`` the image-voxel one), with the
    values each unpadded crop would give inside it.

    Why it is the same: ``f4`` is padded by repeating each crop's last voxel, which is exactly what the x2
    trilinear up-sampling (align_corners=False) reads past the end of an unpadded input (it clamps its source
    index), so up-sampled voxels inside a crop are unchanged; after every up-sampling the voxels outside the crop
    are set to 0, which is what the 3x3 convolutions' zero padding reads there; the instance norms take their
    statistics over the crop's voxels only; and the second up-sampling again sees repeated edge voxels. ``f2``
    and ``im`` come zero outside the crop."""
    count2, count1 = inside2.sum(dim=(2, 3, 4), keepdim=True), inside1.sum(dim=(2, 3, 4), keepdim=True)
    up2, back2, up3, back3 = head.up2, head.back2, head.up3, head.back3
    x = up2[1](up2[0](f4) * inside2)
    x = up2[3](_masked_instance_norm(x, up2[2], inside2, count2)) * inside2
    x = back2[0](torch.cat((x, f2.to(x.dtype)), dim=1))
    x = back2[2](_masked_instance_norm(x, back2[1], inside2, count2))
    x = up3[1](up3[0](_repeat_edges(x, local2)) * inside1)
    x = up3[3](_masked_instance_norm(x, up3[2], inside1, count1)) * inside1
    x = back3[0](torch.cat((x, im.to(x.dtype)), dim=1))
    x = back3[2](_masked_instance_norm(x, back3[1], inside1, count1))
    return head.logits1(x)


def _gather_targets(masks: Tensor, mask_sizes: Tensor, origins: Tensor, nodule: Tensor, start: Tensor,
                    extent: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Float 0/1 ``[n, d, h, w]``: nodule ``nodule[i]``'s tight mask (``masks [G, Dm, Hm, Wm]`` padded, true size
    ``mask_sizes [G, 3]``, placed at ``origins [G, 3]``) inside the crop at ``start[i]`` of ``extent[i]`` voxels, as
    ``paste_masks_to_crop``, padded to ``size`` with zeros. A crop voxel ``p`` reads mask voxel ``start + p -
    origin``, inside where that is in ``[0, mask size)`` and ``p < extent``: per axis ``p`` in ``[lo, hi)``."""
    n = nodule.shape[0]
    offset = start - origins.index_select(0, nodule)  # the crop's first voxel in the mask's frame, [n, 3]
    lo, hi = (-offset).clamp_(min=0), torch.minimum(mask_sizes.index_select(0, nodule) - offset, extent)
    last = torch.tensor(masks.shape[1:], device=start.device) - 1
    inside, read = [], []
    for axis, (low, high, first, top) in enumerate(zip(lo.unbind(1), hi.unbind(1), offset.unbind(1), last.unbind(0))):
        p = torch.arange(size[axis], device=start.device)
        shape = [n, 1, 1, 1]
        shape[axis + 1] = size[axis]
        inside.append(((p >= low.view(n, 1)) & (p < high.view(n, 1))).view(shape))
        read.append(torch.minimum((first.view(n, 1) + p).clamp_(min=0), top).view(shape))
    z, y, x = read
    height, width = masks.shape[2], masks.shape[3]
    flat = (nodule * (masks.shape[1] * height * width)).view(n, 1, 1, 1) + z * (height * width) + y * width + x
    return (masks.take(flat) > 0).logical_and_(inside[0] & inside[1] & inside[2]).float()


def pad_nodule_masks(masks: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Tight nodule masks of different sizes as one ``[G, Dm, Hm, Wm]`` uint8 tensor + their sizes ``[G, 3]``."""
    sizes = torch.tensor([list(m.shape) for m in masks], dtype=torch.long).reshape(-1, 3)
    largest = sizes.amax(dim=0).tolist() if len(masks) else [1, 1, 1]
    padded = torch.zeros((len(masks), *largest), dtype=torch.uint8, device=device)
    for k, m in enumerate(masks):
        padded[k, : m.shape[0], : m.shape[1], : m.shape[2]] = (m > 0).to(device=device, dtype=torch.uint8)
    return padded, sizes.to(device)


# Padded voxels a group of mask crops may hold per voxel of its crops: padding more crops into one batch saves
# tensor calls (each group is ~600) and costs arithmetic on the padding.
_MASK_GROUP_PADDING = 2.0


def pack_crop_groups(sizes: list[tuple[int, int, int]], max_padding: float = _MASK_GROUP_PADDING,
                     max_voxels: int = 1 << 20) -> list[tuple[tuple[int, int, int], list[int]]]:
    """Crops (by their zyx ``sizes``) packed into groups that run padded to one size: ``[(size, members)]``.

    Largest crop first, each next crop joins the open group while the group's padded voxels (elementwise largest
    size x members) stay within ``max_padding`` x its crops' own voxels and ``max_voxels``, else opens a group."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0] * sizes[i][1] * sizes[i][2], i))
    groups: list[tuple[tuple[int, int, int], list[int], int]] = []
    for i in order:
        size, volume = sizes[i], sizes[i][0] * sizes[i][1] * sizes[i][2]
        for g, (padded, members, own) in enumerate(groups):
            grown = tuple(max(a, b) for a, b in zip(padded, size))
            padded_voxels = grown[0] * grown[1] * grown[2] * (len(members) + 1)
            if padded_voxels <= max_padding * (own + volume) and padded_voxels <= max_voxels:
                groups[g] = (grown, members + [i], own + volume)  # type: ignore[assignment]
                break
        else:
            groups.append((size, [i], volume))
    return [(padded, members) for padded, members, _ in groups]


def batched_mask_loss(head: "MaskHead", image: Tensor, out1: Tensor, comb2: Tensor, crop_boxes: Tensor,
                      batch_index: Tensor, nodule: Tensor, masks: Tensor, mask_sizes: Tensor, origins: Tensor,
                      eps: float = 1e-5) -> Tensor:
    """The mask loss (``losses.mask_loss`` defaults: mean soft Dice over crops whose target has foreground) of the
    crops ``crop_boxes [M, 6]`` (image ``batch_index``, learning nodule ``nodule``). Crops of different sizes run
    padded to one size per group (:func:`pack_crop_groups`, :func:`_decode_padded`): the crops, their targets and
    the Dice terms are a few gathers per group, not a paste and a slice per crop, nor one network pass per size.
    Reads the crop sizes back once (the groups' padded sizes shape the convolutions)."""
    extents = crop_boxes[:, 3:] - crop_boxes[:, :3]
    sizes = [(int(z), int(y), int(x)) for z, y, x in extents.tolist()]
    terms, counted = [], []
    for size, members in pack_crop_groups(sizes, _MASK_GROUP_PADDING, _MAX_BATCH_VOXELS):
        idx = torch.tensor(members, device=crop_boxes.device)
        start, bidx, extent = crop_boxes[idx, :3], batch_index[idx], extents[idx]
        # Extents and sizes are multiples of 4, so every 2nd (4th) image-voxel position, halved (quartered), is the
        # stride-2 (stride-4) one: min(2q, e - 1) // 2 = min(q, e/2 - 1).
        local1, inside1 = _padded_positions(extent, size)
        local2, local4 = [p[:, ::2] // 2 for p in local1], [p[:, ::4] // 4 for p in local1]
        inside2 = inside1[:, :, ::2, ::2, ::2]
        f4 = _gather_padded(comb2, bidx, torch.div(start, 4, rounding_mode="floor"), local4)
        f2 = _gather_padded(out1, bidx, torch.div(start, 2, rounding_mode="floor"), local2) * inside2
        im = _gather_padded(image, bidx, start, local1) * inside1
        logits = _decode_padded(head, f4, f2, im, local2, inside2, inside1)
        prob = (torch.sigmoid(logits.float()) * inside1).flatten(1)
        truth = _gather_targets(masks, mask_sizes, origins, nodule[idx], start, extent, size).flatten(1)
        terms.append(1 - (prob * truth).sum(dim=1) / (0.5 * (prob.sum(dim=1) + truth.sum(dim=1)) + eps))
        counted.append(truth.amax(dim=1) > 0)
    term, count = torch.cat(terms), torch.cat(counted)
    return torch.where(count, term, torch.zeros_like(term)).sum() / count.sum().clamp(min=1)


def mask_nms(mask_probs: list[Tensor], crop_boxes: Tensor, iou_threshold: float, threshold: float = 0.5) -> Tensor:
    """Indices (in input order, which must be by decreasing score) of masks kept by greedy mask-IoU suppression.

    A later mask is dropped when its binary mask (``prob > threshold``) overlaps an earlier KEPT mask with IoU above
    ``iou_threshold`` - the published ``mask_nms`` (it skips a suppressed mask and lets each kept one suppress the
    later ones; ``tests/test_published_detections.py`` compares the two). Only pairs whose crop boxes intersect
    can overlap, so those are found first with one box-IoU matrix.
    """
    n = len(mask_probs)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    binary = [(p > threshold) for p in mask_probs]
    areas = [int(m.sum()) for m in binary]
    boxes = crop_boxes.tolist()
    touching = box_iou_3d(crop_boxes.float(), crop_boxes.float()) > 0
    # Earlier boxes each box touches; the greedy loop then only visits those (Python loops stay ~linear).
    earlier = [[j for j in torch.nonzero(touching[i, :i]).flatten().tolist()] for i in range(n)]
    keep: list[int] = []
    kept: set[int] = set()
    for i in range(n):
        suppressed = False
        for j in earlier[i]:
            if j not in kept:
                continue
            inter = _mask_intersection(binary[i], boxes[i], binary[j], boxes[j])
            union = areas[i] + areas[j] - inter
            if union > 0 and inter / union > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            keep.append(i)
            kept.add(i)
    return torch.tensor(keep, dtype=torch.long)


def _mask_intersection(m1: Tensor, b1: list[int], m2: Tensor, b2: list[int]) -> int:
    lo = [max(b1[k], b2[k]) for k in range(3)]
    hi = [min(b1[k + 3], b2[k + 3]) for k in range(3)]
    if any(h <= l for l, h in zip(lo, hi)):
        return 0
    s1 = m1[lo[0] - b1[0] : hi[0] - b1[0], lo[1] - b1[1] : hi[1] - b1[1], lo[2] - b1[2] : hi[2] - b1[2]]
    s2 = m2[lo[0] - b2[0] : hi[0] - b2[0], lo[1] - b2[1] : hi[1] - b2[1], lo[2] - b2[2] : hi[2] - b2[2]]
    return int((s1 & s2).sum())


def paste_masks_to_crop(
    instance_masks: list[Tensor], instance_origins: Tensor, crop_box: list[int], indices: list[int]
) -> Tensor:
    """Union of the instance masks ``indices`` (each placed at its origin) inside ``crop_box``, as a float volume.

    Used for mask targets: a ground-truth nodule is stored as a tight crop + its zyx origin (memory-light), and a
    detection's target is that nodule's voxels that fall inside the detection's crop box.
    """
    z0, y0, x0, z1, y1, x1 = crop_box
    out = torch.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=torch.float32, device=instance_origins.device)
    for k in indices:
        m = instance_masks[k]
        oz, oy, ox = (int(v) for v in instance_origins[k].tolist())
        lo = (max(z0, oz), max(y0, oy), max(x0, ox))
        hi = (min(z1, oz + m.shape[0]), min(y1, oy + m.shape[1]), min(x1, ox + m.shape[2]))
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        src = m[lo[0] - oz : hi[0] - oz, lo[1] - oy : hi[1] - oy, lo[2] - ox : hi[2] - ox].to(out.device)
        dst = out[lo[0] - z0 : hi[0] - z0, lo[1] - y0 : hi[1] - y0, lo[2] - x0 : hi[2] - x0]
        torch.maximum(dst, (src > 0).float(), out=dst)
    return out


def mask_training_targets(
    boxes: Tensor,
    crop_boxes: Tensor,
    gt_boxes: Tensor,
    gt_masks: list[Tensor],
    gt_mask_origins: Tensor,
    match_iou: float,
) -> tuple[Tensor, list[Tensor]]:
    """For each training box, the binary mask target inside its crop box, from the nodule it overlaps best.

    ``boxes [N, 6]`` (detections and/or ground-truth boxes, zyxzyx) decide the match (box IoU >= ``match_iou``);
    ``crop_boxes [N, 6]`` are their integer mask crops. Returns the indices of matched boxes and their targets
    (float 0/1, crop-shaped). Unmatched boxes get no target: the mask loss would skip their empty targets
    anyway (published), so the caller need not run the mask head on them.
    """
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), []
    iou = box_iou_3d(boxes, gt_boxes.to(boxes.device))
    best_iou, best_gt = iou.max(dim=1)
    matched = torch.nonzero(best_iou >= match_iou).squeeze(1)
    crops = crop_boxes.tolist()
    targets = [paste_masks_to_crop(gt_masks, gt_mask_origins, crops[i], [int(best_gt[i])]) for i in matched.tolist()]
    return matched, targets
