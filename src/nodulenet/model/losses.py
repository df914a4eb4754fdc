"""Losses of the three NoduleNet heads: RPN, RCNN (false-positive reduction) and mask (segmentation).

Deltas are :class:`~nodulenet.model.box_coder.BoxCoder` deltas ``(dz, dy, dx, dd, dh, dw)``; targets come
from :mod:`nodulenet.model.targets` (labels 1 positive / 0 negative / -1 ignored for the RPN).

Published behaviour reproduced by default (``uci-cbcl/NoduleNet``, ``net/layer/rpn_loss.py``,
``rcnn_loss.py``, ``mask_loss.py``):

* RPN classification: ``0.5 * mean BCE(positives) + 0.5 * mean BCE(sampled negatives)``; regression: smooth
  L1 with beta 1 (PyTorch's default; the published ``delta_sigma`` argument is unused), averaged over
  positives for each of the 6 coordinates and summed over coordinates.
* RCNN classification: cross entropy with class weights ``total / count`` (every class present in the
  sample contributes its mean loss equally); regression as the RPN, on foreground rows, using the deltas
  predicted for the matched class.
* Mask: soft Dice ``1 - sum(p*g) / (0.5 * (sum p + sum g) + 1e-5)`` per detection crop, only for crops
  whose target has foreground (the others would teach "empty" from crops that may hold a missed nodule).
  The published code *sums* over crops; the default here averages (``reduction="sum"`` restores it).

Everything runs in float32 whatever autocast hands over (log-sigmoid, exp and sums over 10^5 voxels lose
too much in bf16). Empty inputs (no positive, no foreground, no detections) give exact zeros that are
still connected to the graph, never NaN: a 0/0 mean would poison the optimiser state, and a loss that does
not depend on a head's outputs makes DistributedDataParallel complain about unused parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from nodulenet.model.targets import LABEL_NEGATIVE, LABEL_POSITIVE, RcnnTargets, RpnTargets

__all__ = ["sigmoid_focal_loss", "soft_dice_loss", "rpn_loss", "rcnn_loss", "mask_loss"]

Reduction = Literal["none", "mean", "sum"]


def _graph_zero(*tensors: Tensor) -> Tensor:
    """A float32 scalar 0 that depends on ``tensors`` (zero gradient), computed without touching any value,
    so inf/NaN entries in ignored positions cannot leak into it."""
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for tensor in tensors:
        total = total + tensor.reshape(-1)[:0].float().sum()
    return total


def _reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else _graph_zero(loss)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
) -> Tensor:
    """Focal loss (Lin et al. 2017) of binary ``logits`` against ``targets`` in [0, 1], same shape.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE``, with ``p_t`` the probability of the true class and
    ``alpha_t = alpha`` for targets 1, ``1 - alpha`` for targets 0; ``alpha < 0`` disables the weighting.
    Computed in float32. ``reduction="mean"`` of an empty input is 0, not NaN.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    logits = logits.float()
    targets = targets.float()
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, reduction)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 for an empty mask. ``where`` (not multiply) keeps inf out."""
    picked = torch.where(mask, values, torch.zeros_like(values))
    return picked.sum() / mask.sum().clamp(min=1)


def _smooth_l1_sum_over_coords(deltas: Tensor, targets: Tensor, beta: float) -> Tensor:
    return F.smooth_l1_loss(deltas.float(), targets.float(), reduction="none", beta=beta).sum(dim=-1)


def rpn_loss(
    logits: Tensor,
    deltas: Tensor,
    targets: RpnTargets,
    *,
    focal: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    smooth_l1_beta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """RPN ``(classification, regression)`` losses, scalar float32 tensors.

    ``logits``: ``[A]``, ``[B, A]`` or either with a trailing 1; ``deltas``: the same leading shape + ``6``;
    ``targets``: labels after :func:`~nodulenet.model.targets.sample_rpn_anchors` (ignored = -1), same
    leading shape. Default classification is the published balanced BCE (see module doc). ``focal=True``
    instead sums :func:`sigmoid_focal_loss` over all labelled anchors and divides by the number of positives
    (at least 1), as RetinaNet; pair it with ``num_neg`` large / ``num_hard = 0`` sampling. Regression is
    smooth L1 over positives (sum over the 6 coordinates, mean over positives).
    """
    labels = targets.labels.reshape(-1)
    if logits.numel() != labels.numel():
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(targets.labels.shape)}")
    if deltas.numel() != 6 * labels.numel() or deltas.shape[-1] != 6:
        raise ValueError(f"deltas {tuple(deltas.shape)} do not match labels {tuple(targets.labels.shape)} x 6")
    flat_logits = logits.reshape(-1).float()
    positive = labels == LABEL_POSITIVE
    negative = labels == LABEL_NEGATIVE

    if focal:
        labelled = positive | negative
        focal_terms = sigmoid_focal_loss(flat_logits, positive.float(), focal_alpha, focal_gamma)
        cls = torch.where(labelled, focal_terms, torch.zeros_like(focal_terms)).sum()
        cls = cls / positive.sum().clamp(min=1)
    else:
        bce = F.binary_cross_entropy_with_logits(flat_logits, positive.float(), reduction="none")
        cls = 0.5 * _masked_mean(bce, positive) + 0.5 * _masked_mean(bce, negative)

    reg_terms = _smooth_l1_sum_over_coords(deltas.reshape(-1, 6), targets.deltas.reshape(-1, 6), smooth_l1_beta)
    reg = _masked_mean(reg_terms, positive)
    return cls, reg


def rcnn_loss(
    class_logits: Tensor,
    deltas: Tensor,
    targets: RcnnTargets,
    *,
    focal: bool = False,
    focal_gamma: float = 2.0,
    class_balanced: bool = True,
    smooth_l1_beta: float = 1.0,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """RCNN ``(classification, regression)`` losses, scalar float32 tensors.

    ``class_logits``: ``[S, C]`` (C = 2: background, nodule); ``deltas``: ``[S, 6]`` or per class
    ``[S, C * 6]`` (the published head), in which case the matched class's 6 deltas are used.
    Classification is cross entropy, class-balanced by default (published); ``focal=True`` multiplies each
    term by ``(1 - p_true) ** focal_gamma``. Regression covers foreground rows only. ``S = 0`` gives zeros.
    ``valid [S]`` (bool) leaves the other rows out (the padded slots of a batched sample) as if they were not
    there; without it every row counts.
    """
    if valid is not None:
        return _rcnn_loss_masked(class_logits, deltas, targets, valid, focal, focal_gamma, class_balanced,
                                 smooth_l1_beta)
    labels = targets.labels
    num_samples = labels.shape[0]
    if class_logits.dim() != 2 or class_logits.shape[0] != num_samples:
        raise ValueError(f"class_logits must be [{num_samples}, C], got {tuple(class_logits.shape)}")
    num_classes = class_logits.shape[1]
    if deltas.shape == (num_samples, num_classes * 6) and num_classes > 1:
        per_class = deltas.reshape(num_samples, num_classes, 6)
        deltas = per_class.gather(1, labels.view(-1, 1, 1).expand(-1, 1, 6)).squeeze(1)
    elif deltas.shape != (num_samples, 6):
        raise ValueError(f"deltas must be [{num_samples}, 6] or [{num_samples}, {num_classes * 6}], "
                         f"got {tuple(deltas.shape)}")
    if num_samples == 0:
        return _graph_zero(class_logits), _graph_zero(deltas)

    logits = class_logits.float()
    class_weight = None
    if class_balanced:
        counts = torch.bincount(labels, minlength=num_classes).float()
        class_weight = num_samples / counts.clamp(min=1)
        class_weight = class_weight / class_weight.sum()
    per_sample = F.cross_entropy(logits, labels, weight=class_weight, reduction="none")
    if focal:
        p_true = torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
        per_sample = per_sample * (1 - p_true) ** focal_gamma
    if class_weight is not None:
        cls = per_sample.sum() / class_weight[labels].sum()
    else:
        cls = per_sample.sum() / num_samples

    reg_terms = _smooth_l1_sum_over_coords(deltas, targets.deltas, smooth_l1_beta)
    reg = _masked_mean(reg_terms, labels > 0)
    return cls, reg


def _rcnn_loss_masked(class_logits: Tensor, deltas: Tensor, targets: RcnnTargets, valid: Tensor, focal: bool,
                      focal_gamma: float, class_balanced: bool, smooth_l1_beta: float) -> tuple[Tensor, Tensor]:
    """:func:`rcnn_loss` over the rows where ``valid``, with static shapes (no host round trip)."""
    labels = targets.labels
    num_samples = labels.shape[0]
    num_classes = class_logits.shape[1]
    per_class = deltas.reshape(num_samples, num_classes, 6)
    deltas = per_class.gather(1, labels.view(-1, 1, 1).expand(-1, 1, 6)).squeeze(1)
    logits = class_logits.float()
    weight = valid.float()
    if class_balanced:
        # scatter_add, not bincount: bincount sizes its output from the data (a host round trip on a GPU).
        counts = weight.new_zeros(num_classes).scatter_add_(0, labels, weight)
        class_weight = weight.sum() / counts.clamp(min=1)
        class_weight = class_weight / class_weight.sum().clamp(min=1e-12)  # all rows padding: weights 0, not NaN
        per_sample = F.cross_entropy(logits, labels, weight=class_weight, reduction="none")
        norm = (class_weight[labels] * weight).sum()
    else:
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        norm = weight.sum()
    if focal:
        p_true = torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
        per_sample = per_sample * (1 - p_true) ** focal_gamma
    cls = torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum() / norm.clamp(min=1e-12)
    reg_terms = _smooth_l1_sum_over_coords(deltas, targets.deltas, smooth_l1_beta)
    reg = _masked_mean(reg_terms, valid & (labels > 0))
    return cls, reg


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Soft Dice loss of one crop: ``1 - sum(p*g) / (0.5 * (sum p + sum g) + eps)``, ``p = sigmoid(logits)``.

    Equal to the published Tversky form with alpha = beta = 0.5. Scalar float32; any shape.
    """
    prob = torch.sigmoid(logits.float()).reshape(-1)
    truth = target.float().reshape(-1)
    overlap = (prob * truth).sum()
    return 1 - overlap / (0.5 * (prob.sum() + truth.sum()) + eps)


def mask_loss(
    mask_logits: Sequence[Tensor],
    mask_targets: Sequence[Tensor],
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 0.0,
    skip_empty_targets: bool = True,
    dice_eps: float = 1e-5,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Mask-head loss over detection crops (lists: crops differ in size), scalar float32.

    Crop ``i`` contributes ``dice_weight * soft_dice + bce_weight * mean BCE`` of ``mask_logits[i]``
    against the binary ``mask_targets[i]`` (same shape). With ``skip_empty_targets`` (published) crops whose
    target has no foreground are left out. The contributions are averaged (``"mean"``, default) or summed
    (``"sum"``, published) over the crops that count; none counting gives 0.
    """
    if len(mask_logits) != len(mask_targets):
        raise ValueError(f"{len(mask_logits)} mask logits but {len(mask_targets)} mask targets")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if len(mask_logits) == 0:
        return torch.zeros((), dtype=torch.float32)
    terms: list[Tensor] = []
    for index, (logits, target) in enumerate(zip(mask_logits, mask_targets)):
        if logits.shape != target.shape:
            raise ValueError(f"crop {index}: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
        if skip_empty_targets and not bool((target > 0).any()):
            continue
        term = _graph_zero(logits)
        if dice_weight:
            term = term + dice_weight * soft_dice_loss(logits, target, dice_eps)
        if bce_weight:
            term = term + bce_weight * _reduce(
                F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none"), "mean"
            )
        terms.append(term)
    if not terms:
        return _graph_zero(*mask_logits)
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total
