"""Loss functions against values worked out by hand with the math module, plus the empty-input cases
that must stay finite (and keep a gradient path) during training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nodulenet.model.losses import mask_loss, rcnn_loss, rpn_loss, sigmoid_focal_loss, soft_dice_loss
from nodulenet.model.targets import RcnnTargets, RpnTargets

LN2 = math.log(2.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def rpn_targets(labels: list[int], deltas: torch.Tensor | None = None) -> RpnTargets:
    n = len(labels)
    return RpnTargets(
        torch.tensor(labels, dtype=torch.int8),
        torch.tensor([0 if label == 1 else -1 for label in labels]),
        deltas if deltas is not None else torch.zeros(n, 6),
    )


# ----------------------------------------------------------------------------- focal loss
def test_sigmoid_focal_loss_hand_values() -> None:
    # logit 0, target 1: p_t = 0.5, BCE = ln 2, (1 - 0.5)^2 = 0.25, alpha_t = 0.25.
    first = 0.25 * 0.25 * LN2
    # logit 2, target 0: p = sigmoid(2), BCE = -ln(1 - p), p_t = 1 - p, alpha_t = 0.75.
    p = sigmoid(2.0)
    second = 0.75 * p ** 2 * -math.log(1 - p)
    loss = sigmoid_focal_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert_close(loss, torch.tensor([first, second]))
    assert_close(sigmoid_focal_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), reduction="sum"),
                 torch.tensor(first + second))
    # gamma 0 and no alpha: plain BCE.
    x, t = torch.randn(50), (torch.rand(50) > 0.5).float()
    assert_close(sigmoid_focal_loss(x, t, alpha=-1, gamma=0, reduction="mean"),
                 F.binary_cross_entropy_with_logits(x, t))
    empty = sigmoid_focal_loss(torch.zeros(0), torch.zeros(0), reduction="mean")
    assert empty.item() == 0.0


# ----------------------------------------------------------------------------- RPN
def test_rpn_loss_hand_values() -> None:
    # Positive logit 0: BCE ln 2. Negatives with logits 0 and ln 3 (p = 0.75): ln 2 and ln 4, mean 1.5 ln 2.
    # Ignored anchor: infinite logit and deltas, must not matter.
    logits = torch.tensor([0.0, 0.0, math.log(3.0), math.inf])
    deltas = torch.zeros(4, 6)
    deltas[0] = torch.tensor([0.5, 0, 0, 2.0, 0, 0])  # smooth L1 (beta 1): 0.125 + 1.5
    deltas[3] = math.inf
    cls, reg = rpn_loss(logits, deltas, rpn_targets([1, 0, 0, -1]))
    assert_close(cls, torch.tensor(0.5 * LN2 + 0.5 * 1.5 * LN2))
    assert_close(reg, torch.tensor(1.625))


def test_rpn_loss_batched_shapes_equal_flat() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 1, generator=g)
    deltas = torch.randn(2, 30, 6, generator=g)
    labels = torch.randint(-1, 2, (2, 30), generator=g).to(torch.int8)
    target_deltas = torch.randn(2, 30, 6, generator=g)
    batched = RpnTargets(labels, torch.zeros(2, 30, dtype=torch.long), target_deltas)
    flat = RpnTargets(labels.reshape(-1), torch.zeros(60, dtype=torch.long), target_deltas.reshape(-1, 6))
    for a, b in zip(rpn_loss(logits, deltas, batched), rpn_loss(logits.reshape(-1), deltas.reshape(-1, 6), flat)):
        assert_close(a, b)


def test_rpn_loss_without_positives_is_finite_with_zero_regression() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    deltas = torch.randn(3, 6, requires_grad=True)
    cls, reg = rpn_loss(logits, deltas, rpn_targets([0, 0, -1]))
    # Published: 0.5 * mean BCE over negatives = 0.5 * (ln 2 + softplus(1)) / 2.
    assert_close(cls, torch.tensor(0.5 * (LN2 + math.log1p(math.e)) / 2))
    assert reg.item() == 0.0
    (cls + reg).backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(deltas.grad, torch.zeros(3, 6))
    # Nothing labelled at all: both exactly 0, still differentiable.
    logits.grad = None
    cls, reg = rpn_loss(logits, deltas, rpn_targets([-1, -1, -1]))
    assert cls.item() == 0.0 and reg.item() == 0.0
    (cls + reg).backward()
    assert torch.equal(logits.grad, torch.zeros(3))


def test_rpn_focal_loss_normalised_by_positives() -> None:
    logits = torch.tensor([1.0, -1.0, 0.5, 3.0, -2.0])
    labels = [1, 1, 0, 0, -1]
    expected = (
        sigmoid_focal_loss(logits[:4], torch.tensor([1.0, 1.0, 0.0, 0.0]), reduction="sum") / 2
    )
    cls, _ = rpn_loss(logits, torch.zeros(5, 6), rpn_targets(labels), focal=True)
    assert_close(cls, expected)


# ----------------------------------------------------------------------------- RCNN
def rcnn_targets(labels: list[int], deltas: torch.Tensor | None = None) -> RcnnTargets:
    n = len(labels)
    return RcnnTargets(torch.zeros(n, 6), torch.tensor(labels), deltas if deltas is not None else torch.zeros(n, 6),
                       torch.tensor([0 if label else -1 for label in labels]))


def test_rcnn_class_balanced_cross_entropy_hand_values() -> None:
    # One foreground, three background. Class-balanced CE = mean over classes of each class's mean CE.
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    ce = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(-2.0)), LN2, math.log(1 + math.exp(3.0))]
    balanced = 0.5 * ce[0] + 0.5 * (ce[1] + ce[2] + ce[3]) / 3
    cls, reg = rcnn_loss(logits, torch.zeros(4, 6), rcnn_targets([1, 0, 0, 0]))
    assert_close(cls, torch.tensor(balanced))
    assert reg.item() == 0.0
    plain, _ = rcnn_loss(logits, torch.zeros(4, 6), rcnn_targets([1, 0, 0, 0]), class_balanced=False)
    assert_close(plain, torch.tensor(sum(ce) / 4))
    # Focal: each term times (1 - p_true)^2.
    p_true = [math.exp(-c) for c in ce]
    focal = 0.5 * ce[0] * (1 - p_true[0]) ** 2 + 0.5 * sum(c * (1 - p) ** 2 for c, p in zip(ce[1:], p_true[1:])) / 3
    focal_cls, _ = rcnn_loss(logits, torch.zeros(4, 6), rcnn_targets([1, 0, 0, 0]), focal=True)
    assert_close(focal_cls, torch.tensor(focal))


def test_rcnn_regression_uses_matched_class_deltas_on_foreground_only() -> None:
    targets = rcnn_targets([1, 0], torch.tensor([[0.1, 0, 0, 0, 0, 0], [0.0] * 6]))
    per_class = torch.zeros(2, 12)
    per_class[0, 6:] = torch.tensor([0.1, 0, 0, 0, 0, 3.0])  # class-1 deltas of the fg row: |3| - 0.5 = 2.5
    per_class[0, :6] = 100.0                                 # class-0 deltas: ignored
    per_class[1] = 100.0                                     # background row: ignored
    _, reg = rcnn_loss(torch.zeros(2, 2), per_class, targets)
    assert_close(reg, torch.tensor(2.5))
    _, reg6 = rcnn_loss(torch.zeros(2, 2), per_class[:, 6:], targets)
    assert_close(reg6, torch.tensor(2.5))


def test_rcnn_empty_sample_gives_zero_losses() -> None:
    logits = torch.zeros(0, 2, requires_grad=True)
    deltas = torch.zeros(0, 12, requires_grad=True)
    cls, reg = rcnn_loss(logits, deltas, rcnn_targets([]))
    assert cls.item() == 0.0 and reg.item() == 0.0
    (cls + reg).backward()
    assert logits.grad is not None


# ----------------------------------------------------------------------------- mask
def test_soft_dice_golden_values() -> None:
    # 8 voxels at p = 0.5, 4 of them foreground: sum(pg) = 2, sum p = 4, sum g = 4 -> 1 - 2 / (4 + 1e-5).
    target = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]).reshape(2, 2, 2)
    assert_close(soft_dice_loss(torch.zeros(2, 2, 2), target), torch.tensor(1 - 2 / (4 + 1e-5)))
    # p = (0.9, 0.1, 0.8), g = (1, 0, 0): sum(pg) = 0.9, 0.5 * (1.8 + 1) = 1.4.
    logits = torch.tensor([logit(0.9), logit(0.1), logit(0.8)])
    assert_close(soft_dice_loss(logits, torch.tensor([1.0, 0, 0])), torch.tensor(1 - 0.9 / (1.4 + 1e-5)))
    # Published Tversky form (alpha = beta = 0.5) gives the same number.
    p, g = torch.sigmoid(logits), torch.tensor([1.0, 0, 0])
    tversky = 1 - (p * g).sum() / ((p * g).sum() + 0.5 * (p * (1 - g)).sum() + 0.5 * ((1 - p) * g).sum() + 1e-5)
    assert_close(soft_dice_loss(logits, g), tversky)


def test_mask_loss_over_crops_of_different_sizes() -> None:
    crop_a = (torch.zeros(2, 2, 2), torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]).reshape(2, 2, 2))
    crop_b = (torch.tensor([[[logit(0.9), logit(0.1), logit(0.8)]]]), torch.tensor([[[1.0, 0, 0]]]))
    crop_empty = (torch.randn(3, 4, 5), torch.zeros(3, 4, 5))  # no foreground: skipped (published)
    dice_a, dice_b = 1 - 2 / (4 + 1e-5), 1 - 0.9 / (1.4 + 1e-5)
    crops = [crop_a, crop_empty, crop_b]
    logits, targets = [c[0] for c in crops], [c[1] for c in crops]
    assert_close(mask_loss(logits, targets), torch.tensor((dice_a + dice_b) / 2))
    assert_close(mask_loss(logits, targets, reduction="sum"), torch.tensor(dice_a + dice_b))
    bce_a = LN2  # every voxel at p = 0.5
    bce_b = -(math.log(0.9) + math.log(0.9) + math.log(0.2)) / 3
    assert_close(mask_loss(logits, targets, bce_weight=1.0),
                 torch.tensor((dice_a + bce_a + dice_b + bce_b) / 2))
    with_empty = mask_loss(logits, targets, skip_empty_targets=False, dice_weight=0.0, bce_weight=1.0)
    bce_empty = F.binary_cross_entropy_with_logits(crop_empty[0], crop_empty[1]).item()
    assert_close(with_empty, torch.tensor((bce_a + bce_empty + bce_b) / 3))


def test_mask_loss_without_foreground_or_detections_is_zero() -> None:
    logits = [torch.randn(2, 3, 4, requires_grad=True)]
    loss = mask_loss(logits, [torch.zeros(2, 3, 4)])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits[0].grad, torch.zeros(2, 3, 4))
    assert mask_loss([], []).item() == 0.0
    with pytest.raises(ValueError):
        mask_loss([torch.zeros(2, 2)], [torch.zeros(3, 3)])


# ----------------------------------------------------------------------------- autocast
def test_losses_under_bf16_autocast_are_float32_and_close() -> None:
    g = torch.Generator().manual_seed(5)
    logits32 = torch.randn(200, generator=g)
    deltas32 = torch.randn(200, 6, generator=g)
    labels = torch.randint(-1, 2, (200,), generator=g).to(torch.int8)
    targets = RpnTargets(labels, torch.zeros(200, dtype=torch.long), torch.randn(200, 6, generator=g))
    masks = [torch.randn(12, 24, 24, generator=g)]
    mask_targets = [(torch.rand(12, 24, 24, generator=g) > 0.7).float()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, reg = rpn_loss(logits32.bfloat16(), deltas32.bfloat16(), targets)
        dice = mask_loss([m.bfloat16() for m in masks], mask_targets)
    assert cls.dtype == reg.dtype == dice.dtype == torch.float32
    ref_cls, ref_reg = rpn_loss(logits32.bfloat16().float(), deltas32.bfloat16().float(), targets)
    assert_close(cls, ref_cls)
    assert_close(reg, ref_reg)
    assert_close(dice, mask_loss([m.bfloat16().float() for m in masks], mask_targets))
