"""RPN / RCNN target assignment and sampling on hand-made cases (IoUs worked out in the comments).

Boxes are (z0, y0, x0, z1, y1, x1) voxels, z1 exclusive. The nodule box used throughout is
GT = (10, 10, 10, 20, 20, 20): a 10-voxel cube of volume 1000.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from nodulenet.model.anchors import make_anchors
from nodulenet.model.box_coder import BoxCoder
from nodulenet.model.box_ops import box_iou_3d
from nodulenet.model.targets import (
    RcnnTargets,
    assign_rcnn_targets,
    assign_rpn_targets,
    sample_rpn_anchors,
    stack_rpn_targets,
)

GT = torch.tensor([[10.0, 10.0, 10.0, 20.0, 20.0, 20.0]])


def shifted(dz: float, base: torch.Tensor = GT) -> torch.Tensor:
    return base + torch.tensor([dz, 0, 0, dz, 0, 0])


# ----------------------------------------------------------------------------- assign_rpn_targets
def test_rpn_positive_ignore_and_negative_bands() -> None:
    anchors = torch.cat([
        shifted(0),      # IoU 1
        shifted(2),      # inter 800, union 1200: IoU 0.667 -> positive
        shifted(5),      # inter 500, union 1500: IoU 0.333 -> ignored
        shifted(9),      # inter 100, union 1900: IoU 0.053 -> ignored (>= 0.02)
        shifted(9.9),    # inter 10, union 1990: IoU 0.005 -> negative
        shifted(100),    # IoU 0 -> negative
    ])
    targets = assign_rpn_targets(anchors, GT)
    assert targets.labels.dtype == torch.int8
    assert targets.labels.tolist() == [1, 1, -1, -1, 0, 0]
    assert targets.matched_gt.tolist() == [0, 0, -1, -1, -1, -1]
    expected = torch.zeros(6, 6)
    expected[1, 0] = -0.2  # anchor centre z 17, nodule 15, anchor depth 10
    assert_close(targets.deltas, expected)


def test_rpn_best_anchor_rule_rescues_a_nodule_without_good_anchor() -> None:
    anchors = torch.cat([shifted(9), shifted(5), shifted(100)])  # IoU 0.053, 0.333, 0
    with_rule = assign_rpn_targets(anchors, GT)
    assert with_rule.labels.tolist() == [-1, 1, 0]
    assert with_rule.matched_gt.tolist() == [-1, 0, -1]
    assert_close(with_rule.deltas[1], torch.tensor([-0.5, 0, 0, 0, 0, 0]))
    without = assign_rpn_targets(anchors, GT, allow_low_quality=False)
    assert without.labels.tolist() == [-1, -1, 0]


def test_rpn_best_anchor_ties_all_become_positive() -> None:
    anchors = torch.cat([shifted(5), shifted(-5), shifted(7)])  # 1/3, 1/3, 3/17
    assert assign_rpn_targets(anchors, GT).labels.tolist() == [1, 1, -1]


def test_rpn_nodule_touching_no_anchor_makes_no_positive() -> None:
    # Its best IoU is 0: the published rule would have made every anchor (all tied at 0) positive.
    anchors = torch.cat([shifted(100), shifted(200)])
    targets = assign_rpn_targets(anchors, GT)
    assert targets.labels.tolist() == [0, 0]


def test_rpn_empty_ground_truth_is_all_negative_and_finite() -> None:
    anchors = make_anchors((4, 4, 4), 4)
    targets = assign_rpn_targets(anchors, torch.zeros(0, 6))
    assert (targets.labels == 0).all()
    assert (targets.matched_gt == -1).all()
    assert torch.equal(targets.deltas, torch.zeros(anchors.shape[0], 6))


def test_rpn_two_nodules_match_their_own_anchors() -> None:
    gts = torch.cat([GT, shifted(50)])
    anchors = torch.cat([shifted(51), shifted(1), shifted(25)])  # IoU 0.82 with gt1, 0.82 with gt0, 0 / 0
    targets = assign_rpn_targets(anchors, gts)
    assert targets.labels.tolist() == [1, 1, 0]
    assert targets.matched_gt.tolist() == [1, 0, -1]
    assert_close(targets.deltas[0, 0], torch.tensor(-0.1))
    assert_close(targets.deltas[1, 0], torch.tensor(-0.1))


def test_rpn_targets_on_published_anchor_grid() -> None:
    anchors = make_anchors((32, 32, 32), 4)  # 163840 anchors of a 128^3 crop
    nodule = torch.tensor([[54.3, 44.7, 64.1, 66.3, 56.7, 76.1]])  # 12-voxel nodule, off the grid
    targets = assign_rpn_targets(anchors, nodule)
    positive = targets.labels == 1
    iou = box_iou_3d(anchors, nodule)[:, 0]
    assert torch.equal(positive, (iou >= 0.5) | (iou == iou.max()))
    assert int(positive.sum()) >= 1
    assert torch.equal(targets.labels == 0, iou < 0.02)
    decoded = BoxCoder().decode(anchors[positive], targets.deltas[positive])
    assert_close(decoded, nodule.expand_as(decoded), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- sample_rpn_anchors
def test_sampling_keeps_one_positive_and_num_neg_negatives() -> None:
    labels = torch.cat([torch.ones(5), torch.zeros(1000), -torch.ones(7)]).to(torch.int8)
    sampled = sample_rpn_anchors(labels, generator=torch.Generator().manual_seed(0))
    assert sampled.dtype == torch.int8 and sampled.shape == labels.shape
    assert int((sampled == 1).sum()) == 1
    assert int((sampled == 0).sum()) == 800
    assert (sampled[1005:] == -1).all()  # ignored stay ignored
    assert ((sampled == 1) <= (labels == 1)).all() and ((sampled == 0) <= (labels == 0)).all()
    everything = sample_rpn_anchors(labels, max_pos=None, num_neg=5000)
    assert torch.equal(everything, labels)


def test_hard_negative_mining_keeps_the_highest_scoring_negatives() -> None:
    labels = torch.tensor([1, 0, 0, 0, 0, 0, -1], dtype=torch.int8)
    logits = torch.tensor([0.0, -3.0, 2.0, -1.0, 5.0, 1.0, 9.0])
    # 1 positive x num_hard 3 -> the negatives with logits 5, 2, 1 (the ignored 9 does not count).
    sampled = sample_rpn_anchors(labels, logits, num_neg=800, num_hard=3)
    assert sampled.tolist() == [1, -1, 0, -1, 0, 0, -1]
    # Trailing singleton of the head output is accepted.
    assert torch.equal(sample_rpn_anchors(labels, logits[:, None], num_hard=3), sampled)
    # No positive anywhere: num_hard negatives instead of an empty (NaN) set.
    no_pos = sample_rpn_anchors(torch.zeros(6, dtype=torch.int8), torch.arange(6.0), num_hard=2)
    assert no_pos.tolist() == [-1, -1, -1, -1, 0, 0]


def test_batched_sampling_is_per_crop_but_mining_is_batch_wide() -> None:
    labels = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.int8)
    logits = torch.tensor([[0.0, 0, 9, 8, 7, 6], [0.0, 1, 2, 3, 4, 5]])
    sampled = sample_rpn_anchors(labels, logits, num_hard=2, generator=torch.Generator().manual_seed(1))
    assert (sampled == 1).sum(dim=1).tolist() == [1, 1]  # one positive per crop
    # 2 positives x 2 -> the 4 hardest negatives of the whole batch, all in crop 0 (logits 9, 8, 7, 6).
    assert (sampled[0, 2:] == 0).all() and not (sampled[1] == 0).any()


def test_sampling_is_reproducible_with_a_generator() -> None:
    labels = torch.cat([torch.ones(20), torch.zeros(5000)]).to(torch.int8)
    first = sample_rpn_anchors(labels, generator=torch.Generator().manual_seed(3))
    again = sample_rpn_anchors(labels, generator=torch.Generator().manual_seed(3))
    other = sample_rpn_anchors(labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_stack_rpn_targets() -> None:
    anchors = torch.cat([shifted(0), shifted(100)])
    stacked = stack_rpn_targets([assign_rpn_targets(anchors, GT), assign_rpn_targets(anchors, GT[:0])])
    assert stacked.labels.tolist() == [[1, 0], [0, 0]] and stacked.deltas.shape == (2, 2, 6)


# ----------------------------------------------------------------------------- assign_rcnn_targets
def _near(n: int) -> torch.Tensor:  # IoU >= 0.5 with GT (shift of up to 1.5 voxels: IoU >= 0.74)
    return torch.cat([shifted(0.1 * (i % 16) - 0.75) for i in range(n)])


def _far(n: int) -> torch.Tensor:  # IoU 0
    return torch.cat([shifted(40 + 12 * i) for i in range(n)])


def _band(n: int) -> torch.Tensor:  # IoU 0.25-0.33: neither foreground nor background
    return torch.cat([shifted(5 + 0.1 * i) for i in range(n)])


def test_rcnn_balanced_batch_foreground_first() -> None:
    proposals = torch.cat([_near(40), _far(100), _band(10)])
    out = assign_rcnn_targets(proposals, GT, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, RcnnTargets)
    assert out.proposals.shape == (64, 6) and out.deltas.shape == (64, 6)
    assert out.labels.tolist() == [1] * 32 + [0] * 32
    assert out.matched_gt.tolist() == [0] * 32 + [-1] * 32
    iou = box_iou_3d(out.proposals, GT)[:, 0]
    assert (iou[:32] >= 0.5).all() and (iou[32:] < 0.1).all()
    assert len({tuple(b.tolist()) for b in out.proposals[32:]}) == 32  # enough background: no repeats
    assert_close(out.deltas[:32], BoxCoder().encode(out.proposals[:32], GT.expand(32, 6)))
    assert torch.equal(out.deltas[32:], torch.zeros(32, 6))


def test_rcnn_background_drawn_with_replacement_when_short() -> None:
    far = _far(3)
    out = assign_rcnn_targets(torch.cat([_near(5), far]), GT, generator=torch.Generator().manual_seed(0))
    # 5 near + the nodule box itself = 6 foreground; 58 background from only 3 boxes (published).
    assert out.labels.tolist() == [1] * 6 + [0] * 58
    assert all(any(torch.equal(row, f) for f in far) for row in out.proposals[6:])
    assert any(torch.equal(row, GT[0]) for row in out.proposals[:6])
    no_repeat = assign_rcnn_targets(torch.cat([_near(5), far]), GT, bg_with_replacement=False)
    assert no_repeat.labels.tolist() == [1] * 6 + [0] * 3


def test_rcnn_ground_truth_is_a_proposal_even_when_rpn_finds_nothing() -> None:
    out = assign_rcnn_targets(torch.zeros(0, 6), GT, gt_labels=torch.tensor([2]))
    assert out.labels.tolist() == [2]  # only foreground: the batch is just that
    assert_close(out.proposals, GT)
    assert torch.equal(out.deltas, torch.zeros(1, 6))


def test_rcnn_without_nodules_is_background_only() -> None:
    out = assign_rcnn_targets(_far(100), torch.zeros(0, 6), generator=torch.Generator().manual_seed(0))
    assert out.labels.tolist() == [0] * 64 and (out.matched_gt == -1).all()
    assert len({tuple(b.tolist()) for b in out.proposals}) == 64
    assert assign_rcnn_targets(_far(10), torch.zeros(0, 6)).labels.tolist() == [0] * 10
    empty = assign_rcnn_targets(torch.zeros(0, 6), torch.zeros(0, 6))
    assert empty.proposals.shape == (0, 6) and empty.labels.shape == (0,) and empty.deltas.shape == (0, 6)


def test_rcnn_only_ambiguous_proposals() -> None:
    # Without the nodule box appended and only proposals in the 0.1-0.5 band there is neither class:
    # the published code then trains on batch_size random proposals as background.
    out = assign_rcnn_targets(_band(10), GT, add_gt_to_proposals=False, generator=torch.Generator().manual_seed(0))
    assert out.labels.tolist() == [0] * 64


@pytest.mark.parametrize("seed", [0, 1])
def test_rcnn_sampling_reproducible(seed: int) -> None:
    proposals = torch.cat([_near(50), _far(200)])
    a = assign_rcnn_targets(proposals, GT, generator=torch.Generator().manual_seed(seed))
    b = assign_rcnn_targets(proposals, GT, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a.proposals, b.proposals)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_targets_on_cuda_with_a_cpu_generator_match_cpu() -> None:
    anchors = make_anchors((16, 16, 16), 4)
    nodule = torch.tensor([[20.3, 24.7, 30.1, 32.3, 36.7, 42.1]])
    cpu = assign_rpn_targets(anchors, nodule)
    gpu = assign_rpn_targets(anchors.cuda(), nodule.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    logits = torch.randn(anchors.shape[0], generator=torch.Generator().manual_seed(0))
    sampled_cpu = sample_rpn_anchors(cpu.labels, logits, generator=torch.Generator().manual_seed(1))
    sampled_gpu = sample_rpn_anchors(gpu.labels, logits.cuda(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled_cpu, sampled_gpu.cpu())
    proposals = torch.cat([_near(20), _far(80)])
    rcnn_cpu = assign_rcnn_targets(proposals, GT, generator=torch.Generator().manual_seed(2))
    rcnn_gpu = assign_rcnn_targets(proposals.cuda(), GT.cuda(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(rcnn_cpu.proposals, rcnn_gpu.proposals.cpu())
