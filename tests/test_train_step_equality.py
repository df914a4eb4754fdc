"""The batched, device-resident training step computes what the old per-image, per-proposal step computed.

Reference: ``tests/_reference_step.py`` (the old implementation, kept only here). On a fixed batch and seed every
loss must agree within 1e-5 relative (fp32) and every parameter gradient within 1e-5 of the largest gradient, for
the default network and the FPN and focal-loss variants, with all three stages on. A second test profiles one
CPU step and fails if a host synchronisation (``aten::item`` / ``aten::_local_scalar_dense``) creeps back into
the RPN/RCNN part of the step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _reference_step import reference_losses
from nodulenet.model import NoduleNet, NoduleTargets, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")




SIZE = 48


def _sphere_batch(n_images: int = 3) -> tuple[torch.Tensor, list[NoduleTargets]]:
    """Bright spheres (0, 1 or 2 per image) in noise, with their boxes and tight masks."""
    gen = torch.Generator().manual_seed(11)
    z, y, x = torch.meshgrid(*(torch.arange(SIZE, dtype=torch.float32) + 0.5,) * 3, indexing="ij")
    images, targets = [], []
    centres = [[(20.0, 24.0, 18.0)], [(14.0, 30.0, 30.0), (34.0, 16.0, 22.0)], []]
    for i in range(n_images):
        image = -0.8 + 0.05 * torch.randn(SIZE, SIZE, SIZE, generator=gen)
        boxes, masks, origins = [], [], []
        for k, (cz, cy, cx) in enumerate(centres[i % len(centres)]):
            r = 4.0 + 2 * k
            sphere = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r
            image[sphere] = 0.6
            idx = torch.nonzero(sphere)
            lo, hi = idx.min(0).values, idx.max(0).values + 1
            boxes.append(torch.cat([lo - 2, hi + 2]).float())
            masks.append(sphere[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].to(torch.uint8))
            origins.append(lo)
        targets.append(NoduleTargets(torch.stack(boxes) if boxes else torch.zeros(0, 6), masks,
                                     torch.stack(origins) if origins else torch.zeros(0, 3, dtype=torch.long)))
        images.append(image)
    return torch.stack(images)[:, None], targets


def _config(**changes: object):
    base = dataclasses.replace(tiny_config(), blocks_per_stage=(1, 1, 1, 1, 1, 1), rpn_train_pre_nms_top_n=800,
                               rpn_train_post_nms_top_n=40, rcnn_crop_frame="voxel_corner")
    return dataclasses.replace(base, **changes)


def _grads(model: NoduleNet) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["default", "fpn", "focal", "published_frame"])
def test_batched_step_equals_the_old_step(variant: str) -> None:
    changes = {"default": {}, "fpn": {"fpn": True}, "focal": {"focal_loss": True},
               "published_frame": {"rcnn_crop_frame": "published"}}[variant]
    torch.manual_seed(0)
    model = NoduleNet(_config(**changes)).train()
    images, targets = _sphere_batch()
    stages = ("rpn", "rcnn", "mask")

    new = model.losses(images, targets, stages=stages, generator=torch.Generator().manual_seed(5))
    new["total"].backward()
    new_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    old = reference_losses(model, images, targets, stages, torch.Generator().manual_seed(5))
    old["total"].backward()
    old_grads = _grads(model)

    assert set(new) == set(old) == {"rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask", "total"}
    new = {k: float(v.detach()) for k, v in new.items()}
    old = {k: float(v.detach()) for k, v in old.items()}
    for key in old:
        assert old[key] > 0, f"{key} is 0: the comparison would not test anything"
        assert abs(new[key] - old[key]) <= 1e-5 * abs(old[key]), (key, new[key], old[key])
    assert set(new_grads) == set(old_grads)
    largest = max(float(g.abs().max()) for g in old_grads.values())
    worst = max(float((new_grads[n] - old_grads[n]).abs().max()) for n in old_grads)
    assert worst < 1e-5 * largest, (worst, largest)


def test_no_host_sync_in_the_rpn_and_rcnn_step() -> None:
    """A profiled CPU step (forward + backward, RPN and RCNN stages) has no aten::item/_local_scalar_dense: every
    such call is a point where a GPU step would stop and wait for the host. The old step made one per proposal
    group, per image and per hard-negative count."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = NoduleNet(_config()).train()
    images, targets = _sphere_batch()

    def step(stages: tuple[str, ...]) -> dict[str, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.losses(images, targets, stages=stages, generator=torch.Generator().manual_seed(5))["total"].backward()
        return {e.key: e.count for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")}

    assert step(("rpn", "rcnn")) == {}
    # The mask stage looks at the device twice - which crops match a nodule (one nonzero for the batch) and their
    # sizes (one tolist(); the padded groups' convolutions are shaped by them) - neither an aten::item per value;
    # it must not add per-crop item() calls either.
    assert step(("rpn", "rcnn", "mask")) == {}
    # The reference step does sync (so this test can tell the two apart).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        reference_losses(model, images, targets, ("rpn", "rcnn"), torch.Generator().manual_seed(5))
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense") > 0


# The survival-matrix path (whole, and built in many row chunks) and the per-round IoU path.
@pytest.mark.parametrize("n, matrix_limit, chunk", [(300, 1 << 28, 1 << 24), (2000, 1 << 28, 1 << 16), (2000, 0, 0)])
def test_batched_nms_equals_nms_3d_per_image(n: int, matrix_limit: int, chunk: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from nodulenet.model import box_ops
    from nodulenet.model.box_ops import nms_3d, nms_batched_top_k

    monkeypatch.setattr(box_ops, "_NMS_MATRIX_ELEMENTS", matrix_limit)
    monkeypatch.setattr(box_ops, "_NMS_MATRIX_CHUNK", chunk)

    gen = torch.Generator().manual_seed(n)
    b = 3
    centre, size = torch.rand(b, n, 3, generator=gen) * 60, torch.rand(b, n, 3, generator=gen) * 15
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=2)
    boxes[0, 5, 3:] = boxes[0, 5, :3]  # a zero-volume box: never suppresses, never suppressed
    scores, valid = torch.rand(b, n, generator=gen), torch.rand(b, n, generator=gen) > 0.2
    order = torch.sort(torch.where(valid, scores, -1.0), dim=1, descending=True, stable=True).indices
    sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 6))
    for k in (40, n + 5):
        index, kept = nms_batched_top_k(sorted_boxes, valid.gather(1, order), 0.1, k)
        for i in range(b):
            real = torch.nonzero(valid[i]).squeeze(1)
            expected = real[nms_3d(boxes[i][real], scores[i][real], 0.1)][:k]
            assert torch.equal(order[i][index[i][kept[i]]], expected)
            assert bool(kept[i][: expected.numel()].all()) and not bool(kept[i][expected.numel():].any())


# Integer corners and scores in few values: many IoUs exactly at the threshold (3 / 30 = 0.1) and many score ties,
# which only an NMS doing nms_3d's own float operations in nms_3d's order decides the same way.
@pytest.mark.parametrize("path, matrix_limit", [("rounds", 0), ("matrix", 1 << 28)])
@pytest.mark.parametrize("iou_threshold", [0.1, 0.5, 1.0])
def test_batched_nms_equals_nms_3d_on_ties_and_empty_images(path: str, matrix_limit: int, iou_threshold: float,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from nodulenet.model import box_ops
    from nodulenet.model.box_ops import nms_3d, nms_batched_top_k

    monkeypatch.setattr(box_ops, "_NMS_MATRIX_ELEMENTS", matrix_limit)
    gen = torch.Generator().manual_seed(int(iou_threshold * 10))
    b, n = 9, 240
    lo = torch.randint(0, 12, (b, n, 3), generator=gen).float()
    boxes = torch.cat([lo, lo + torch.randint(0, 6, (b, n, 3), generator=gen).float()], dim=2)  # some zero-size
    scores = torch.randint(0, 5, (b, n), generator=gen).float()
    valid = torch.rand(b, n, generator=gen) > 0.3
    valid[1] = False  # an all-invalid image
    valid[4, 1:] = False  # one candidate
    order = torch.sort(torch.where(valid, scores, -1.0), dim=1, descending=True, stable=True).indices
    sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 6))
    checked = 0
    for k in (1, 7, 60, n + 3):  # the scan (matrix, N < 4k) and the picking rounds (matrix, small k) both run
        index, kept = nms_batched_top_k(sorted_boxes, valid.gather(1, order), iou_threshold, k)
        assert index.shape == kept.shape == (b, k)
        for i in range(b):
            real = torch.nonzero(valid[i]).squeeze(1)
            expected = real[nms_3d(boxes[i][real], scores[i][real], iou_threshold)][:k]
            assert torch.equal(order[i][index[i][kept[i]]], expected), (k, i)
            assert bool(kept[i][: expected.numel()].all()) and not bool(kept[i][expected.numel():].any())
            assert not bool(index[i][~kept[i]].any())  # unused slots point at position 0
            checked += expected.numel()
    assert checked > 1000 and not bool(kept[1].any())


def test_batched_proposals_equal_per_image_proposals() -> None:
    from nodulenet.model.anchors import make_anchors
    from nodulenet.model.box_coder import BoxCoder
    from nodulenet.model.rpn import select_proposals, select_proposals_batched

    anchors = make_anchors((8, 8, 8), 4, (5.0, 10.0, 20.0))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, anchors.shape[0], generator=gen) * 0.5
    deltas = torch.randn(3, anchors.shape[0], 6, generator=gen) * 0.2
    for pre, post in ((600, 50), (None, None)):
        batched = select_proposals_batched(logits, deltas, anchors, (32, 32, 32), BoxCoder(), 0.5, 0.1, pre, post)
        for i, (boxes, scores) in enumerate(batched.per_image()):
            ref_boxes, ref_scores = select_proposals(logits[i], deltas[i], anchors, (32, 32, 32), BoxCoder(), 0.5,
                                                     0.1, pre, post)
            assert boxes.shape[0] > 5 and torch.equal(boxes, ref_boxes) and torch.equal(scores, ref_scores)


def test_batched_roi_pooling_equals_adaptive_max_pool_values_and_gradients() -> None:
    import torch.nn.functional as F

    from nodulenet.model.rcnn import feature_crop_ranges, roi_adaptive_max_pool3d

    gen = torch.Generator().manual_seed(0)
    # Strictly positive: no ties, so the arg-max (and the gradient) is unique.
    features = (torch.rand(3, 5, 12, 10, 14, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    lo = torch.rand(40, 3, generator=gen) * torch.tensor([48.0, 40.0, 56.0])
    boxes = torch.cat([lo - 5, lo + 1 + torch.rand(40, 3, generator=gen) * 50], dim=1)
    batch = torch.randint(0, 3, (40,), generator=gen)
    ranges = feature_crop_ranges(boxes, 4, (12, 10, 14))
    reference = torch.stack([F.adaptive_max_pool3d(features[b, :, r[0] : r[3], r[1] : r[4], r[2] : r[5]], 7)
                             for b, r in zip(batch.tolist(), ranges.tolist())])
    longest = int((ranges[:, 3:] - ranges[:, :3]).max())
    for max_region in (None, longest):
        pooled = roi_adaptive_max_pool3d(features, ranges, batch, 7, max_region)
        assert torch.equal(pooled, reference)
        weights = torch.randn(pooled.shape, generator=gen, dtype=torch.float64)
        (ours,) = torch.autograd.grad((pooled * weights).sum(), features)
        (theirs,) = torch.autograd.grad((reference * weights).sum(), features, retain_graph=True)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding", [1e9, 2.0])  # every crop in one padded group; the default packing
def test_padded_mask_loss_equals_the_loss_crop_by_crop(padding: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crops of many different sizes (some at the image border, some without foreground) padded into shared groups
    give the loss and the gradients (mask head and the cropped feature maps) of running the mask head on each
    unpadded crop alone, as the old step did: masked instance norms, zeroed padding before each convolution and
    edge-repeating padding before each up-sampling make the padding invisible."""
    from nodulenet.model import mask_head
    from nodulenet.model.losses import mask_loss
    from nodulenet.model.mask_head import (
        _crop,
        batched_mask_loss,
        pack_crop_groups,
        pad_nodule_masks,
        paste_masks_to_crop,
    )

    monkeypatch.setattr(mask_head, "_MASK_GROUP_PADDING", padding)
    torch.manual_seed(3)
    model = NoduleNet(_config()).train()
    head = model.mask_head
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=gen)
    with torch.no_grad():
        feats = model.feature_net(image)
    out1, comb2 = feats.out1.clone().requires_grad_(), feats.comb2.clone().requires_grad_()
    crops = torch.tensor([[0, 0, 0, 8, 12, 16], [4, 8, 12, 24, 20, 20], [8, 8, 8, 16, 16, 16], [20, 4, 0, 48, 16, 8],
                          [36, 36, 36, 48, 48, 48], [12, 16, 20, 28, 40, 32], [0, 24, 8, 4, 48, 12],
                          [16, 16, 16, 32, 32, 32], [24, 0, 28, 44, 12, 48]])
    bidx = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 1])
    masks = [(torch.rand(10, 12, 9, generator=gen) > 0.4).to(torch.uint8),
             (torch.rand(14, 6, 11, generator=gen) > 0.3).to(torch.uint8)]
    origins = torch.tensor([[10, 6, 10], [18, 8, 22]])
    nodule = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0, 1])
    sizes = [tuple(int(v) for v in c[3:] - c[:3]) for c in crops]
    groups = pack_crop_groups(sizes, padding)
    assert (len(groups) == 1) == (padding > 100) and any(len(m) > 1 for _, m in groups)

    padded, mask_sizes = pad_nodule_masks(masks, image.device)
    new = batched_mask_loss(head, image, out1, comb2, crops, bidx, nodule, padded, mask_sizes, origins)
    new_grads = torch.autograd.grad(new, [out1, comb2, *head.parameters()])
    logits, targets = [], []
    for box, b, k in zip(crops.tolist(), bidx.tolist(), nodule.tolist()):
        out = head._decode(_crop(comb2, b, box, 4), _crop(out1, b, box, 2), _crop(image, b, box, 1))
        logits.append(out[0, 0])
        targets.append(paste_masks_to_crop(masks, origins, box, [k]))
    assert 0 < sum(bool(t.any()) for t in targets) < len(targets)  # some crops count, some do not
    old = mask_loss(logits, targets)
    old_grads = torch.autograd.grad(old, [out1, comb2, *head.parameters()])
    new, old = float(new.detach()), float(old.detach())
    assert old > 0 and abs(new - old) <= 1e-5 * old, (new, old)
    largest = max(float(g.abs().max()) for g in old_grads)
    worst = max(float((a - b).abs().max()) for a, b in zip(new_grads, old_grads))
    assert worst < 1e-5 * largest, (worst, largest)
