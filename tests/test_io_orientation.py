"""Canonical orientation (nodulenet.io.orientation): exact re-indexing for the 48 axis orders/signs, checked against
SimpleITK's DICOMOrient (an independent implementation), resampling for oblique scans, and the way back."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
from _stored_as import stored_as

from nodulenet.io.orientation import (
    AXIS_ALIGNED_TOL,
    canonical_orientation,
    nearest_axes,
    orientation_code,
)
from nodulenet.io.volume import Geometry, Volume
from nodulenet.preprocess.resample import CaseTransform, resampled_geometry, volume_to_sitk

# Every code DICOMOrient accepts: one letter of each pair (L/R, P/A, S/I), in any order of the axes.
PAIRS = ("LR", "PA", "SI")
ALL_CODES = ["".join(letters) for order in itertools.permutations(range(3))
             for letters in itertools.product(*[PAIRS[w] for w in order])]


def _canonical_volume() -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 2000, size=(5, 6, 7), dtype=np.int16)  # distinct sizes: a wrong axis shows
    return Volume(array, (2.5, 0.7, 0.9), (-160.0, -170.5, -330.25))


def test_all_48_codes_are_distinct_and_dicomorient_makes_them():
    assert len(set(ALL_CODES)) == 48
    base = volume_to_sitk(_canonical_volume())
    for code in ALL_CODES:
        assert orientation_code(sitk.DICOMOrient(base, code).GetDirection()) == code


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_axis_order_and_sign_comes_back_to_the_same_voxels_exactly(code):
    canonical_truth = _canonical_volume()
    stored = stored_as(canonical_truth, code)  # the same patient, stored as `code`
    canonical, reorientation = canonical_orientation(stored)
    assert not reorientation.resampled
    assert reorientation.is_identity == (code == "LPS")
    # Bit-exact voxels, same grid in the patient: no interpolation anywhere.
    assert canonical.array.dtype == np.int16
    assert np.array_equal(canonical.array, canonical_truth.array)
    assert canonical.spacing_zyx == canonical_truth.spacing_zyx
    assert canonical.direction == pytest.approx(canonical_truth.direction, abs=0)
    assert canonical.origin_xyz_mm == pytest.approx(canonical_truth.origin_xyz_mm, abs=1e-9)
    # The way back is the identity: volume, and every index.
    back = reorientation.to_input(canonical)
    assert np.array_equal(back.array, stored.array)
    assert back.geometry == stored.geometry
    index = np.random.default_rng(1).uniform(-0.5, 4.5, size=(20, 3))
    np.testing.assert_allclose(reorientation.input_to_canonical_index(reorientation.canonical_to_input_index(index)),
                               index, atol=1e-12)
    # A canonical index and the input index it maps to are the same point in the patient.
    np.testing.assert_allclose(canonical.voxel_to_world(index),
                               stored.voxel_to_world(reorientation.canonical_to_input_index(index)), atol=1e-9)


@pytest.mark.parametrize("code", ["RAS", "PIL", "SRA", "ILP"])
def test_a_crop_maps_back_to_the_same_voxels_of_the_input(code):
    stored = stored_as(_canonical_volume(), code)
    canonical, reorientation = canonical_orientation(stored)
    offset, size = (1, 2, 3), (3, 2, 4)
    crop = canonical.array[tuple(slice(o, o + s) for o, s in zip(offset, size))]
    back, back_offset = reorientation.crop_to_input(crop, offset)
    pasted = np.zeros(stored.shape_zyx, dtype=bool)
    pasted[tuple(slice(o, o + s) for o, s in zip(back_offset, back.shape))] = True
    full = np.zeros(canonical.shape_zyx, dtype=bool)
    full[tuple(slice(o, o + s) for o, s in zip(offset, size))] = True
    assert np.array_equal(pasted, reorientation.to_input(canonical.with_array(full)).array)
    assert np.array_equal(back, stored.array[pasted].reshape(back.shape))


def test_a_direction_within_the_tolerance_is_reindexed_keeping_its_exact_direction():
    angle = AXIS_ALIGNED_TOL / 2
    c, s = math.cos(angle), math.sin(angle)
    rotated = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    flipped = rotated @ np.diag([-1.0, -1.0, 1.0])  # RAS-like, slightly rotated
    volume = _canonical_volume()
    stored = Volume(volume.array[:, ::-1, ::-1].copy(), volume.spacing_zyx, volume.origin_xyz_mm,
                    tuple(flipped.reshape(-1)))
    canonical, reorientation = canonical_orientation(stored)
    assert not reorientation.resampled and reorientation.summary()["method"] == "reindexed"
    assert np.array_equal(canonical.array, volume.array)
    np.testing.assert_allclose(canonical.geometry.direction_matrix, rotated, atol=0)  # not forced to identity
    np.testing.assert_allclose(canonical.voxel_to_world((4, 5, 6)), stored.voxel_to_world((4, 0, 0)), atol=1e-9)


def _oblique(degrees: float) -> Volume:
    """A volume whose values are a linear function of world position, on a grid rotated about z."""
    a = math.radians(degrees)
    direction = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    geometry = Geometry((6, 20, 24), (2.0, 1.0, 1.5), (10.0, -20.0, 5.0), tuple(direction.reshape(-1)))
    world = geometry.voxel_to_world(np.indices(geometry.shape_zyx).reshape(3, -1).T)
    values = (world @ np.array([0.5, -1.0, 2.0]) + 3.0).reshape(geometry.shape_zyx).astype(np.float32)
    return Volume.from_geometry(values, geometry)


def test_an_oblique_scan_is_resampled_onto_an_axis_aligned_grid_that_covers_it():
    stored = _oblique(20.0)
    canonical, reorientation = canonical_orientation(stored, fill_value=-1000.0)
    assert reorientation.resampled and reorientation.summary()["method"] == "resampled"
    assert canonical.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert canonical.spacing_zyx == (2.0, 1.0, 1.5)  # each axis keeps its nearest input axis' spacing
    # Every input voxel centre lies inside the canonical grid.
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in stored.shape_zyx])), dtype=float)
    inside = reorientation.input_to_canonical_index(corners)
    assert np.all(inside >= -1e-9) and np.all(inside <= np.asarray(canonical.shape_zyx) - 1 + 1e-9)
    # Linear interpolation reproduces a linear function exactly where the canonical voxel lies inside the input.
    idx = np.indices(canonical.shape_zyx).reshape(3, -1).T
    q = reorientation.canonical_to_input_index(idx)
    interior = np.all((q >= 0) & (q <= np.asarray(stored.shape_zyx) - 1), axis=1)
    world = canonical.voxel_to_world(idx[interior])
    np.testing.assert_allclose(canonical.array.reshape(-1)[interior], world @ np.array([0.5, -1.0, 2.0]) + 3.0,
                               atol=1e-3)
    far_outside = np.any((q < -1) | (q > np.asarray(stored.shape_zyx)), axis=1)
    assert far_outside.any() and np.all(canonical.array.reshape(-1)[far_outside] == -1000.0)
    # Index maps are inverse to each other and agree with world coordinates.
    np.testing.assert_allclose(reorientation.input_to_canonical_index(q), idx, atol=1e-9)
    m, t = reorientation.input_to_canonical_affine()
    np.testing.assert_allclose(q @ m.T + t, idx, atol=1e-9)


def test_nearest_axes_of_a_sagittal_direction():
    # PIL: index i -> posterior (+y), j -> inferior (-z), k -> left (+x).
    direction = sitk.DICOMOrient(volume_to_sitk(_canonical_volume()), "PIL").GetDirection()
    axes, flips, deviation = nearest_axes(direction)
    # canonical z (superior) is input array axis 1 (j) reversed; canonical y is array axis 2 (i); x is axis 0 (k).
    assert axes == (1, 2, 0) and flips == (True, False, False) and deviation == 0.0


def test_case_transform_with_an_orientation_maps_through_it_and_survives_json():
    stored = stored_as(_canonical_volume(), "PIL")
    canonical, reorientation = canonical_orientation(stored)
    resampled = resampled_geometry(canonical.geometry, (1.0, 1.0, 1.0))
    transform = CaseTransform(stored.geometry, resampled, (1, 0, 2), (8, 4, 6), orientation=reorientation)
    assert transform.canonical == canonical.geometry
    assert transform.scale_zyx == pytest.approx((1 / 2.5, 1 / 0.7, 1 / 0.9))
    p = np.array([[0.0, 0.0, 0.0], [3.5, 1.25, 2.0]])
    original = transform.preprocessed_to_original_index(p)
    np.testing.assert_allclose(stored.voxel_to_world(original), transform.preprocessed_to_world(p), atol=1e-9)
    np.testing.assert_allclose(transform.original_to_preprocessed_index(original), p, atol=1e-12)
    again = CaseTransform.from_dict(transform.to_dict())
    assert again == transform
