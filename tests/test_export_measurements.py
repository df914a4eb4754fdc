"""Nodule measurements against golden values.

Golden values come from hand calculation or from an independent method, never from the code under test:
- voxel counts: a per-column count of lattice points (closed form per (y, x) column), not a 3D mask;
- the R = 10 voxel sphere holds 4169 lattice points (the classical count of integer points with
  x^2 + y^2 + z^2 <= 100);
- corner-hull diameters: by hand for the sphere, and for the ellipsoid as 2 x the largest distance of a voxel
  corner from the centre (a voxelised shape centred on a voxel is point-symmetric, so its diameter is twice
  its largest radius: no convex hull involved);
- tolerances against the continuous shape follow from voxelisation: a digitised set's corner diameter lies
  within one voxel diagonal of the true one, and its volume within the Steiner bounds of the half-diagonal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodulenet.export.diameters import equivalent_sphere_diameter, longest_axial_diameter, max_3d_extent
from nodulenet.export.measurements import findings_from_label_map, measure_mask, patient_side
from nodulenet.io.findings import NoduleMask
from nodulenet.io.volume import Geometry, Volume


def _ellipsoid(half_voxels: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
               semi_axes_zyx_mm: tuple[float, float, float]) -> np.ndarray:
    """Voxels whose centre lies inside the ellipsoid centred on the middle voxel."""
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half_voxels, spacing_zyx)], indexing="ij")
    return sum((g / a) ** 2 for g, a in zip(grids, semi_axes_zyx_mm)) <= 1.0


def _column_count(half_voxels: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
                  semi_axes_zyx_mm: tuple[float, float, float]) -> int:
    """Independent count: for each (y, x) column, the lattice z values inside are |k| <= floor(r / dz)."""
    (hz, hy, hx), (dz, dy, dx), (az, ay, ax) = half_voxels, spacing_zyx, semi_axes_zyx_mm
    total = 0
    for j in range(-hy, hy + 1):
        for i in range(-hx, hx + 1):
            rest = 1.0 - (j * dy / ay) ** 2 - (i * dx / ax) ** 2
            if rest >= 0:
                total += 2 * min(hz, math.floor(az * math.sqrt(rest) / dz)) + 1
    return total


def _integer_ball_count(radius: int) -> int:
    """Exact count of integer points with x^2 + y^2 + z^2 <= radius^2, column by column (integer square roots)."""
    total = 0
    for j in range(-radius, radius + 1):
        for i in range(-radius, radius + 1):
            rest = radius * radius - j * j - i * i
            if rest >= 0:
                total += 2 * math.isqrt(rest) + 1
    return total


def _radius_of_corners(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Largest distance (mm) of any voxel corner from the centre of the (odd-sized, centred) array."""
    centre = (np.asarray(mask.shape) - 1) / 2.0
    best = 0.0
    for corner in np.array(np.meshgrid(*[(-0.5, 0.5)] * mask.ndim, indexing="ij")).reshape(mask.ndim, -1).T:
        points = (np.argwhere(mask) + corner - centre) * np.asarray(spacing)
        best = max(best, float(np.sqrt((points ** 2).sum(axis=1)).max()))
    return best


def test_voxel_sphere_golden_values() -> None:
    z, y, x = np.mgrid[-12:13, -12:13, -12:13]
    mask = x * x + y * y + z * z <= 100  # integer arithmetic: no rounding at the lattice points on the sphere
    geometry = Geometry((25, 25, 25), (1.0, 1.0, 1.0), (-12.0, -12.0, -12.0))
    m = measure_mask(NoduleMask(mask, (0, 0, 0)), geometry)
    assert m.voxel_count == 4169 == _integer_ball_count(10)
    assert m.volume_mm3 == 4169.0
    assert abs(m.volume_mm3 / (4 / 3 * math.pi * 1000) - 1) < 0.005  # lattice count vs 4188.8 mm3
    assert m.equivalent_diameter_mm == pytest.approx((6 * 4169 / math.pi) ** (1 / 3), rel=1e-12)
    # By hand: the disk on the middle slice reaches lattice point (8, 6) (64 + 36 = 100), whose outer corner is
    # (8.5, 6.5); no other point of the disk has a farther corner, so the diameter is 2 sqrt(8.5^2 + 6.5^2).
    assert m.diameter_mm == pytest.approx(2 * math.sqrt(114.5), abs=1e-9)
    # 3D: lattice point (7, 5, 5) (49 + 25 + 25 = 99) has the farthest corner (7.5, 5.5, 5.5).
    assert m.max_extent_mm == pytest.approx(2 * math.sqrt(116.75), abs=1e-9)
    assert m.center_zyx == (12.0, 12.0, 12.0) and m.center_world_xyz_mm == (0.0, 0.0, 0.0)
    assert m.box_zyx == (2, 2, 2, 23, 23, 23)
    (za, ya, xa), (zb, yb, xb) = m.long_axis_zyx
    assert za == zb == 12.0  # the middle slice
    assert math.hypot(ya - yb, xa - xb) == pytest.approx(m.diameter_mm)


def test_anisotropic_ellipsoid_golden_values() -> None:
    spacing = (2.0, 0.5, 0.8)  # z, y, x all different
    axes = (10.3, 6.1, 9.1)  # semi-axes in mm, z, y, x
    half = (6, 14, 13)
    mask = _ellipsoid(half, spacing, axes)
    geometry = Geometry(mask.shape, spacing, (0.0, 0.0, 0.0))
    m = measure_mask(NoduleMask(mask, (0, 0, 0)), geometry)

    voxel_mm3 = 2.0 * 0.5 * 0.8
    assert m.voxel_count == _column_count(half, spacing, axes)
    assert m.volume_mm3 == pytest.approx(m.voxel_count * voxel_mm3, rel=1e-12)
    # Voxelisation bound (Steiner, with h = half the voxel diagonal): every point of the ellipsoid deeper
    # than h is covered and nothing farther than h outside is, so |V_vox - V| <= S h + 4 pi a_max h^2 + 4/3 pi h^3.
    exact = 4 / 3 * math.pi * math.prod(axes)
    h = 0.5 * math.sqrt(sum(s * s for s in spacing))
    p = 1.6075  # Knud Thomsen's surface formula (within 1.1 %), enlarged by 2 % to be safe
    a, b, c = axes
    surface = 1.02 * 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
    assert abs(m.volume_mm3 - exact) <= surface * h + 4 * math.pi * max(axes) * h * h + 4 / 3 * math.pi * h ** 3
    assert abs(m.volume_mm3 / exact - 1) < 0.02  # and, as observed for this size, much closer

    # Long axis: the middle slice (largest cross-section) is an ellipse with semi-axes 9.1 (x) and 6.1 (y) mm;
    # its corner diameter is twice its farthest corner from the centre, within a pixel diagonal of 2 x 9.1.
    middle = mask[half[0]]
    assert m.diameter_mm == pytest.approx(2 * _radius_of_corners(middle, spacing[1:]), abs=1e-9)
    assert abs(m.diameter_mm - 2 * 9.1) <= math.hypot(0.5, 0.8)
    assert m.long_axis_zyx[0][0] == m.long_axis_zyx[1][0] == half[0]
    assert m.max_extent_mm == pytest.approx(2 * _radius_of_corners(mask, spacing), abs=1e-9)
    assert abs(m.max_extent_mm - 2 * 10.3) <= 2 * h
    assert m.equivalent_diameter_mm == pytest.approx(equivalent_sphere_diameter(m.volume_mm3))


def test_long_axis_is_in_plane_while_extent_is_3d() -> None:
    """A cigar along z: radiologists' long axis is its in-plane width, the 3D extent its length."""
    spacing = (1.0, 0.7, 0.7)
    mask = _ellipsoid((16, 9, 9), spacing, (15.0, 5.0, 5.0))
    assert longest_axial_diameter(mask, spacing)[0] == pytest.approx(2 * _radius_of_corners(mask[16], spacing[1:]))
    assert 10.0 <= longest_axial_diameter(mask, spacing)[0] <= 10.0 + math.hypot(0.7, 0.7)
    # 31 slices of 1 mm; each end cap is one voxel, so the farthest corners are also 0.7 sqrt(2) apart sideways.
    assert max_3d_extent(mask, spacing) == pytest.approx(math.sqrt(31.0**2 + 2 * 0.7**2), abs=1e-9)


def test_single_voxel_and_empty_masks() -> None:
    one = np.ones((1, 1, 1), bool)
    assert longest_axial_diameter(one, (2.5, 0.6, 0.8))[0] == pytest.approx(1.0)  # the pixel's diagonal
    assert max_3d_extent(one, (2.5, 0.6, 0.8)) == pytest.approx(math.sqrt(2.5**2 + 1.0))
    with pytest.raises(ValueError, match="empty"):
        measure_mask(NoduleMask(np.zeros((2, 2, 2), bool), (0, 0, 0)), Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0)))


def test_centre_and_offset_map_to_world_through_a_non_identity_direction() -> None:
    # Index x runs to world -x, index y to world +z, slices to world +y (a coronal-like, flipped grid).
    direction = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    geometry = Geometry((30, 40, 50), (1.5, 0.8, 0.6), (100.0, -50.0, 20.0), direction)
    mask = _ellipsoid((3, 6, 8), geometry.spacing_zyx, (4.0, 4.0, 4.0))
    offset = (10, 12, 20)
    m = measure_mask(NoduleMask(mask, offset), geometry)
    centre_zyx = (13.0, 18.0, 28.0)  # offset + the middle voxel of the crop
    assert m.center_zyx == pytest.approx(centre_zyx, abs=1e-12)
    # By hand: x = 100 - 28 * 0.6, y = -50 + 13 * 1.5, z = 20 + 18 * 0.8.
    assert m.center_world_xyz_mm == pytest.approx((83.2, -30.5, 34.4), abs=1e-9)
    assert m.box_zyx[:3] >= offset


def _body_phantom(direction: tuple[float, ...], body_x_range_mm: tuple[float, float]) -> Volume:
    """Air everywhere, a soft-tissue block spanning ``body_x_range_mm`` in world x."""
    # Both directions cover world x from -80 to +78 mm.
    geometry = Geometry((4, 40, 80), (2.0, 2.0, 2.0), (-80.0 if direction[0] > 0 else 78.0, -40.0, 0.0), direction)
    hu = np.full(geometry.shape_zyx, -1000, np.int16)
    world_x = np.array([geometry.voxel_to_world((0, 0, i))[0] for i in range(80)])
    inside = (world_x >= body_x_range_mm[0]) & (world_x <= body_x_range_mm[1])
    hu[:, 5:35, inside] = 40
    return Volume.from_geometry(hu, geometry)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, 1)])
def test_side_is_taken_against_the_body_midline_not_world_zero(direction: tuple[float, ...]) -> None:
    # The patient lies off-centre: body from world x = 10 to 70 mm, midline at x = 40 mm.
    hu = _body_phantom(tuple(float(v) for v in direction), (10.0, 70.0))
    for world_x, expected in ((20.0, "right"), (60.0, "left")):  # LPS: +x is the patient's left
        centre = hu.geometry.world_to_voxel((world_x, -10.0, 2.0))
        assert patient_side(tuple(centre), hu) == expected
    assert patient_side((1.0, 1.0, 1.0), Volume.from_geometry(np.full((4, 4, 4), -1000, np.int16),
                                                              Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0)))) is None


def test_findings_from_label_map() -> None:
    geometry = Geometry((20, 30, 30), (2.0, 0.75, 0.75), (-10.0, -20.0, -30.0))
    hu = np.full(geometry.shape_zyx, -800, np.int16)
    labels = np.zeros(geometry.shape_zyx, np.uint8)
    labels[4:7, 5:9, 5:10] = 1  # 3 x 4 x 5 = 60 voxels
    labels[12:14, 20:22, 18:21] = 2  # 2 x 2 x 3 = 12 voxels
    hu[labels == 1] = 30
    hu[labels == 2] = -100
    hu_volume = Volume.from_geometry(hu, geometry)
    found = findings_from_label_map(Volume.from_geometry(labels, geometry), hu_volume, {1: 0.9, 2: 0.4})
    assert [f.id for f in found] == [1, 2] and [f.score for f in found] == [0.9, 0.4]
    first, second = found
    assert first.box_zyx == (4, 5, 5, 7, 9, 10) and first.voxel_count == 60
    assert first.volume_mm3 == pytest.approx(60 * 2.0 * 0.75 * 0.75)
    assert first.mean_hu == 30.0 and second.mean_hu == -100.0
    assert first.center_zyx == pytest.approx((5.0, 6.5, 7.0))
    assert first.center_world_xyz_mm == pytest.approx((-10 + 7.0 * 0.75, -20 + 6.5 * 0.75, -30 + 5.0 * 2.0))
    # A 4 x 5 rectangle of 0.75 mm pixels: its diagonal, 0.75 sqrt(16 + 25).
    assert first.diameter_mm == pytest.approx(0.75 * math.sqrt(41))
    assert first.mask is not None and first.mask.array.sum() == 60 and first.mask.offset_zyx == (4, 5, 5)
    with pytest.raises(ValueError, match="1..K"):
        labels[labels == 2] = 3
        findings_from_label_map(Volume.from_geometry(labels, geometry), hu_volume, {1: 0.9, 3: 0.4})


def test_side_and_long_axis_of_a_file_stored_sagittal_are_those_of_the_axial_file() -> None:
    """A file whose slices are sagittal (PIL: the array's first axis is world x) is measured along the patient's
    axes: its side against the midline of the AXIAL slice, its long axis in the axial plane."""
    from _stored_as import stored_as

    axial = _body_phantom((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (10.0, 70.0))
    sagittal = stored_as(axial, "PIL")
    assert sagittal.shape_zyx == (80, 4, 40)  # array axes: world x, z, y
    for world_x, expected in ((20.0, "right"), (60.0, "left")):
        centre = sagittal.geometry.world_to_voxel((world_x, -10.0, 2.0))
        assert patient_side(tuple(centre), sagittal) == expected
    # A disc in the axial plane (10 x 4 voxels of 2 mm: long axis = the 20 x 8 mm rectangle's diagonal), one slice.
    disc = np.zeros(axial.shape_zyx, dtype=bool)
    disc[1, 10:14, 30:40] = True
    expected_mm = math.hypot(20.0, 8.0)
    disc_sagittal = stored_as(axial.with_array(disc.astype(np.uint8)), "PIL").array.astype(bool)
    m_axial = measure_mask(NoduleMask(disc, (0, 0, 0)), axial.geometry)
    m_sagittal = measure_mask(NoduleMask(disc_sagittal, (0, 0, 0)), sagittal.geometry)
    assert m_axial.diameter_mm == pytest.approx(expected_mm, abs=1e-9)
    assert m_sagittal.diameter_mm == pytest.approx(expected_mm, abs=1e-9)  # not the 8 mm x 2 mm sagittal extent
    # The long axis' end points are the same points in the patient.
    ends_axial = sorted(map(tuple, np.round(axial.geometry.voxel_to_world(np.asarray(m_axial.long_axis_zyx)), 6)))
    ends_sagittal = sorted(map(tuple, np.round(sagittal.geometry.voxel_to_world(np.asarray(m_sagittal.long_axis_zyx)),
                                               6)))
    np.testing.assert_allclose(ends_sagittal, ends_axial, atol=1e-9)
