"""Anchor boxes ("windows") of the region proposal network.

Boxes are ``(z0, y0, x0, z1, y1, x1)`` float tensors in voxels of the network *input*, ``z1`` exclusive
(see :mod:`nodulenet.model.box_ops`). The model input is 1 mm isotropic, so voxels are millimetres.

Centre convention (checked against the published ``make_rpn_windows`` in ``uci-cbcl/NoduleNet``,
``net/layer/rpn_nms.py``): the anchor of feature voxel ``i`` (stride ``s``) is centred on the block of
input voxels it summarises, ``[i*s, (i+1)*s)``. The published code writes that centre in voxel-index
coordinates as ``(s - 1) / 2 + s * i`` (1.5, 5.5, ... for s = 4); in our corner frame (voxel ``k`` spans
``[k, k + 1)``) the same point is ``(i + 0.5) * s`` (2, 6, ...). Both describe the same physical location,
so decoded boxes agree with the published ones up to the documented frame shift of 0.5.

Order: anchors are laid out ``(z, y, x, a)`` with the anchor-size index ``a`` fastest, which is how the
RPN head's output ``[B, Z, Y, X, A, *]`` flattens to ``[B, Z*Y*X*A, *]`` (the published RpnHead does
exactly that view, and ``make_rpn_windows`` iterates ``itertools.product(z, y, x, anchors)``).

Defaults reproduce the published config: sizes ``(5, 10, 20, 30, 50)`` cube anchors, stride 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_ANCHOR_SIZES", "DEFAULT_STRIDE", "make_anchors", "assign_anchor_sizes_to_levels"]

#: Published NoduleNet ``bases`` with aspect ratio (1, 1, 1): cube anchors of these edge lengths (mm).
DEFAULT_ANCHOR_SIZES: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0, 50.0)
#: Published NoduleNet RPN stride (feature map at 1/4 of the input resolution).
DEFAULT_STRIDE = 4


def make_anchors(
    feature_shape_zyx: tuple[int, int, int] | torch.Size,
    stride: int,
    anchor_sizes: Sequence[float] = DEFAULT_ANCHOR_SIZES,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Cube anchors for a feature map -> ``[Z*Y*X*A, 6]`` zyxzyx boxes in input voxels.

    Anchor ``((z * Y + y) * X + x) * A + a`` is the cube of edge ``anchor_sizes[a]`` centred at
    ``((z + 0.5) * stride, (y + 0.5) * stride, (x + 0.5) * stride)`` (corner frame; the published
    index-frame centre ``(stride - 1) / 2 + stride * i``). Built by broadcasting, no per-voxel loop.
    """
    if len(feature_shape_zyx) != 3:
        raise ValueError(f"feature_shape_zyx must have 3 entries (z, y, x), got {tuple(feature_shape_zyx)}")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if len(anchor_sizes) == 0 or any(size <= 0 for size in anchor_sizes):
        raise ValueError(f"anchor_sizes must be non-empty and positive, got {tuple(anchor_sizes)}")
    depth, height, width = (int(n) for n in feature_shape_zyx)

    def centres(n: int) -> Tensor:
        return (torch.arange(n, device=device, dtype=dtype) + 0.5) * stride

    cz, cy, cx = torch.meshgrid(centres(depth), centres(height), centres(width), indexing="ij")
    centre = torch.stack([cz, cy, cx], dim=-1).reshape(-1, 1, 3)  # [Z*Y*X, 1, 3]
    half = torch.as_tensor([float(s) / 2 for s in anchor_sizes], device=device, dtype=dtype)
    half = half.reshape(1, -1, 1)  # [1, A, 1]
    return torch.cat([centre - half, centre + half], dim=-1).reshape(-1, 6)


def assign_anchor_sizes_to_levels(
    anchor_sizes: Sequence[float],
    strides: Sequence[int],
    *,
    size_per_stride: float = 4.0,
) -> dict[int, tuple[float, ...]]:
    """Split anchor sizes over FPN levels: each size goes to the level whose stride is closest (in log scale)
    to ``size / size_per_stride``, so small anchors land on fine levels and large ones on coarse levels.

    ``size_per_stride = 4`` keeps an anchor about 4 feature voxels wide, enough context for the 3x3x3
    convolutions that score it while the level still resolves neighbouring nodules. Ties go to the finer
    level (smaller nodules are the hard ones). Every stride is a key; a level may receive no sizes.
    Example: sizes (5, 10, 20, 30, 50) on strides (2, 4, 8, 16) -> {2: (5, 10), 4: (20,), 8: (30,), 16: (50,)}.
    """
    if len(strides) == 0 or any(s <= 0 for s in strides):
        raise ValueError(f"strides must be non-empty and positive, got {tuple(strides)}")
    if any(size <= 0 for size in anchor_sizes):
        raise ValueError(f"anchor_sizes must be positive, got {tuple(anchor_sizes)}")
    ordered = sorted(set(int(s) for s in strides))
    levels: dict[int, list[float]] = {s: [] for s in ordered}
    for size in sorted(anchor_sizes):
        ideal = math.log(size / size_per_stride)
        best = min(ordered, key=lambda s: (abs(math.log(s) - ideal), s))
        levels[best].append(float(size))
    return {s: tuple(sizes) for s, sizes in levels.items()}
