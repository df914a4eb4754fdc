"""The paper's ablation option: the RCNN on the decoder map ``comb2`` (coupled) instead of the encoder map ``out2``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nodulenet.model import NoduleNet, NoduleNetConfig, NoduleTargets, tiny_config


def test_comb2_rcnn_crops_the_decoder_map_and_trains() -> None:
    torch.manual_seed(0)
    base = dataclasses.replace(tiny_config(), blocks_per_stage=(1,) * 6, rpn_test_score_threshold=0.0,
                               rpn_test_post_nms_top_n=20)
    coupled = NoduleNet(dataclasses.replace(base, rcnn_feature_map="comb2"))
    decoupled = NoduleNet(base)
    c_out2, c_comb2 = base.backbone_channels[2], base.backbone_channels[6]
    assert c_out2 != c_comb2
    # The first RCNN layer's input width is the chosen map's channels x crop^3.
    first = lambda m: next(p for n, p in m.rcnn_head.named_parameters() if n.endswith("weight"))
    assert first(coupled).shape[1] == c_comb2 * base.rcnn_crop_size ** 3
    assert first(decoupled).shape[1] == c_out2 * base.rcnn_crop_size ** 3
    images = torch.randn(1, 1, 32, 32, 32)
    targets = [NoduleTargets(gt_boxes=torch.tensor([[10.0, 10.0, 10.0, 20.0, 20.0, 20.0]]))]
    losses = coupled.losses(images, targets, stages=("rpn", "rcnn"))
    losses["total"].backward()
    assert torch.isfinite(losses["rcnn_cls"]) and first(coupled).grad is not None
    assert first(coupled).grad.abs().sum() > 0
    coupled.eval()
    det = coupled.predict(images, stages=("rpn", "rcnn"))[0]
    assert det.proposal_rcnn_scores is not None and len(det.proposal_rcnn_scores) == len(det.proposals) > 0


def test_default_stays_the_published_decoupled_rcnn() -> None:
    assert NoduleNetConfig().rcnn_feature_map == "out2"
    assert NoduleNetConfig.from_dict({}).rcnn_feature_map == "out2"  # configs saved before the option
    with pytest.raises(ValueError, match="rcnn_feature_map"):
        NoduleNetConfig(rcnn_feature_map="out4")
