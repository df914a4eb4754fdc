"""Synthetic finding masks on a real scan's grid, for the export tests and benchmarks/export_speed.py."""

from __future__ import annotations

import numpy as np

from nodulenet.io.findings import NoduleMask
from nodulenet.io.volume import Volume


def sphere_mask(hu: Volume, centre_world_xyz: tuple[float, float, float], diameter_mm: float) -> NoduleMask:
    """Voxels of ``hu``'s grid whose centre is within the sphere (a crop around it)."""
    centre = hu.world_to_voxel(centre_world_xyz)
    spacing = np.asarray(hu.spacing_zyx)
    half = np.ceil(diameter_mm / 2 / spacing).astype(int) + 1
    lo = np.round(centre).astype(int) - half
    idx = np.stack(np.meshgrid(*[np.arange(a, a + 2 * h + 1) for a, h in zip(lo, half)], indexing="ij"), -1)
    inside = (((idx - centre) * spacing) ** 2).sum(-1) <= (diameter_mm / 2) ** 2
    return NoduleMask(inside, tuple(int(v) for v in lo))  # type: ignore[arg-type]
