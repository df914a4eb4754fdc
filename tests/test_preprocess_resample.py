"""Resampling keeps world positions (with a non-identity direction), keeps labels exact, and the
recorded index mappings round-trip through world coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from nodulenet.io.volume import Geometry, Volume
from nodulenet.preprocess.resample import (
    CaseTransform,
    resample_labels,
    resample_volume,
    resampled_geometry,
)

# Rotated 30 degrees about z and with the row axis flipped: an arbitrary orthonormal direction, so a bug
# that ignores the direction (or transposes it) moves points by centimetres.
_C, _S = np.cos(np.radians(30)), np.sin(np.radians(30))
DIRECTION = (_C, _S, 0.0, _S, -_C, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (-120.5, 33.25, -301.0)
SPACING = (2.5, 0.7, 0.7)


def _volume(shape: tuple[int, int, int] = (20, 60, 60), dtype: type = np.int16) -> Volume:
    return Volume(np.zeros(shape, dtype=dtype), SPACING, ORIGIN, DIRECTION)


def test_grid_keeps_origin_direction_and_stays_inside_the_scan() -> None:
    g = Geometry((133, 512, 512), (2.5, 0.703125, 0.703125), ORIGIN, DIRECTION)
    r = resampled_geometry(g, (1.0, 1.0, 1.0))
    assert r.origin_xyz_mm == g.origin_xyz_mm and r.direction == g.direction
    # (133 - 1) * 2.5 = 330 mm -> 331 voxel centres; (512 - 1) * 0.703125 = 359.3 mm -> 360.
    assert r.shape_zyx == (331, 360, 360)
    last_centre = r.voxel_to_world(np.array(r.shape_zyx) - 1)
    last_index_in_original = g.world_to_voxel(last_centre)
    assert np.all(last_index_in_original <= np.array(g.shape_zyx) - 1 + 1e-9)


def test_bright_voxel_stays_at_its_world_point() -> None:
    vol = _volume()
    index = (9, 31, 22)
    vol.array[index] = 1000
    point = vol.voxel_to_world(index)
    out, mapping = resample_volume(vol, (1.0, 1.0, 1.0))
    assert out.array.dtype == np.float32
    peak = np.unravel_index(np.argmax(out.array), out.shape_zyx)
    # The brightest output voxel is the grid point nearest the original voxel centre: within half a voxel.
    assert np.all(np.abs(np.array(peak) - out.world_to_voxel(point)) <= 0.5 + 1e-6)
    # Intensity-weighted centre of the blurred impulse lies within half a voxel (1 mm grid) of the point.
    w = out.array.astype(np.float64)
    centroid = (np.argwhere(w > 0) * w[w > 0][:, None]).sum(axis=0) / w.sum()
    assert np.linalg.norm(out.voxel_to_world(centroid) - point) < 0.5
    # The recorded mapping sends the peak's index back to an original index at the same world point.
    assert np.allclose(vol.voxel_to_world(mapping.resampled_to_original_index(peak)), out.voxel_to_world(peak))


def test_labels_stay_exact_and_in_place() -> None:
    vol = _volume(dtype=np.uint8)
    vol.array[4:12, 10:30, 20:40] = 7
    vol.array[14:17, 40:50, 5:15] = 250
    vol.array[0, 0, 0] = 3
    out, _ = resample_labels(vol, (1.0, 1.0, 1.0))
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) <= {0, 3, 7, 250}
    for label in (7, 250):
        world_in = vol.voxel_to_world(np.argwhere(vol.array == label).mean(axis=0))
        world_out = out.voxel_to_world(np.argwhere(out.array == label).mean(axis=0))
        # Nearest-neighbour on a finer grid moves a block's centre by less than one output voxel.
        assert np.linalg.norm(world_out - world_in) < 1.0
        # Volume is preserved to within the boundary voxels' share.
        ml_in = np.count_nonzero(vol.array == label) * np.prod(SPACING)
        ml_out = np.count_nonzero(out.array == label) * 1.0
        assert ml_out == pytest.approx(ml_in, rel=0.25)


def test_bool_masks_stay_bool() -> None:
    vol = _volume(dtype=np.bool_)
    vol.array[5:10, 5:10, 5:10] = True
    out, _ = resample_labels(vol, (1.0, 1.0, 1.0))
    assert out.array.dtype == np.bool_ and out.array.any() and not out.array.all()


def test_case_transform_round_trips_between_grids_and_world() -> None:
    original = Geometry((40, 100, 120), SPACING, ORIGIN, DIRECTION)
    resampled = resampled_geometry(original, (1.0, 1.0, 1.0))
    t = CaseTransform(original, resampled, (5, 7, 9), (60, 60, 70))
    assert t.preprocessed.shape_zyx == (55, 53, 61)
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 50, size=(20, 3))
    via_original = original.voxel_to_world(t.preprocessed_to_original_index(p))
    np.testing.assert_allclose(t.preprocessed_to_world(p), via_original, atol=1e-9)
    np.testing.assert_allclose(t.original_to_preprocessed_index(t.preprocessed_to_original_index(p)), p, atol=1e-9)
    np.testing.assert_allclose(t.world_to_preprocessed(t.preprocessed_to_world(p)), p, atol=1e-9)
    # Serialised and loaded again, it is the same transform.
    assert CaseTransform.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError):
        CaseTransform(original, resampled, (0, 0, 0), (10**4, 10, 10))


@pytest.mark.parametrize("bad", [(0.0, 1.0, 1.0), (1.0, 1.0)])
def test_bad_target_spacing(bad: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        resampled_geometry(_volume().geometry, bad)  # type: ignore[arg-type]
