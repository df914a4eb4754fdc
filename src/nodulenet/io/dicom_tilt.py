"""Gantry tilt: slices whose positions drift sideways of the slice normal, resampled onto an orthogonal grid.

With a tilted gantry every slice is still a plane with the series' orientation, but consecutive planes are
offset by a step vector that is not along their normal: the voxel grid is sheared, which an origin/spacing/
direction geometry cannot express. Slice ``k`` lies exactly in plane ``k`` of an orthogonal grid with the same
in-plane axes and the normal as third axis; only its in-plane offset differs (the sideways drift ``s_k``). So
the exact correction is a 2D shift per slice (no interpolation between slices): here ``scipy.ndimage.shift``
with linear interpolation. The grid grows in-plane to hold every shifted slice (no tissue is cut off); voxels
outside the acquired field are filled with the series' padding value (air when it has none).

The way back (a label map on the corrected grid onto the source slices, for a DICOM SEG that references them)
is :func:`to_source_slices`: per slice a crop at that slice's offset, i.e. nearest-neighbour resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A drift below half a pixel over the whole series is DS rounding or a negligible tilt: nothing is resampled.
DRIFT_TOL_PIXELS = 0.5
# The drift must grow linearly with the position along the normal (one tilt angle); a residual beyond this
# (in pixels) is an irregular series, not a tilt.
TILT_FIT_TOL_PIXELS = 0.5
AIR_HU = -1024.0


@dataclass(frozen=True)
class GantryTilt:
    """The sideways drift of a sorted series, in-plane: rows (along the column cosine) and columns."""

    angle_deg: float  # between the slice step and the slice normal
    drift_mm: float  # largest sideways offset of a slice from the first one
    shift_rc_px: np.ndarray  # (n, 2) in-plane offset of each slice from the first, in pixels (rows, columns)
    needs_resampling: bool
    fit_residual_px: float


def measure_tilt(positions_xyz: np.ndarray, direction: np.ndarray, pixel_spacing_rc: np.ndarray) -> GantryTilt:
    """The tilt of slices at ``positions_xyz`` (n, 3; sorted along the normal), ``direction`` columns = (row
    cosine, column cosine, normal)."""
    row_cos, col_cos, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    rel = positions_xyz - positions_xyz[0]
    along = rel @ normal
    sideways = rel - np.outer(along, normal)
    shift_rc = np.stack([sideways @ col_cos / pixel_spacing_rc[0], sideways @ row_cos / pixel_spacing_rc[1]], axis=1)
    drift_mm = float(np.max(np.linalg.norm(sideways, axis=1)))
    span = float(along[-1] - along[0])
    if span <= 0:
        return GantryTilt(0.0, drift_mm, shift_rc, False, 0.0)
    # One tilt: sideways = along * tan(angle) in a fixed in-plane direction (least squares through the origin).
    slope_rc = (along @ shift_rc) / float(along @ along)
    residual = float(np.max(np.linalg.norm(shift_rc - np.outer(along, slope_rc), axis=1)))
    slope_mm = np.hypot(slope_rc[0] * pixel_spacing_rc[0], slope_rc[1] * pixel_spacing_rc[1])
    angle = math.degrees(math.atan(float(slope_mm)))
    needs = bool(np.max(np.abs(shift_rc)) > DRIFT_TOL_PIXELS)
    return GantryTilt(angle, drift_mm, shift_rc, needs, residual)


def resample_tilted(slices: list[np.ndarray], tilt: GantryTilt, fill_value: float,
                    dtype: np.dtype) -> tuple[np.ndarray, tuple[float, float]]:
    """Slices shifted onto the orthogonal grid; returns the ``(z, y, x)`` array and the grid's in-plane origin
    offset from the first slice's position, in pixels (rows, columns; <= 0)."""
    from scipy import ndimage

    shift = tilt.shift_rc_px
    low = np.floor(shift.min(axis=0) + 1e-6)
    high = np.ceil(shift.max(axis=0) - 1e-6)
    rows, columns = slices[0].shape
    out_rows, out_cols = rows + int(high[0] - low[0]), columns + int(high[1] - low[1])
    out = np.empty((len(slices), out_rows, out_cols), dtype=dtype)
    integral = np.issubdtype(dtype, np.integer)
    for k, image in enumerate(slices):
        padded = np.full((out_rows, out_cols), fill_value, dtype=np.float32)
        padded[:rows, :columns] = image
        moved = ndimage.shift(padded, shift[k] - low, order=1, mode="constant", cval=fill_value, prefilter=False)
        out[k] = np.rint(moved) if integral else moved
        slices[k] = None  # type: ignore[call-overload]  # release memory as we go
    return out, (float(low[0]), float(low[1]))


def source_offsets_px(tilt: GantryTilt) -> np.ndarray:
    """Where each source slice's first pixel lies on the grid of :func:`resample_tilted`: (n, 2) rows, columns."""
    low = np.floor(tilt.shift_rc_px.min(axis=0) + 1e-6)
    return tilt.shift_rc_px - low


def to_source_slices(array: np.ndarray, offsets_rc_px: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``array`` (``(z, y, x)`` on the corrected grid, e.g. a label map) sampled back onto each source slice's
    ``rows x columns`` pixels: nearest neighbour, so labels stay labels."""
    out = np.empty((array.shape[0], rows, columns), dtype=array.dtype)
    for k, (dr, dc) in enumerate(np.rint(np.asarray(offsets_rc_px, dtype=np.float64)).astype(int)):
        out[k] = array[k, dr:dr + rows, dc:dc + columns]
    return out
