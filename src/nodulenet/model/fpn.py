"""RPN over one or several feature levels, with the anchors of each level.

The published NoduleNet runs one RPN on comb2 (stride 4) with all five anchor sizes. The FPN variant
(``config.fpn``) runs an RPN on each decoder level of the U-Net - comb2 (stride 4), comb3 (stride 8), out4
(stride 16); the U-Net decoder already is a top-down pathway with lateral (skip) connections, which is what a
feature pyramid adds to a plain encoder - and gives each anchor size to the level whose stride suits it
(``anchors.assign_anchor_sizes_to_levels``, via ``config.rpn_levels``).

Outputs of all levels are concatenated along the anchor axis, level by level in increasing stride, each level in
``(z, y, x, a)`` order; the anchors are concatenated the same way, so row ``i`` of logits/deltas belongs to anchor
``i`` and the target assignment and post-processing need not know about levels. Anchors are zyxzyx boxes in input
voxels, end exclusive.

Module names: the stride-4 head is ``rpn`` (the published name, so the default checkpoint loads); extra levels
live in ``rpn_levels`` (a ModuleList, empty - no parameters, no state-dict keys - in the default config).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .anchors import make_anchors
from .backbone import BackboneFeatures
from .config import NoduleNetConfig
from .rpn import RpnHead


class RpnOutput(NamedTuple):
    logits: Tensor  # [B, N] objectness logits
    deltas: Tensor  # [B, N, 6] (dz, dy, dx, dd, dh, dw)
    anchors: Tensor  # [N, 6] zyxzyx, input voxels


def level_channels(config: NoduleNetConfig, stride: int) -> int:
    """Channels of the backbone map used at ``stride`` (4: comb2, 8: comb3, 16: out4)."""
    _, _, _, _, c4, c_back3, c_back2 = config.backbone_channels
    return {4: c_back2, 8: c_back3, 16: c4}[stride]


def level_features(features: BackboneFeatures, stride: int) -> Tensor:
    return {4: features.comb2, 8: features.comb3, 16: features.out4}[stride]


def build_rpn_heads(config: NoduleNetConfig) -> tuple[RpnHead, nn.ModuleList]:
    """The stride-4 head (``rpn``) and the heads of the extra FPN levels (``rpn_levels``)."""
    heads = [
        RpnHead(level_channels(config, stride), len(sizes), config.rpn_hidden_channels)
        for stride, sizes in config.rpn_levels
    ]
    return heads[0], nn.ModuleList(heads[1:])


class AnchorCache:
    """Anchors depend only on the feature shapes; whole-scan prediction reuses them across calls."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._anchors: Tensor | None = None

    def get(self, config: NoduleNetConfig, shapes: list[tuple[int, int, int]], device: torch.device) -> Tensor:
        key = (tuple(shapes), config.rpn_levels, str(device))
        if self._key != key or self._anchors is None:
            parts = [
                make_anchors(shape, stride, sizes, device=device)
                for shape, (stride, sizes) in zip(shapes, config.rpn_levels)
            ]
            self._anchors = torch.cat(parts, dim=0)
            self._key = key
        return self._anchors


def run_rpn(
    config: NoduleNetConfig,
    rpn: RpnHead,
    extra_heads: nn.ModuleList,
    features: BackboneFeatures,
    anchor_cache: AnchorCache,
) -> RpnOutput:
    """Run every RPN level and concatenate logits, deltas and anchors (see the module docstring)."""
    heads = [rpn, *extra_heads]
    logits, deltas, shapes = [], [], []
    for head, (stride, _) in zip(heads, config.rpn_levels):
        f = level_features(features, stride)
        lg, dl = head(f)
        logits.append(lg)
        deltas.append(dl)
        shapes.append(tuple(int(s) for s in f.shape[2:]))
    anchors = anchor_cache.get(config, shapes, logits[0].device)
    if len(heads) == 1:
        return RpnOutput(logits[0], deltas[0], anchors)
    return RpnOutput(torch.cat(logits, dim=1), torch.cat(deltas, dim=1), anchors)
