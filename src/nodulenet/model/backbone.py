"""The NoduleNet backbone (``feature_net``): a 3-D residual U-Net encoder-decoder.

Tensors are ``[B, C, Z, Y, X]``. Input sizes must be multiples of 16 (four 2x down-samplings); the assembly in
``nodulenet.py`` pads to that. Outputs (strides relative to the input):

* ``out1``  stride 2, ``forw1`` channels (32) - used by the mask head;
* ``out2``  stride 4, ``forw2`` channels (64) - the ENCODER map the decoupled RCNN crops from;
* ``out4``  stride 16, ``forw4`` channels (64) - bottom of the U, an optional FPN level;
* ``comb3`` stride 8, ``back3`` channels (64) - decoder level used only by the FPN variant's extra RPN levels;
* ``comb2`` stride 4, ``back2`` channels (128) - decoder output, input of the RPN and the mask head.

Module and parameter names are those of the published checkpoint (``preBlock``, ``forw1..4``, ``path1/2``,
``back3/back2``; ResBlock ``conv1/bn1/conv2/bn2/shortcut``) so its ``state_dict`` loads unchanged. BatchNorm
momentum is 0.1 (PyTorch's default; the published code sets it explicitly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import NoduleNetConfig


class ResBlock3d(nn.Module):
    """conv3x3x3-BN-ReLU-conv3x3x3-BN, plus identity (or 1x1x1 conv + BN when channels change), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm3d(out_channels)
        # Index 0/1 inside a Sequential: the published checkpoint names them shortcut.0 / shortcut.1.
        self.shortcut: nn.Sequential | None = (
            nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel_size=1), nn.BatchNorm3d(out_channels))
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual  # in place on the fresh BN output (BN's backward does not need it): one less full map
        return self.relu(out)


def _stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    layers = [ResBlock3d(in_channels, out_channels)]
    layers += [ResBlock3d(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x transposed conv + BN + ReLU (the published ``path1``/``path2``)."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class BackboneFeatures(NamedTuple):
    out1: Tensor  # stride 2
    out2: Tensor  # stride 4, encoder
    out4: Tensor  # stride 16, bottom of the U
    comb3: Tensor  # stride 8, decoder
    comb2: Tensor  # stride 4, decoder


class FeatureNet(nn.Module):
    """Residual 3-D U-Net; see the module docstring for its outputs."""

    def __init__(self, config: NoduleNetConfig) -> None:
        super().__init__()
        c_pre, c1, c2, c3, c4, c_back3, c_back2 = config.backbone_channels
        n1, n2, n3, n4, n_back3, n_back2 = config.blocks_per_stage
        self.preBlock = nn.Sequential(
            nn.Conv3d(config.in_channels, c_pre, kernel_size=3, padding=1, stride=2),
            nn.BatchNorm3d(c_pre),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_pre, c_pre, kernel_size=3, padding=1),
            nn.BatchNorm3d(c_pre),
            nn.ReLU(inplace=True),
        )
        self.forw1 = _stage(c_pre, c1, n1)
        self.forw2 = _stage(c1, c2, n2)
        self.forw3 = _stage(c2, c3, n3)
        self.forw4 = _stage(c3, c4, n4)
        self.back3 = _stage(c4 + c3, c_back3, n_back3)
        self.back2 = _stage(c_back3 + c2, c_back2, n_back2)
        self.path1 = _upsample(c4, c4)
        self.path2 = _upsample(c_back3, c_back3)
        # Parameter-free; the published model keeps four pooling modules (one unused), which hold no weights.
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> BackboneFeatures:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"FeatureNet needs spatial sizes divisible by 16, got {tuple(x.shape[2:])}")
        out1 = self.forw1(self.preBlock(x))
        out2 = self.forw2(self.pool(out1))
        out3 = self.forw3(self.pool(out2))
        out4 = self.forw4(self.pool(out3))
        # Decoder order of concatenation (upsampled first, skip second) is the published one; the checkpoint's
        # back3/back2 first-conv weights depend on it.
        comb3 = self.back3(torch.cat((self.path1(out4), out3), dim=1))
        comb2 = self.back2(torch.cat((self.path2(comb3), out2), dim=1))
        return BackboneFeatures(out1=out1, out2=out2, out4=out4, comb3=comb3, comb2=comb2)
