"""Nodule type (solid, part-solid, ground-glass), the solid component and the Lung-RADS mean diameter.

Read from the nodule's mask and the HU inside it, on the scan's own grid:

- the **solid component** is the mask's voxels above :data:`SOLID_HU` (-300 HU: soft tissue is -100 to +100,
  ground glass -750 to -300, aerated lung below -750), opened in-plane with a disc of :data:`VESSEL_RADIUS_MM`
  so that vessels crossing a ground-glass nodule (thinner than 3 mm) are not taken for a solid part; its largest
  connected part is measured;
- the **ground-glass component** is the mask's voxels between :data:`GROUND_GLASS_HU` and :data:`SOLID_HU`
  that are not on the partial-volume rim of the soft-tissue voxels (within one pixel of them, in-plane): a solid
  nodule's own edge blends into the lung and reads as ground glass there;
- **solid**: soft-tissue voxels and a ground-glass component of less than :data:`MAX_GROUND_GLASS_FRACTION` of
  the mask; **ground-glass** (non-solid): otherwise, when the solid component is smaller than
  :data:`MIN_SOLID_COMPONENT_MM` (equivalent diameter); **part-solid** otherwise.

The thresholds were set on the phantom's five kinds (``benchmarks/nodule_type_calibration.py`` prints the table
on the ground-truth masks and on the shipped model's masks) and checked against the LIDC readers' texture
ratings of the two real cases. The mean diameter is Lung-RADS': (long axis + short axis) / 2 on the slice of the
long axis, to one decimal; a part-solid nodule's solid component is measured the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from nodulenet.export.diameters import axial_short_axis, equivalent_sphere_diameter, longest_axial_diameter
from nodulenet.io.findings import NODULE_TYPES, NoduleMask  # noqa: F401 - NODULE_TYPES re-exported
from nodulenet.io.orientation import nearest_axes, reindex_array

SOLID_HU = -300.0
GROUND_GLASS_HU = -750.0
MIN_SOLID_COMPONENT_MM = 3.0
MAX_GROUND_GLASS_FRACTION = 0.25
VESSEL_RADIUS_MM = 1.5
# The phantom's kinds and what a reader calls them (juxta-pleural and juxta-vascular phantoms are solid).
PHANTOM_KIND_TYPES = {"solid": "solid", "part_solid": "part_solid", "ground_glass": "ground_glass",
                      "juxta_pleural": "solid", "juxta_vascular": "solid"}


@dataclass(frozen=True)
class NoduleComposition:
    """What :func:`nodule_composition` reads from one nodule (see the module doc)."""

    nodule_type: str
    mean_diameter_mm: float  # Lung-RADS: (long + short axis) / 2, one decimal
    long_axis_mm: float
    short_axis_mm: float
    solid_volume_mm3: float
    ground_glass_fraction: float  # of the mask's voxels
    solid_component_mm: float | None  # mean diameter of the largest solid part (part-solid nodules only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _disc(radius_mm: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """An in-plane disc structuring element of ``radius_mm`` (one slice thick) on the scan's pixel spacing."""
    ry, rx = (max(1, int(radius_mm / s)) for s in spacing_zyx[1:])
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disc = (y * spacing_zyx[1]) ** 2 + (x * spacing_zyx[2]) ** 2 <= radius_mm ** 2
    return disc[None]


def mean_diameter(mask_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> tuple[float, float, float]:
    """``(mean, long, short)`` axial diameters (mm) of a mask, the mean rounded to one decimal as Lung-RADS asks."""
    long_mm, ends = longest_axial_diameter(mask_zyx, spacing_zyx)
    short_mm = axial_short_axis(mask_zyx, spacing_zyx, ends)
    return round(0.5 * (long_mm + short_mm), 1), float(long_mm), float(short_mm)


def nodule_composition(mask: NoduleMask, hu: np.ndarray, spacing_zyx: tuple[float, float, float],
                       direction: Any = None) -> NoduleComposition:
    """Type, mean diameter and solid component of the nodule ``mask`` on the scan ``hu`` (same grid).

    ``direction`` (the scan's direction matrix) views a file stored in another axis order (sagittal, coronal,
    flipped) along the patient's axes first, so "in-plane" and the diameters are axial as a reader measures them.
    """
    tight = mask.tight()
    voxels = tight.array
    if not voxels.any():
        raise ValueError("cannot type an empty mask")
    values = np.asarray(hu)[tight.slices()].astype(np.float32)
    if direction is not None:
        axes, flips, _ = nearest_axes(direction)
        voxels, values = reindex_array(voxels, axes, flips), reindex_array(values, axes, flips)
        spacing_zyx = tuple(spacing_zyx[a] for a in axes)  # type: ignore[assignment]
    solid = voxels & (values > SOLID_HU)
    # In-plane rim only: through-plane, a thick slice's partial volume is part of what it shows.
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    rim = ndimage.binary_dilation(solid, structure=in_plane)
    ground_glass = voxels & ~rim & (values > GROUND_GLASS_HU) & (values <= SOLID_HU)
    gg_fraction = float(np.count_nonzero(ground_glass)) / float(np.count_nonzero(voxels))
    # The solid COMPONENT of a subsolid nodule is a blob: vessels crossing the ground glass are thinner than
    # 2 x VESSEL_RADIUS_MM and are opened away (in-plane disc), so they do not make a ground-glass nodule
    # part-solid nor inflate a solid part.
    core = ndimage.binary_opening(solid, structure=_disc(VESSEL_RADIUS_MM, spacing_zyx))
    labels, n = ndimage.label(core, structure=ndimage.generate_binary_structure(3, 3))
    largest = np.zeros_like(core)
    if n:
        sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1))
        largest = labels == (int(np.argmax(sizes)) + 1)
    solid_volume = float(np.count_nonzero(largest)) * float(np.prod(spacing_zyx))
    mean_mm, long_mm, short_mm = mean_diameter(voxels, spacing_zyx)
    if solid.any() and gg_fraction < MAX_GROUND_GLASS_FRACTION:
        kind = "solid"  # however small: a 3 mm solid nodule has a 3 mm solid component and no halo
    elif solid_volume == 0.0 or equivalent_sphere_diameter(solid_volume) < MIN_SOLID_COMPONENT_MM:
        kind = "ground_glass"
    else:
        kind = "part_solid"
    solid_mm = mean_diameter(largest, spacing_zyx)[0] if kind == "part_solid" else None
    if kind == "part_solid" and solid_mm is not None:
        solid_mm = min(solid_mm, mean_mm)  # a solid part is never larger than its nodule
    return NoduleComposition(kind, mean_mm, long_mm, short_mm, solid_volume, gg_fraction, solid_mm)


def lidc_texture_type(texture: float) -> str:
    """The LIDC readers' texture rating (1 non-solid/GGO ... 3 part-solid ... 5 solid) as a nodule type."""
    if not 1 <= texture <= 5 or math.isnan(texture):
        raise ValueError(f"LIDC texture ratings are 1..5, got {texture}")
    return "ground_glass" if texture < 2.5 else ("part_solid" if texture < 3.5 else "solid")


def phantom_type_pairs(seeds: Any, n_nodules: int = 5) -> list[tuple[str, str]]:
    """``(true type, our type)`` for every nodule of the phantoms ``seeds``, typed on the generator's own masks:
    the calibration of this module (the phantom's kinds as :data:`PHANTOM_KIND_TYPES` names them)."""
    from nodulenet.preprocess.phantom import PhantomConfig, make_phantom

    pairs = []
    for seed in seeds:
        ph = make_phantom(int(seed), PhantomConfig(n_nodules=n_nodules))
        labels = ph.nodule_mask.array
        boxes = ndimage.find_objects(labels)
        for n in ph.nodules:
            box = boxes[n.id - 1]
            mask = NoduleMask(labels[box] == n.id, tuple(s.start for s in box))  # type: ignore[arg-type]
            got = nodule_composition(mask, ph.image.array, ph.image.spacing_zyx, ph.image.direction).nodule_type
            pairs.append((PHANTOM_KIND_TYPES[n.kind], got))
    return pairs
