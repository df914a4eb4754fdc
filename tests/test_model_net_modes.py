"""The assembled network: parameter counts, published names, modes, odd input sizes, empty paths, variants."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nodulenet.model import (
    Detections,
    EvalOutput,
    NoduleNet,
    NoduleNetConfig,
    NoduleTargets,
    count_parameters,
    tiny_config,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**changes: object) -> NoduleNetConfig:
    base = dataclasses.replace(
        tiny_config(),
        blocks_per_stage=(1, 1, 1, 1, 1, 1),
        rpn_train_post_nms_top_n=8,
        rpn_test_post_nms_top_n=8,
    )
    return dataclasses.replace(base, **changes)


def nodule_target(origin: tuple[int, int, int], size: int = 8) -> NoduleTargets:
    """A cube nodule of ``size`` voxels at ``origin``; box with a 4-voxel border, like the published boxes."""
    o = torch.tensor(origin)
    box = torch.cat([o - 4, o + size + 4]).float()[None]
    return NoduleTargets(box, [torch.ones(size, size, size, dtype=torch.uint8)], o[None])


def test_parameter_counts_match_the_published_network() -> None:
    with torch.device("meta"):
        model = NoduleNet(NoduleNetConfig())
    # Published 200.ckpt: 17,785,899 parameters minus 442,817 in layers its forward never uses.
    assert count_parameters(model) == 17_343_082
    assert count_parameters(model.feature_net) == 5_346_872
    names = set(model.state_dict())
    for name in ("feature_net.preBlock.0.weight", "feature_net.forw1.0.shortcut.0.weight",
                 "feature_net.forw4.2.bn2.running_var", "feature_net.path1.0.weight",
                 "feature_net.back2.0.conv1.weight",
                 "rpn.conv.0.weight", "rpn.logits.weight", "rpn.deltas.weight", "rcnn_head.fc1.weight",
                 "rcnn_head.logit.weight", "rcnn_head.delta.bias", "mask_head.up2.1.weight", "mask_head.up3.2.weight",
                 "mask_head.back2.0.weight", "mask_head.back3.1.bias", "mask_head.logits1.weight"):
        assert name in names, name
    assert not any(n.startswith(("mask_head.up1", "mask_head.back1", "mask_head.logits2", "rpn_levels")) for n in names)
    sd = model.state_dict()
    assert tuple(sd["rcnn_head.fc1.weight"].shape) == (512, 64 * 7 * 7 * 7)  # crops from out2 (64 ch), not comb2
    assert tuple(sd["mask_head.back3.0.weight"].shape) == (64, 65, 3, 3, 3)  # 64 features + the image


def test_head_shapes_for_sizes_that_need_padding() -> None:
    model = NoduleNet(small_config()).eval()
    for shape in [(96, 112, 80), (50, 70, 45)]:
        x = torch.randn(1, 1, *shape)
        padded = [s + (-s) % 16 for s in shape]
        with torch.no_grad():
            f = model.feature_net(model._pad(x))
        assert tuple(f.out1.shape[2:]) == tuple(s // 2 for s in padded)
        assert tuple(f.comb2.shape[2:]) == tuple(s // 4 for s in padded) == tuple(f.out2.shape[2:])
        assert tuple(f.comb3.shape[2:]) == tuple(s // 8 for s in padded)
        assert f.comb2.shape[1] == model.config.backbone_channels[-1]
        det = model.predict(x)[0]
        assert isinstance(det, Detections)
        n = det.boxes.shape[0]
        assert det.scores.shape == (n,) and bool((det.scores[:-1] >= det.scores[1:]).all())
        centres = (det.boxes[:, :3] + det.boxes[:, 3:]) / 2
        assert bool((centres >= 0).all()) and bool((centres <= torch.tensor(shape)).all())
        assert det.masks is not None and det.mask_boxes is not None and len(det.masks) == n
        for m, (z0, y0, x0, z1, y1, x1) in zip(det.masks, det.mask_boxes.tolist()):
            assert m.shape == (z1 - z0, y1 - y0, x1 - x0) and m.numel() > 0
            assert 0 <= z0 and z1 <= shape[0] and y1 <= shape[1] and x1 <= shape[2]
            assert bool(((m >= 0) & (m <= 1)).all())
        assert det.proposal_rcnn_scores is not None and det.proposal_rcnn_scores.shape == det.proposal_scores.shape
        if shape != tuple(padded):
            with pytest.raises(ValueError, match="divisible by 16"):
                model.feature_net(x)  # the backbone itself states the requirement; the network pads


def test_train_eval_predict_return_what_they_promise() -> None:
    torch.manual_seed(0)
    model = NoduleNet(small_config()).train()
    x = torch.randn(2, 1, 48, 48, 48)
    targets = [nodule_target((20, 18, 22)), nodule_target((8, 30, 10), size=6)]
    gen = torch.Generator().manual_seed(0)
    staged = {
        ("rpn",): {"rpn_cls", "rpn_reg", "total"},
        ("rpn", "rcnn"): {"rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "total"},
        ("rpn", "rcnn", "mask"): {"rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask", "total"},
    }
    for stages, keys in staged.items():
        losses = model(x, targets, mode="train", stages=stages, generator=gen)
        assert isinstance(losses, dict) and set(losses) == keys
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        parts = sum(v for k, v in losses.items() if k != "total")
        assert torch.allclose(losses["total"], parts)
        losses["total"].backward()
    assert model.feature_net.preBlock[0].weight.grad is not None
    assert model.mask_head.logits1.weight.grad is not None and model.rcnn_head.fc1.weight.grad is not None

    model.eval()
    out = model(x, targets, mode="eval")
    assert isinstance(out, EvalOutput) and set(out.losses) == staged[("rpn", "rcnn", "mask")]
    assert len(out.detections) == 2 and all(isinstance(d, Detections) for d in out.detections)
    preds = model(x, mode="predict")
    assert isinstance(preds, list) and len(preds) == 2
    assert all(d.boxes.requires_grad is False for d in preds)
    rpn_only = model.predict(x, stages=("rpn",))[0]
    assert torch.equal(rpn_only.boxes, rpn_only.proposals) and rpn_only.masks is None

    with pytest.raises(ValueError, match="no targets"):
        model(x, targets, mode="predict")
    with pytest.raises(ValueError, match="needs one NoduleTargets per image"):
        model(x, None, mode="train")
    with pytest.raises(ValueError, match="gt_masks"):
        model(x, [NoduleTargets(t.gt_boxes) for t in targets], mode="train")
    with pytest.raises(ValueError, match="stages"):
        model(x, targets, mode="train", stages=("rcnn",))


def test_masks_only_for_the_best_detections_when_capped() -> None:
    torch.manual_seed(0)
    model = NoduleNet(small_config(mask_max_detections=2, mask_test_nms_iou=None)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    full = NoduleNet(small_config(mask_test_nms_iou=None)).eval()
    full.load_state_dict(model.state_dict())
    capped, uncapped = model.predict(x)[0], full.predict(x)[0]
    assert capped.masks is not None and uncapped.masks is not None
    assert len(capped.boxes) == len(uncapped.boxes) > 2 and len(capped.masks) == 2
    assert torch.equal(capped.boxes, uncapped.boxes)
    for a, b in zip(capped.masks, uncapped.masks[:2]):  # the same masks, just fewer of them
        torch.testing.assert_close(a, b)


def test_masks_only_above_a_score_are_those_of_masking_every_detection() -> None:
    """predict(mask_min_score=t): the masked detections, their masks and the mask NMS outcome among them are
    exactly those of masking every detection; the detections below t stay, unmasked."""
    torch.manual_seed(0)
    model = NoduleNet(small_config(mask_test_nms_iou=0.3)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    everything = model.predict(x)[0]
    assert everything.masks is not None and len(everything.scores) > 3
    t = float(everything.scores[2])  # a threshold that masks the best three
    some = model.predict(x, mask_min_score=t)[0]
    assert some.masks is not None and some.mask_boxes is not None
    above = everything.scores >= t
    assert len(some.masks) == int(above.sum()) == 3
    torch.testing.assert_close(some.boxes[:3], everything.boxes[:3])
    for a, b in zip(some.masks, everything.masks[:3]):
        torch.testing.assert_close(a, b)
    assert torch.equal(some.mask_boxes, everything.mask_boxes[:3])
    assert bool((some.scores[3:] < t).all()) and len(some.scores) >= len(everything.scores)
    # Masks stay inside the unpadded input (the network pads 30 -> 32 on z).
    odd = model.predict(torch.randn(1, 1, 30, 32, 32), mask_min_score=0.0)[0]
    assert odd.mask_boxes is not None and int(odd.mask_boxes[:, 3].max()) <= 30
    for m, box in zip(odd.masks or [], odd.mask_boxes.tolist()):
        assert tuple(m.shape) == tuple(box[k + 3] - box[k] for k in range(3))


def test_keep_centres_within_drops_detections_before_masks() -> None:
    torch.manual_seed(0)
    model = NoduleNet(small_config(mask_test_nms_iou=None)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    everything = model.predict(x, stages=("rpn", "rcnn"))[0]
    lo, hi = (0.0, 0.0, 0.0), (16.0, 32.0, 32.0)
    centres = (everything.boxes[:, :3] + everything.boxes[:, 3:]) / 2
    inside = (centres[:, 0] < 16).nonzero().flatten()
    assert 0 < len(inside) < len(everything.boxes)
    kept = model.predict(x, keep_centres_within=(lo, hi), mask_min_score=0.0)[0]
    torch.testing.assert_close(kept.boxes, everything.boxes[inside])
    assert kept.masks is not None and len(kept.masks) == len(inside)


def test_empty_proposal_paths() -> None:
    model = NoduleNet(small_config()).train()
    with torch.no_grad():
        model.rpn.logits.bias.fill_(-30.0)  # every anchor scores ~0: no proposal passes the 0.5 threshold
    x = torch.randn(1, 1, 32, 32, 32)
    det = model.predict(x)[0]
    assert det.boxes.shape == (0, 6) and det.scores.shape == (0,) and det.proposals.shape == (0, 6)
    assert det.masks == [] and det.mask_boxes is not None and det.mask_boxes.shape == (0, 6)
    # With a nodule: the RCNN still trains on the ground-truth box appended to the (empty) proposals, and the
    # mask head on the ground-truth box.
    losses = model.losses(x, [nodule_target((10, 12, 9))], generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["rcnn_cls"].detach()) > 0
    assert float(losses["mask"].detach()) > 0
    losses["total"].backward()
    # Without a nodule and without proposals: nothing to sample, losses are exact zeros but still backpropagate.
    empty = NoduleTargets(torch.zeros(0, 6), [], torch.zeros(0, 3, dtype=torch.long))
    losses = model.losses(x, [empty])
    assert all(float(losses[k].detach()) == 0.0 for k in ("rcnn_cls", "rcnn_reg", "mask"))
    losses["total"].backward()


def test_bf16_autocast_runs_on_cpu() -> None:
    torch.manual_seed(0)
    model = NoduleNet(small_config(rpn_test_post_nms_top_n=3)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        det = model.predict(x)[0]
        losses = model.train().losses(x, [nodule_target((10, 12, 9))])
    assert det.boxes.dtype == torch.float32 and det.scores.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in det.masks or [])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_fpn_and_focal_loss_variants() -> None:
    cfg = small_config(fpn=True, focal_loss=True)
    assert cfg.rpn_levels == ((4, (5.0, 10.0, 20.0)), (8, (30.0, 50.0)))
    model = NoduleNet(cfg).train()
    assert model.rpn.logits.out_channels == 3 and model.rpn_levels[0].logits.out_channels == 2
    x = torch.randn(1, 1, 32, 32, 32)
    losses = model.losses(x, [nodule_target((10, 12, 9))], generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert model.rpn_levels[0].deltas.weight.grad is not None  # the stride-8 level is trained
    det = model.eval().predict(x)[0]
    assert det.boxes.shape[1] == 6


def test_config_round_trips_through_json_and_rejects_typos() -> None:
    cfg = small_config(fpn=True, fpn_strides=(4, 8, 16), mask_test_nms_iou=None)
    again = NoduleNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown NoduleNetConfig key"):
        NoduleNetConfig.from_dict({"anchor_size": [5, 10]})
    with pytest.raises(ValueError, match="backbone_channels"):
        NoduleNetConfig(backbone_channels=(24, 32))
    half = NoduleNetConfig().scaled(0.5)
    assert half.backbone_channels == (12, 16, 32, 32, 32, 32, 64)
    with torch.device("meta"):
        assert count_parameters(NoduleNet(half)) < 17_343_082 / 3
