"""The report's per-finding pictures: the outline is drawn on the nodule and nowhere else, side letters follow the
direction matrix, and the coronal crop has the head at the top."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from nodulenet.export.figures import MARGIN_PX, OUTLINE_RGB, PANEL_TOP_PX, _Panel, nodule_figure_png, side_letters
from nodulenet.export.measurements import finding_from_mask
from nodulenet.io.findings import NoduleMask
from nodulenet.io.volume import Geometry, Volume


def _scan(direction: tuple[float, ...] | None = None) -> tuple[Volume, np.ndarray, object]:
    geometry = Geometry((40, 96, 128), (2.0, 1.0, 1.0), (-64.0, -48.0, -30.0),
                        direction or (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    hu = np.full(geometry.shape_zyx, -850, np.int16)
    z, y, x = np.mgrid[0:40, 0:96, 0:128]
    ball = ((z - 20) * 2.0) ** 2 + (y - 40.0) ** 2 + (x - 90.0) ** 2 <= 36
    hu[ball] = 25
    volume = Volume.from_geometry(hu, geometry, {})
    finding = finding_from_mask(1, 0.9, NoduleMask(ball[14:27, 33:48, 83:98], (14, 33, 83)), volume)
    labels = ball.astype(np.uint16)
    return volume, labels, finding


def _red_pixels(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return np.argwhere((np.abs(rgb - np.array(OUTLINE_RGB)).sum(axis=2) == 0))  # (row, col) pairs


def test_outline_is_on_the_nodule_in_the_axial_panel() -> None:
    volume, labels, finding = _scan()
    png = nodule_figure_png(volume, labels, finding)
    red = _red_pixels(png)
    assert len(red) > 50
    # Where the nodule centre (y=40, x=90) lands in the axial panel: crop x0 = 90 - 25 = 65, y0 = 40 - 25 = 15
    # (25 mm half-width at 1 mm voxels), upsampled by fx = round(300 / 51) = 6 in both directions.
    fx = _Panel(np.zeros((51, 51), np.int16), 1.0, 1.0).fx
    assert fx == 6
    expected_col = MARGIN_PX + (90 - 65 + 0.5) * fx
    expected_row = PANEL_TOP_PX + (40 - 15 + 0.5) * fx
    axial = red[red[:, 1] < MARGIN_PX + 51 * fx]
    assert abs(axial[:, 1].mean() - expected_col) < 2 and abs(axial[:, 0].mean() - expected_row) < 2
    # A 6 mm-radius ball: every outline pixel lies within its radius (+ the 2-pixel line) of the centre, and
    # the outline goes all round it (the farthest pixels are near the radius, not inside it).
    distance = np.hypot(axial[:, 1] - expected_col, axial[:, 0] - expected_row)
    assert distance.max() <= (6 + 0.5) * fx + 2 and distance.min() >= (6 - 1.5) * fx - 2


def test_coronal_panel_has_head_at_top_and_letters_follow_direction() -> None:
    # An asymmetric nodule: a bar below (lower z) a ball; with +z pointing to the head it must be drawn BELOW.
    volume, labels, finding = _scan()
    labels[12:17, 40, 88:93] = 1
    png = nodule_figure_png(volume, labels, finding)
    red = _red_pixels(png)
    coronal = red[red[:, 1] > MARGIN_PX + 51 * 6 + MARGIN_PX]
    rows = coronal[:, 0]
    ball_centre_row = np.median(rows)
    assert rows.max() - ball_centre_row > ball_centre_row - rows.min()  # the bar extends downwards
    assert side_letters(np.array([1.0, 0, 0])) == ("R", "L")  # +x is the patient's left: R at low index
    assert side_letters(np.array([-1.0, 0, 0])) == ("L", "R")


def test_figure_is_fast_enough_for_a_hundred_findings() -> None:
    import time

    volume, labels, finding = _scan()
    start = time.perf_counter()
    for _ in range(20):
        nodule_figure_png(volume, labels, finding)
    # ~5 ms each here; matplotlib took ~250 ms. A generous bound that still catches a slow renderer coming back.
    assert (time.perf_counter() - start) / 20 < 0.1


def test_overview_shows_the_whole_slice_with_the_finding_outlined_and_ringed_where_it_is() -> None:
    from nodulenet.export.figures import RING_RGB, overview_figure_png

    volume, labels, finding = _scan()
    png = overview_figure_png(volume, labels, finding)
    image = Image.open(io.BytesIO(png))
    # The whole 128-column slice at 1 px per voxel (rows and columns are both 1 mm: no stretch).
    assert image.size == (128 + 2 * MARGIN_PX, PANEL_TOP_PX + 96 + MARGIN_PX)
    red = _red_pixels(png)
    # The outline sits on the nodule: centre voxel (y=40, x=90) -> pixel (40.5, 90.5) inside the panel.
    assert len(red) > 20
    assert abs(red[:, 1].mean() - (MARGIN_PX + 90.5)) < 1.5 and abs(red[:, 0].mean() - (PANEL_TOP_PX + 40.5)) < 1.5
    rgb = np.asarray(image.convert("RGB")).astype(int)
    ring = np.argwhere(np.abs(rgb - np.array(RING_RGB)).sum(axis=2) == 0)
    distance = np.hypot(ring[:, 1] - (MARGIN_PX + 90.5), ring[:, 0] - (PANEL_TOP_PX + 40.5))
    # Ring radius: max(8, 0.75 x long axis) mm + 4 px around the centre, drawn 2 px wide.
    radius = max(8.0, 0.75 * finding.diameter_mm) + 4
    assert len(ring) > 30 and np.all(np.abs(distance - radius) < 3)
