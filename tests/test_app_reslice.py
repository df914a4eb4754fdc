"""The viewer's slice geometry (pure numpy, no display): every view shows the patient the radiological way round,
whatever order and direction the scan was stored in, and the side letters say so (LPS: +x is the patient's LEFT)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nodulenet.app.reslice import (
    CROSSHAIR_COLOUR,
    LETTER_COLOUR,
    NODULE_COLOURS,
    VIEWS,
    PatientAxes,
    outline_segments,
    window_to_uint8,
)
from nodulenet.io.volume import Geometry

# view -> (world axis increasing to the right of the screen, world axis increasing down the screen and its sign)
EXPECTED = {"axial": ((0, +1), (1, +1)), "coronal": ((0, +1), (2, -1)), "sagittal": ((1, +1), (2, -1))}


def _geometries() -> list[Geometry]:
    """Every axis permutation with every flip: 48 ways to store the same patient."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            for c, (w, s) in enumerate(zip(perm, signs)):
                direction[w, c] = s  # index axis c (i, j, k) points along world axis w
            out.append(Geometry(shape_zyx=(5, 6, 7), spacing_zyx=(2.5, 0.8, 0.7), origin_xyz_mm=(-10.0, 20.0, -300.0),
                                direction=tuple(direction.ravel())))
    return out


@pytest.mark.parametrize("geometry", _geometries(), ids=lambda g: ",".join(f"{v:+.0f}" for v in g.direction))
def test_every_view_is_patient_aligned_for_every_storage_order(geometry):
    axes = PatientAxes.from_geometry(geometry)
    assert axes.obliquity_deg == pytest.approx(0.0)
    for view in VIEWS:
        (col_w, col_sign), (row_w, row_sign) = EXPECTED[view]
        index = 2
        here = np.asarray(geometry.voxel_to_world(axes.display_to_voxel(view, 1.0, 1.0, index)))
        right = np.asarray(geometry.voxel_to_world(axes.display_to_voxel(view, 1.0, 2.0, index)))
        down = np.asarray(geometry.voxel_to_world(axes.display_to_voxel(view, 2.0, 1.0, index)))
        step_right, step_down = right - here, down - here
        # One pixel right moves along +x (axial/coronal: toward the patient's left) or +y (sagittal: posterior) ...
        assert np.sign(step_right[col_w]) == col_sign and np.count_nonzero(np.round(step_right, 9)) == 1
        # ... one pixel down moves toward posterior (axial) or inferior (coronal, sagittal).
        assert np.sign(step_down[row_w]) == row_sign and np.count_nonzero(np.round(step_down, 9)) == 1
        # The pixel sizes are the voxel sizes along those directions.
        assert axes.pixel_spacing(view) == pytest.approx((abs(step_down).max(), abs(step_right).max()))


@pytest.mark.parametrize("geometry", _geometries()[::5], ids=lambda g: ",".join(f"{v:+.0f}" for v in g.direction))
def test_slice_pixels_are_the_array_voxels_the_mapping_names(geometry):
    axes = PatientAxes.from_geometry(geometry)
    array = np.arange(np.prod(geometry.shape_zyx)).reshape(geometry.shape_zyx)
    for view in VIEWS:
        index = 1
        image = axes.slice_image(array, view, index)
        assert image.shape == axes.image_shape(view)
        for row, col in ((0, 0), (image.shape[0] - 1, 0), (1, image.shape[1] - 1)):
            zyx = np.round(axes.display_to_voxel(view, row, col, index)).astype(int)
            assert image[row, col] == array[tuple(zyx)]
            back = axes.voxel_to_display(view, zyx)
            assert back == pytest.approx((row, col, index))


def test_side_letters_of_each_view():
    axes = PatientAxes.from_geometry(Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert axes.edge_letters("axial") == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert axes.edge_letters("coronal") == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert axes.edge_letters("sagittal") == {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def test_a_scan_stored_right_to_left_is_flipped_on_screen():
    # Direction x = -1: array column 0 is the patient's LEFT-most voxel; the axial view must show it on the right.
    g = Geometry((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    axes = PatientAxes.from_geometry(g)
    array = np.arange(60).reshape(3, 4, 5)
    np.testing.assert_array_equal(axes.slice_image(array, "axial", 1), array[1, :, ::-1])
    # Stored head-first (z index increasing toward the feet): the coronal view still has the head at the top.
    g = Geometry((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    axes = PatientAxes.from_geometry(g)
    np.testing.assert_array_equal(axes.slice_image(array, "coronal", 2), array[:, 2, :])
    np.testing.assert_array_equal(axes.slice_image(array, "sagittal", 3), array[:, :, 3])


def test_an_oblique_scan_uses_the_nearest_patient_axes_and_says_how_far_off():
    angle = np.radians(10.0)
    c, s = np.cos(angle), np.sin(angle)
    g = Geometry((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    axes = PatientAxes.from_geometry(g)
    assert axes.array_axis == (2, 1, 0)
    assert axes.obliquity_deg == pytest.approx(10.0, abs=1e-6)


def test_outline_runs_along_voxel_edges():
    square = np.zeros((5, 5), bool)
    square[1:3, 2:4] = True  # 2 x 2 voxels: perimeter 8 voxel edges
    segments = outline_segments(square)
    assert len(segments) == 8
    assert segments[:, [0, 2]].min() == 0.5 and segments[:, [0, 2]].max() == 2.5  # rows 1..2 -> edges 0.5..2.5
    assert segments[:, [1, 3]].min() == 1.5 and segments[:, [1, 3]].max() == 3.5
    lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
    np.testing.assert_allclose(lengths, 1.0)
    ell = np.zeros((4, 4), bool)
    ell[0:3, 0] = True
    ell[2, 1] = True  # an L of 4 voxels: perimeter 10
    assert len(outline_segments(ell)) == 10
    assert len(outline_segments(np.zeros((3, 3), bool))) == 0


def test_lung_window_maps_its_ends_to_black_and_white():
    hu = np.array([[-2000, -1350, -600, 150, 3000]], dtype=np.int16)
    grey = window_to_uint8(hu, 1500, -600)
    assert grey.tolist() == [[0, 0, 127, 255, 255]]
    assert grey.flags["C_CONTIGUOUS"] and grey.dtype == np.uint8


def test_nodule_colours_cannot_be_mistaken_for_grey_crosshair_or_letters():
    for colour in NODULE_COLOURS:
        assert max(colour) - min(colour) >= 60  # far from any grey CT pixel (R = G = B)
        assert colour not in (CROSSHAIR_COLOUR, LETTER_COLOUR)
    assert len(set(NODULE_COLOURS)) == len(NODULE_COLOURS)
