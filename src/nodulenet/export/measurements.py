"""Measure a nodule from its mask: volume, diameters, mean HU, centre, side.

Conventions (see DESIGN.md): arrays ``(z, y, x)`` on the ORIGINAL scan grid; a mask is a crop
(:class:`~nodulenet.io.findings.NoduleMask`, bool array + ``offset_zyx``); world points are LPS mm ``(x, y, z)``;
boxes ``(z0, y0, x0, z1, y1, x1)`` with exclusive ends.

Definitions (every one exact for the voxelised mask; the direction matrix is orthonormal, so distances in
index space scaled by ``spacing_zyx`` are distances in the patient):

- ``volume_mm3`` = voxel count x voxel volume.
- ``equivalent_diameter_mm`` = diameter of the sphere of that volume, ``(6 V / pi) ** (1/3)``.
- ``diameter_mm`` (long axis, as a radiologist measures it): the longest distance within one axial slice
  (for a file stored in another axis order, e.g. sagittal, the mask is viewed along its patient axes first; an
  oblique file is viewed along its nearest axes), maximised over the slices: each voxel is the ``dy x dx`` rectangle it
  is displayed as, and the distance is taken between the CORNERS of those rectangles (the diameter of their
  convex hull, computed exactly from the hull's vertices). Corners, not voxel centres, because calipers are
  put on the visible edge of a nodule: a nodule three voxels wide is three voxels wide, not two. For a disk
  of true diameter D digitised by voxel-centre inclusion the result lies in ``[D - diag, D + diag]``
  (``diag`` = in-plane voxel diagonal) and is usually a little above D.
- ``max_extent_mm``: the same corner-hull diameter in 3D (voxel boxes ``dz x dy x dx``).
- ``center_zyx``: centroid of the mask voxels; ``center_world_xyz_mm`` maps it through the geometry.
- ``mean_hu``: mean HU of the scan inside the mask.
- ``side``: the patient's side, from the nodule's world x against the body midline of its slice. In LPS
  +x points to the patient's LEFT, so a nodule at larger x than the midline is in the left lung. The midline
  is the mean x of body voxels (> -500 HU) on that slice, not world x = 0, because the table centre is not
  the patient's midline.
- ``centre_slice`` (:func:`nodulenet.io.findings.slice_reference`): the slice through the centre, with its DICOM
  InstanceNumber and SliceLocation when the scan was read from DICOM.
- ``site`` (:func:`lung_site`): ``lung`` / ``outside_lungs`` / ``bone``, from the lung segmentation the network
  input was made with and the finding's mean HU (rules there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from nodulenet.export.diameters import equivalent_sphere_diameter, longest_axial_diameter, max_3d_extent
from nodulenet.export.nodule_type import nodule_composition
from nodulenet.io.findings import BONE_HU, NoduleFinding, NoduleMask, slice_reference
from nodulenet.io.orientation import nearest_axes, reindex_array, reindex_index, unreindex_index
from nodulenet.io.volume import Geometry, Volume

# Body vs air for the midline: fat is about -100 HU, lung -900 to -500; -500 keeps lung out of the body.
BODY_HU_THRESHOLD = -500.0


@dataclass(frozen=True)
class NoduleMeasurements:
    """What :func:`measure_mask` computes (see the module doc for each definition)."""

    voxel_count: int
    volume_mm3: float
    equivalent_diameter_mm: float
    diameter_mm: float
    long_axis_zyx: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_extent_mm: float
    center_zyx: tuple[float, float, float]
    center_world_xyz_mm: tuple[float, float, float]
    box_zyx: tuple[int, int, int, int, int, int]
    mean_hu: float | None


def measure_mask(mask: NoduleMask, geometry: Geometry, hu: Volume | np.ndarray | None = None) -> NoduleMeasurements:
    """All measurements of one nodule mask on the scan ``geometry``; ``hu`` (same grid) gives ``mean_hu``."""
    if not mask.fits(geometry.shape_zyx):
        raise ValueError(f"mask crop {mask.crop_box_zyx} reaches outside the scan grid {geometry.shape_zyx}")
    tight = mask.tight()
    voxels = tight.array
    count = int(np.count_nonzero(voxels))
    if count == 0:
        raise ValueError("cannot measure an empty mask")
    spacing = geometry.spacing_zyx
    volume = count * spacing[0] * spacing[1] * spacing[2]
    offset = np.asarray(tight.offset_zyx, dtype=np.float64)
    centroid = np.argwhere(voxels).mean(axis=0) + offset
    # Long axis in the patient's axial plane whatever the file's axis order (a sagittal file's slices are not).
    axes, flips, _ = nearest_axes(geometry.direction)
    diameter, ends = longest_axial_diameter(reindex_array(voxels, axes, flips), tuple(spacing[a] for a in axes))
    ends = unreindex_index(np.asarray(ends), voxels.shape, axes, flips)
    ends_scan = tuple(tuple(float(v) for v in e + offset) for e in ends)
    mean_hu = None
    if hu is not None:
        hu_array = hu.array if isinstance(hu, Volume) else np.asarray(hu)
        if tuple(hu_array.shape) != tuple(geometry.shape_zyx):
            raise ValueError(f"HU array {hu_array.shape} is not on the scan grid {geometry.shape_zyx}")
        mean_hu = float(hu_array[tight.slices()][voxels].astype(np.float64).mean())
    box = tight.crop_box_zyx
    return NoduleMeasurements(
        voxel_count=count,
        volume_mm3=float(volume),
        equivalent_diameter_mm=equivalent_sphere_diameter(volume),
        diameter_mm=float(diameter),
        long_axis_zyx=ends_scan,  # type: ignore[arg-type]
        max_extent_mm=float(max_3d_extent(voxels, spacing)),
        center_zyx=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        center_world_xyz_mm=tuple(float(v) for v in geometry.voxel_to_world(centroid)),  # type: ignore[arg-type]
        box_zyx=box,
        mean_hu=mean_hu,
    )


def patient_side(center_zyx: tuple[float, float, float], hu: Volume) -> str | None:
    """"right" or "left" (the patient's side) of a point, against the body midline of its slice (module doc).
    None when the slice holds no body voxels."""
    # The axial slice through the point, whatever the file's axis order (a view: no copy of the scan).
    axes, flips, _ = nearest_axes(hu.direction)
    axial = reindex_array(hu.array, axes, flips)
    centre = reindex_index(center_zyx, hu.shape_zyx, axes, flips)
    z = int(np.clip(round(float(centre[0])), 0, axial.shape[0] - 1))
    body = axial[z] > BODY_HU_THRESHOLD
    if not body.any():
        return None
    rows, cols = np.nonzero(body)
    midline = unreindex_index((float(z), float(rows.mean()), float(cols.mean())), hu.shape_zyx, axes, flips)
    midline_world = hu.geometry.voxel_to_world(midline)
    point_world = hu.geometry.voxel_to_world(center_zyx)
    # LPS: +x is the patient's left.
    return "left" if point_world[0] > midline_world[0] else "right"


def _label_at(labels: Volume, world_xyz_mm: tuple[float, float, float]) -> int:
    """Value of ``labels`` at the voxel nearest a world point; 0 outside its grid."""
    idx = np.floor(np.asarray(labels.world_to_voxel(world_xyz_mm), dtype=np.float64) + 0.5).astype(int)
    if np.any(idx < 0) or np.any(idx >= np.asarray(labels.shape_zyx)):
        return 0
    return int(labels.array[tuple(idx)])


def lung_site(center_world_xyz_mm: tuple[float, float, float], mean_hu: float | None, lungs: Volume,
              kept: Volume) -> str:
    """Where a finding's centre lies, from the lung segmentation of the network's input.

    ``lungs``: lung labels (> 0 in a lung), ``kept``: the lungs dilated by the preparation's margin (10 mm as
    published; the network sees nothing outside it), both on any grid with its geometry (the resampled one).
    Rules: centre outside ``kept`` -> ``outside_lungs``; mean HU >= :data:`~nodulenet.io.findings.BONE_HU` with
    the centre outside the lungs proper (in the dilated margin) -> ``bone`` (a rib or a vertebra next to the
    pleura); else ``lung``. A calcified nodule (also bone-dense) whose centre is inside a lung stays ``lung``.
    """
    if not _label_at(kept, center_world_xyz_mm):
        return "outside_lungs"
    if mean_hu is not None and mean_hu >= BONE_HU and not _label_at(lungs, center_world_xyz_mm):
        return "bone"
    return "lung"


def _centre_hu(hu: Volume, center_zyx: tuple[float, float, float]) -> float:
    """Mean HU of the 3x3x3 voxels around a point (a finding without a mask has no mean HU of its own)."""
    c = np.clip(np.floor(np.asarray(center_zyx) + 0.5).astype(int), 0, np.asarray(hu.shape_zyx) - 1)
    lo, hi = np.maximum(c - 1, 0), c + 2
    return float(hu.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64).mean())


def locate_finding(finding: NoduleFinding, hu: Volume, lungs: Volume | None = None,
                   kept: Volume | None = None) -> NoduleFinding:
    """``finding`` with ``centre_slice`` (on ``hu``'s grid, DICOM numbers from ``hu.meta``) and, given the lung
    segmentation, ``site`` filled in."""
    centre_slice = slice_reference(hu.geometry, hu.meta, finding.center_world_xyz_mm)
    site = finding.site
    if lungs is not None and kept is not None:
        mean_hu = finding.mean_hu if finding.mean_hu is not None else _centre_hu(hu, finding.center_zyx)
        site = lung_site(finding.center_world_xyz_mm, mean_hu, lungs, kept)
    return replace(finding, centre_slice=centre_slice, site=site)


def finding_from_mask(finding_id: int, score: float, mask: NoduleMask, hu: Volume) -> NoduleFinding:
    """A fully measured :class:`NoduleFinding` (mask kept, as a tight crop) from a mask on ``hu``'s grid."""
    m = measure_mask(mask, hu.geometry, hu)
    composition = nodule_composition(mask, hu.array, hu.spacing_zyx, hu.direction)
    return NoduleFinding(
        id=finding_id,
        score=score,
        center_world_xyz_mm=m.center_world_xyz_mm,
        center_zyx=m.center_zyx,
        box_zyx=m.box_zyx,
        diameter_mm=m.diameter_mm,
        equivalent_diameter_mm=m.equivalent_diameter_mm,
        max_extent_mm=m.max_extent_mm,
        volume_mm3=m.volume_mm3,
        voxel_count=m.voxel_count,
        mean_hu=m.mean_hu,
        side=patient_side(m.center_zyx, hu),
        long_axis_zyx=m.long_axis_zyx,
        mask=mask.tight(),
        centre_slice=slice_reference(hu.geometry, hu.meta, m.center_world_xyz_mm),
        nodule_type=composition.nodule_type,
        mean_diameter_mm=composition.mean_diameter_mm,
        solid_component_mm=composition.solid_component_mm,
    )


def findings_from_label_map(labels: Volume, hu: Volume, scores: Mapping[int, float]) -> list[NoduleFinding]:
    """Measured findings from a label map on the scan grid: label k is finding k, scored ``scores[k]``.

    The labels present must be exactly the keys of ``scores`` and form 1..K (the ids of ``nodules.json``).
    """
    if labels.shape_zyx != hu.shape_zyx or not np.allclose(labels.spacing_zyx, hu.spacing_zyx) \
            or not np.allclose(labels.origin_xyz_mm, hu.origin_xyz_mm, atol=1e-3) \
            or not np.allclose(labels.direction, hu.direction, atol=1e-6):
        raise ValueError("the label map is not on the HU volume's grid "
                         "(shape, spacing, origin and direction must match)")
    array = np.asarray(labels.array)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a label map must hold integers, got {array.dtype}")
    present = sorted(int(v) for v in np.unique(array) if v != 0)
    expected = list(range(1, len(present) + 1))
    if present != expected or sorted(int(k) for k in scores) != present:
        raise ValueError(f"labels present {present} and score keys {sorted(scores)} must both be 1..K")
    findings = []
    for label, box in enumerate(ndimage.find_objects(array), start=1):
        if box is None:
            continue
        crop = array[box] == label
        mask = NoduleMask(crop, tuple(s.start for s in box))  # type: ignore[arg-type]
        findings.append(finding_from_mask(label, float(scores[label]), mask, hu))
    return findings
