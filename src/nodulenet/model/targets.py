"""Training targets: anchor labels for the RPN, sampled proposals for the RCNN (false-positive reduction).

All boxes are ``(z0, y0, x0, z1, y1, x1)`` float tensors in input voxels, ``z1`` exclusive (see
:mod:`nodulenet.model.box_ops`); deltas are :class:`~nodulenet.model.box_coder.BoxCoder` deltas
``(dz, dy, dx, dd, dh, dw)``. Functions work on one crop (sample) at a time unless stated; targets are
computed without gradient.

Defaults and rules reproduce the published NoduleNet (``uci-cbcl/NoduleNet``: ``net/layer/rpn_target.py``,
``rpn_loss.py``, ``rcnn_target.py``; ``config.py``), with its few crash cases made well-defined:

RPN (``make_one_rpn_target`` + ``binary_cross_entropy_with_hard_negative_mining``)
  * positive: max IoU with a nodule >= 0.5 (``rpn_train_fg_thresh_low``), plus, for each nodule, every
    anchor tied for its best IoU; negative: max IoU < 0.02 (``rpn_train_bg_thresh_high``); between: ignored.
    (The published "best anchor" rule also fires for a nodule whose best IoU is 0, which makes *every*
    anchor positive; here it needs IoU > 0.)
  * training then keeps ONE random positive per crop (the published comment says per nodule, the code does
    it per crop), ``num_neg = 800`` random negatives per crop, and, in the loss, only the
    ``num_hard = 3`` x (number of positives in the batch) highest-scoring of those negatives (OHEM over the
    whole batch). The published code divides by zero when a batch has no positive; here such a batch keeps
    ``num_hard`` negatives.

RCNN (``make_one_rcnn_target``)
  * ground-truth boxes are appended to the proposals; foreground: IoU >= 0.5, background: IoU < 0.1.
  * 64 per crop, up to round(0.5 * 64) = 32 foreground drawn without replacement; background fills the
    rest and is drawn WITH replacement when there are too few (duplicates), as published. Foreground
    first, then background.

Ignore boxes (not published; the batched forms' optional ``ignore_boxes``): findings that must be neither taught as
nodules nor as background - LIDC nodules marked by fewer readers than the consensus, LUNA16's
annotations_excluded.csv, which LUNA16's scoring ignores too. An anchor or proposal is NEAR an ignore box
(:func:`near_ignore_boxes`) when its centre lies inside it OR its IoU with it reaches the threshold below which it
would be background next to a real nodule (``neg_iou`` for the RPN, ``bg_iou`` for the RCNN). Both parts are
needed: IoU alone misses the small anchors inside a large finding (a 10 mm anchor centred in a 30 mm ground-glass
nodule has IoU 0.04, a 5 mm one 0.005, both "background" by IoU), the centre alone misses large anchors that cover
most of it from outside. A near RPN anchor that would be negative is ignored instead (so it is never a hard
negative either); positives (of a real nodule) stay positive. A near RCNN candidate is never drawn as background;
foreground is unchanged. The mask loss does not look at ignore boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nodulenet.model.box_coder import BoxCoder
from nodulenet.model.box_ops import box_iou_3d, box_iou_batched

__all__ = [
    "RpnTargets",
    "RcnnTargets",
    "assign_rpn_targets",
    "sample_rpn_anchors",
    "stack_rpn_targets",
    "assign_rcnn_targets",
    "assign_rpn_targets_batched",
    "pad_gt_boxes",
    "RcnnSampleKeys",
    "draw_rcnn_keys",
    "sample_rcnn_batched",
    "near_ignore_boxes",
]

LABEL_POSITIVE = 1
LABEL_NEGATIVE = 0
LABEL_IGNORE = -1


class RpnTargets(NamedTuple):
    """Per-anchor RPN targets (leading dims ``[A]`` for one crop, ``[B, A]`` when stacked)."""

    #: int8: 1 positive, 0 negative, -1 ignored (neither, or dropped by sampling).
    labels: Tensor
    #: long: index of the ground-truth box a positive anchor regresses to; -1 for every non-positive.
    matched_gt: Tensor
    #: float32 ``[..., 6]``: encoded target deltas for positives, zeros elsewhere.
    deltas: Tensor


class RcnnTargets(NamedTuple):
    """Sampled RCNN training set for one crop, foreground rows first."""

    #: ``[S, 6]`` zyxzyx proposal boxes (float32) that the RCNN head should be run on.
    proposals: Tensor
    #: long ``[S]``: class of the matched nodule (1 by default) for foreground, 0 for background.
    labels: Tensor
    #: float32 ``[S, 6]``: deltas from proposal to its matched ground truth; zeros for background.
    deltas: Tensor
    #: long ``[S]``: index of the matched ground-truth box, -1 for background (for mask targets).
    matched_gt: Tensor


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 6:
        raise ValueError(f"{name} must have shape [N, 6], got {tuple(boxes.shape)}")


def _random_keys(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform random numbers on ``device`` drawn from ``generator`` (which may live on another device)."""
    source = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=source).to(device)


def _keep_random(candidates: Tensor, limit: int, generator: torch.Generator | None) -> Tensor:
    """Bool mask, per row of 2-D ``candidates``, of at most ``limit`` uniformly chosen True entries."""
    rows, cols = candidates.shape
    if limit <= 0 or cols == 0:
        return torch.zeros_like(candidates)
    if limit >= cols:
        return candidates.clone()
    keys = _random_keys((rows, cols), generator, candidates.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, -1.0))
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, torch.topk(keys, limit, dim=1).indices, True)
    return chosen & candidates


@torch.no_grad()
def assign_rpn_targets(
    anchors: Tensor,
    gt_boxes: Tensor,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.02,
    allow_low_quality: bool = True,
    box_coder: BoxCoder | None = None,
) -> RpnTargets:
    """Label every anchor of one crop against its nodules (zyxzyx ``anchors[A, 6]``, ``gt_boxes[G, 6]``).

    Positive if its best IoU >= ``pos_iou``; with ``allow_low_quality``, also every anchor tied for a
    nodule's best IoU (when that IoU > 0), matched to that nodule, so every nodule has a positive even when
    no anchor reaches ``pos_iou``. Negative if best IoU < ``neg_iou``. Ignored otherwise. With no nodules
    every anchor is negative. Deltas are encoded for positives only (zeros elsewhere, always finite).
    """
    _check_boxes(anchors, "anchors")
    _check_boxes(gt_boxes, "gt_boxes")
    coder = box_coder or BoxCoder()
    num_anchors = anchors.shape[0]
    device = anchors.device
    labels = torch.full((num_anchors,), LABEL_IGNORE, dtype=torch.int8, device=device)
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=device)
    deltas = torch.zeros((num_anchors, 6), dtype=torch.float32, device=device)
    if gt_boxes.shape[0] == 0:
        labels.fill_(LABEL_NEGATIVE)
        return RpnTargets(labels, matched, deltas)

    iou = box_iou_3d(anchors, gt_boxes.to(device))  # [A, G]
    best_iou, best_gt = iou.max(dim=1)
    labels[best_iou < neg_iou] = LABEL_NEGATIVE
    positive = best_iou >= pos_iou
    matched[positive] = best_gt[positive]
    if allow_low_quality:
        best_per_gt = iou.max(dim=0).values  # [G]
        is_best = (iou == best_per_gt[None, :]) & (best_per_gt[None, :] > 0)
        anchor_idx, gt_idx = torch.nonzero(is_best, as_tuple=True)
        # An anchor best for several nodules keeps the last one listed, as published (label_assign[fg] = a).
        matched[anchor_idx] = gt_idx
        positive[anchor_idx] = True
    labels[positive] = LABEL_POSITIVE
    pos_idx = torch.nonzero(positive).squeeze(1)
    if pos_idx.numel() > 0:
        deltas[pos_idx] = coder.encode(anchors[pos_idx], gt_boxes.to(device)[matched[pos_idx]]).float()
    return RpnTargets(labels, matched, deltas)


@torch.no_grad()
def sample_rpn_anchors(
    labels: Tensor,
    logits: Tensor | None = None,
    *,
    max_pos: int | None = 1,
    num_neg: int = 800,
    num_hard: int = 3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose which labelled anchors enter the RPN classification loss; the others become -1 (ignored).

    ``labels``: ``[A]`` (one crop) or ``[B, A]`` (a batch), values 1 / 0 / -1 as from
    :func:`assign_rpn_targets`. Steps, as published:

    1. per crop, keep at most ``max_pos`` random positives (published: 1; ``None`` keeps all);
    2. per crop, keep at most ``num_neg`` random negatives (published: 800);
    3. if ``logits`` (same shape as ``labels``, or with a trailing 1) is given and ``num_hard > 0``, keep only
       the ``num_hard * max(1, positives in the whole batch)`` highest-scoring of those negatives
       (published OHEM, ``num_hard = 3``; its zero-positive case crashed, here it keeps ``num_hard``).

    Returns new labels of the same shape and dtype. ``generator`` makes the draw reproducible; it may be a
    CPU generator for CUDA labels.
    """
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must be [A] or [B, A], got {tuple(labels.shape)}")
    rows = labels.reshape(1, -1) if labels.dim() == 1 else labels
    out = rows.clone()
    positive = rows == LABEL_POSITIVE
    negative = rows == LABEL_NEGATIVE
    if max_pos is not None:
        kept_pos = _keep_random(positive, max_pos, generator)
        out.masked_fill_(positive & ~kept_pos, LABEL_IGNORE)
        positive = kept_pos
    kept_neg = _keep_random(negative, num_neg, generator)
    out.masked_fill_(negative & ~kept_neg, LABEL_IGNORE)

    if logits is not None and num_hard > 0:
        scores = logits.detach()
        if scores.shape != labels.shape:
            if scores.shape[:-1] == labels.shape and scores.shape[-1] == 1:
                scores = scores.squeeze(-1)
            else:
                raise ValueError(f"logits shape {tuple(logits.shape)} does not match labels {tuple(labels.shape)}")
        scores = scores.reshape(rows.shape).float()
        # Rank of every kept negative by score over the whole batch, on the device (no host round trip): the
        # num_hard * max(1, positives) best stay; fewer kept negatives than that keeps them all.
        num_hard_total = num_hard * positive.sum().clamp(min=1)
        flat_scores = torch.where(kept_neg, scores, torch.full_like(scores, -torch.inf)).flatten()
        order = torch.sort(flat_scores, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        hardest = (rank < num_hard_total).reshape(rows.shape)
        out.masked_fill_(kept_neg & ~hardest, LABEL_IGNORE)
    return out.reshape(labels.shape)


def stack_rpn_targets(targets: Sequence[RpnTargets]) -> RpnTargets:
    """Stack per-crop targets (same anchors) into batched ``[B, A]`` / ``[B, A, 6]`` targets."""
    if len(targets) == 0:
        raise ValueError("stack_rpn_targets needs at least one RpnTargets")
    return RpnTargets(
        torch.stack([t.labels for t in targets]),
        torch.stack([t.matched_gt for t in targets]),
        torch.stack([t.deltas for t in targets]),
    )


def _sample_indices(pool: Tensor, count: int, replace: bool, generator: torch.Generator | None) -> Tensor:
    """``count`` entries of the 1-D index tensor ``pool``: without replacement if possible, else (if allowed)
    with replacement, else all of them."""
    size = pool.shape[0]
    if count <= 0 or size == 0:
        return pool[:0]
    source = generator.device if generator is not None else pool.device
    if count <= size:
        return pool[torch.randperm(size, generator=generator, device=source).to(pool.device)[:count]]
    if not replace:
        return pool[torch.randperm(size, generator=generator, device=source).to(pool.device)]
    return pool[torch.randint(size, (count,), generator=generator, device=source).to(pool.device)]


@torch.no_grad()
def assign_rcnn_targets(
    proposals: Tensor,
    gt_boxes: Tensor,
    *,
    gt_labels: Tensor | None = None,
    fg_iou: float = 0.5,
    bg_iou: float = 0.1,
    batch_size: int = 64,
    fg_fraction: float = 0.5,
    add_gt_to_proposals: bool = True,
    bg_with_replacement: bool = True,
    generator: torch.Generator | None = None,
    box_coder: BoxCoder | None = None,
) -> RcnnTargets:
    """Sample the RCNN training proposals of one crop and their targets (zyxzyx ``proposals[P, 6]``,
    ``gt_boxes[G, 6]``; ``gt_labels[G]`` classes >= 1, default all 1).

    Cases (published behaviour): no proposals and no nodules -> empty; no nodules -> up to ``batch_size``
    random proposals as background; otherwise foreground (IoU >= ``fg_iou``, at most
    ``round(fg_fraction * batch_size)``) followed by background (IoU < ``bg_iou``) filling the batch,
    with replacement when short (``bg_with_replacement``). With foreground but no background the batch holds
    only the foreground. If neither exists (only possible with degenerate nodule boxes) ``batch_size``
    random proposals are used as background.
    """
    _check_boxes(proposals, "proposals")
    _check_boxes(gt_boxes, "gt_boxes")
    coder = box_coder or BoxCoder()
    device = proposals.device
    gt_boxes = gt_boxes.to(device)
    candidates = proposals.detach().float()
    if add_gt_to_proposals and gt_boxes.shape[0] > 0:
        candidates = torch.cat([candidates, gt_boxes.float()], dim=0)
    if gt_labels is None:
        gt_labels = torch.ones(gt_boxes.shape[0], dtype=torch.long, device=device)
    elif gt_labels.shape != (gt_boxes.shape[0],):
        raise ValueError(f"gt_labels must have shape [{gt_boxes.shape[0]}], got {tuple(gt_labels.shape)}")
    gt_labels = gt_labels.to(device=device, dtype=torch.long)

    num_candidates = candidates.shape[0]
    all_idx = torch.arange(num_candidates, device=device)
    if gt_boxes.shape[0] == 0:
        bg = _sample_indices(all_idx, min(num_candidates, batch_size), False, generator)
        no_match = torch.full((num_candidates,), -1, dtype=torch.long, device=device)
        return _rcnn_result(candidates, bg[:0], bg, no_match, gt_boxes, gt_labels, coder)

    iou = box_iou_3d(candidates, gt_boxes)
    best_iou, best_gt = iou.max(dim=1)
    fg_pool = torch.nonzero(best_iou >= fg_iou).squeeze(1)
    bg_pool = torch.nonzero(best_iou < bg_iou).squeeze(1)
    max_fg = int(round(fg_fraction * batch_size))

    fg = _sample_indices(fg_pool, min(max_fg, fg_pool.shape[0]), False, generator)
    if fg.numel() > 0 and bg_pool.numel() == 0:
        bg = bg_pool
    elif fg.numel() == 0 and bg_pool.numel() == 0:
        bg = _sample_indices(all_idx, batch_size, bg_with_replacement, generator)
    else:
        bg = _sample_indices(bg_pool, batch_size - fg.numel(), bg_with_replacement, generator)
    return _rcnn_result(candidates, fg, bg, best_gt, gt_boxes, gt_labels, coder)


def _rcnn_result(
    candidates: Tensor,
    fg: Tensor,
    bg: Tensor,
    best_gt: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    coder: BoxCoder,
) -> RcnnTargets:
    device = candidates.device
    index = torch.cat([fg, bg])
    matched = torch.full((index.numel(),), -1, dtype=torch.long, device=device)
    labels = torch.zeros(index.numel(), dtype=torch.long, device=device)
    deltas = torch.zeros((index.numel(), 6), dtype=torch.float32, device=device)
    num_fg = fg.numel()
    if num_fg > 0:
        matched[:num_fg] = best_gt[fg]
        labels[:num_fg] = gt_labels[matched[:num_fg]]
        deltas[:num_fg] = coder.encode(candidates[fg], gt_boxes[matched[:num_fg]].float()).float()
    return RcnnTargets(candidates[index], labels, deltas, matched)


# ------------------------------------------------------------------ whole-batch, static-shape forms (training step)


def pad_gt_boxes(gt_boxes: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image nodule boxes as ``[B, G, 6]`` (G = most nodules of any image, at least 1) + ``valid [B, G]``.

    The counts come from the host-side lists the loader made, so this needs no look at device values.
    """
    g = max([1, *(int(t.shape[0]) for t in gt_boxes)])
    padded = torch.zeros((len(gt_boxes), g, 6), dtype=torch.float32, device=device)
    valid = torch.zeros((len(gt_boxes), g), dtype=torch.bool, device=device)
    for i, t in enumerate(gt_boxes):
        if t.shape[0]:
            padded[i, : t.shape[0]] = t.to(device=device, dtype=torch.float32)
            valid[i, : t.shape[0]] = True
    return padded, valid


@torch.no_grad()
def near_ignore_boxes(boxes: Tensor, ignore_boxes: Tensor, ignore_valid: Tensor, min_iou: float) -> Tensor:
    """``[B, N]`` True where box ``boxes[b, n]`` (``[B, N, 6]``) has its centre inside a valid ignore box of image
    ``b`` (``ignore_boxes [B, K, 6]`` + ``ignore_valid [B, K]``, padded as :func:`pad_gt_boxes`) or an IoU of at
    least ``min_iou`` with one (see the module doc). One batched computation: no loop, no host read-back."""
    ignore = ignore_boxes.float()
    centres = (boxes[..., :3] + boxes[..., 3:]).float()[:, :, None, :] / 2.0  # [B, N, 1, 3]
    inside = ((centres >= ignore[:, None, :, :3]) & (centres < ignore[:, None, :, 3:])).all(dim=3)  # [B, N, K]
    near = inside | (box_iou_batched(boxes.float(), ignore) >= min_iou)
    return (near & ignore_valid[:, None, :]).any(dim=2)


@torch.no_grad()
def assign_rpn_targets_batched(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.02,
    box_coder: BoxCoder | None = None,
    ignore_boxes: Tensor | None = None,
    ignore_valid: Tensor | None = None,
) -> RpnTargets:
    """:func:`assign_rpn_targets` (with ``allow_low_quality``) for a whole batch: ``anchors [A, 6]``, padded
    ``gt_boxes [B, G, 6]`` + ``gt_valid [B, G]`` -> ``[B, A]`` / ``[B, A, 6]`` targets, identical per image.

    With padded ``ignore_boxes [B, K, 6]`` + ``ignore_valid [B, K]``, a would-be negative near one is ignored
    (module doc)."""
    coder = box_coder or BoxCoder()
    b, g = gt_valid.shape
    gt = torch.where(gt_valid[..., None], gt_boxes.float(), torch.zeros_like(gt_boxes, dtype=torch.float32))
    iou = box_iou_batched(anchors[None].expand(b, -1, -1), gt)  # [B, A, G]; padding has IoU 0
    best_iou, best_gt = iou.max(dim=2)
    positive = best_iou >= pos_iou
    best_per_gt = iou.max(dim=1, keepdim=True).values  # [B, 1, G]
    is_best = (iou == best_per_gt) & (best_per_gt > 0) & gt_valid[:, None, :]
    # An anchor best for several nodules keeps the last one listed, as published (label_assign[fg] = a).
    gt_number = torch.arange(1, g + 1, device=iou.device)
    low_quality = (is_best * gt_number).amax(dim=2) - 1  # -1: best for no nodule
    matched = torch.where(low_quality >= 0, low_quality, torch.where(positive, best_gt, -1))
    positive |= low_quality >= 0
    labels = torch.full(best_iou.shape, LABEL_IGNORE, dtype=torch.int8, device=iou.device)
    negative = best_iou < neg_iou
    if ignore_boxes is not None and ignore_valid is not None:
        negative &= ~near_ignore_boxes(anchors[None].expand(b, -1, -1), ignore_boxes, ignore_valid, neg_iou)
    labels.masked_fill_(negative, LABEL_NEGATIVE).masked_fill_(positive, LABEL_POSITIVE)
    target = gt.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 6))
    deltas = coder.encode(anchors.repeat(b, 1), target.reshape(-1, 6)).float().view(b, -1, 6)
    deltas = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
    return RpnTargets(labels, matched, deltas)


class RcnnSampleKeys(NamedTuple):
    """The random numbers one RCNN sampling of a batch uses (drawn by :func:`draw_rcnn_keys`): a key per
    candidate for foreground and for background draws without replacement (largest keys win), and one uniform
    per slot for background draws with replacement (slot ``s`` takes pool member ``floor(u * pool size)``)."""

    fg: Tensor  # [B, M]
    bg: Tensor  # [B, M]
    replace: Tensor  # [B, S]


def draw_rcnn_keys(batch: int, candidates: int, slots: int, generator: torch.Generator | None,
                   device: torch.device) -> RcnnSampleKeys:
    return RcnnSampleKeys(_random_keys((batch, candidates), generator, device),
                          _random_keys((batch, candidates), generator, device),
                          _random_keys((batch, slots), generator, device))


class BatchedRcnnTargets(NamedTuple):
    """:class:`RcnnTargets` of a whole batch in ``[B, S]`` slots (foreground first in each image), + ``valid``."""

    proposals: Tensor  # [B, S, 6]
    labels: Tensor  # [B, S]
    deltas: Tensor  # [B, S, 6]
    matched_gt: Tensor  # [B, S]
    valid: Tensor  # [B, S]


@torch.no_grad()
def sample_rcnn_batched(
    proposals: Tensor,
    proposal_valid: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    keys: RcnnSampleKeys,
    *,
    fg_iou: float = 0.5,
    bg_iou: float = 0.1,
    batch_size: int = 64,
    fg_fraction: float = 0.5,
    box_coder: BoxCoder | None = None,
    ignore_boxes: Tensor | None = None,
    ignore_valid: Tensor | None = None,
) -> BatchedRcnnTargets:
    """The rules of :func:`assign_rcnn_targets` (ground truth appended to the proposals, class 1, background with
    replacement when short) for every image at once, drawing from ``keys`` instead of a per-image ``randperm``.

    ``proposals [B, P, 6]`` + ``proposal_valid [B, P]`` (valid ones first), padded ``gt_boxes [B, G, 6]`` +
    ``gt_valid``. Candidates are the P proposal slots then the G ground-truth slots (``keys`` are ``[B, P + G]``).
    Returns ``batch_size`` slots per image: foreground (at most ``round(fg_fraction * batch_size)``, largest
    ``keys.fg`` first) then background; slots past an image's sample are ``valid = False``. With padded
    ``ignore_boxes [B, K, 6]`` + ``ignore_valid [B, K]``, no candidate near one is drawn as background (module doc).
    """
    coder = box_coder or BoxCoder()
    b, p = proposal_valid.shape
    slots = batch_size
    candidates = torch.cat((proposals.detach().float(), gt_boxes.float()), dim=1)  # [B, M, 6]
    valid = torch.cat((proposal_valid, gt_valid), dim=1)
    may_be_bg = valid  # candidates background may be drawn from
    if ignore_boxes is not None and ignore_valid is not None:
        may_be_bg = valid & ~near_ignore_boxes(candidates, ignore_boxes, ignore_valid, bg_iou)
    iou = box_iou_batched(candidates, gt_boxes.float())
    iou = torch.where(gt_valid[:, None, :], iou, torch.full_like(iou, -1.0))
    best_iou, best_gt = iou.max(dim=2)
    has_gt = gt_valid.any(dim=1, keepdim=True)  # [B, 1]
    fg_pool = valid & has_gt & (best_iou >= fg_iou)
    bg_pool = may_be_bg & has_gt & (best_iou < bg_iou)
    max_fg = int(round(fg_fraction * batch_size))
    n_fg = torch.clamp(fg_pool.sum(dim=1, keepdim=True), max=max_fg)
    n_bg_pool = bg_pool.sum(dim=1, keepdim=True)
    n_valid = may_be_bg.sum(dim=1, keepdim=True)  # all valid candidates without ignore boxes
    # Which pool the background comes from, how many, and whether with replacement (published cases).
    neither = (n_fg == 0) & (n_bg_pool == 0)
    pool = torch.where(has_gt & ~neither, bg_pool, may_be_bg)
    n_pool = torch.where(has_gt & ~neither, n_bg_pool, n_valid)
    n_bg = torch.where(has_gt, torch.where(neither, slots * (n_valid > 0),
                                           torch.where(n_fg > 0, slots - n_fg, slots) * (n_bg_pool > 0)),
                       torch.clamp(n_valid, max=slots))
    replace = has_gt & (n_bg > n_pool)

    fg_order = torch.sort(torch.where(fg_pool, keys.fg, -1.0), dim=1, descending=True).indices
    bg_order = torch.sort(torch.where(pool, keys.bg, -1.0), dim=1, descending=True).indices
    by_index = torch.sort((~pool).to(torch.uint8), dim=1, stable=True).indices  # pool members in candidate order
    slot = torch.arange(slots, device=valid.device)[None, :]
    drawn = torch.floor(keys.replace * n_pool).long().clamp(max=by_index.shape[1] - 1)
    bg_pick = torch.where(replace, by_index.gather(1, drawn), bg_order[:, :slots] if bg_order.shape[1] >= slots
                          else bg_order.gather(1, slot.clamp(max=bg_order.shape[1] - 1).expand(b, -1)))
    bg_slot = (slot - n_fg).clamp(min=0)
    chosen = torch.where(slot < n_fg, fg_order.gather(1, slot.clamp(max=fg_order.shape[1] - 1).expand(b, -1)),
                         bg_pick.gather(1, bg_slot))
    is_fg = slot < n_fg
    in_sample = slot < n_fg + n_bg
    boxes = candidates.gather(1, chosen[..., None].expand(-1, -1, 6))
    matched = torch.where(is_fg, best_gt.gather(1, chosen), -1)
    labels = is_fg.long()
    target = gt_boxes.float().gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 6))
    deltas = coder.encode(boxes.reshape(-1, 6), target.reshape(-1, 6)).float().view(b, slots, 6)
    deltas = torch.where(is_fg[..., None], deltas, torch.zeros_like(deltas))
    return BatchedRcnnTargets(boxes, labels, deltas, matched, in_sample)

