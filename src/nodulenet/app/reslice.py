"""Patient-aligned 2D slices of a ``(z, y, x)`` volume for the viewer (pure numpy, no Qt).

What a view shows, whatever order and direction the scan was stored in (DESIGN.md: world = DICOM LPS mm,
+x = patient's Left, +y = Posterior, +z = Superior), in the radiological convention:

=========  ==============  ======================  ======================
view       normal (world)  rows, top -> bottom     columns, left -> right
=========  ==============  ======================  ======================
axial      z               A -> P (+y)             R -> L (+x)
coronal    y               S -> I (-z)             R -> L (+x)
sagittal   x               S -> I (-z)             A -> P (+y)
=========  ==============  ======================  ======================

Each array axis is matched to the world axis its direction column points along most (:class:`PatientAxes`, from
the :class:`~nodulenet.io.volume.Geometry` direction matrix), and a slice is the array cut along that axis,
transposed and flipped as needed: a numpy view, no resampling, so every screen pixel is one scan voxel. For an
oblique scan the letters name the nearest patient axis (:attr:`PatientAxes.obliquity_deg` says how far off).

Display coordinates: ``(row, col)`` of a slice image, pixel centres at integers, so pixel ``(r, c)`` covers
``[r - 0.5, r + 0.5] x [c - 0.5, c + 0.5]``. Voxel coordinates are fractional array indices ``(z, y, x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nodulenet.io.volume import Geometry

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")

# view -> (normal world axis, (row world axis, row sign), (column world axis, column sign)); sign +1: moving
# down / right on the screen goes toward +world.
_PLANES: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "axial": (2, (1, +1), (0, +1)),
    "coronal": (1, (2, -1), (0, +1)),
    "sagittal": (0, (2, -1), (1, +1)),
}
# (world axis, sign) -> the patient direction it points to (LPS).
_LETTERS: dict[tuple[int, int], str] = {(0, +1): "L", (0, -1): "R", (1, +1): "P", (1, -1): "A", (2, +1): "S",
                                        (2, -1): "I"}

# Window presets (width, level) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (1500.0, -600.0),
    "Mediastinum": (350.0, 50.0),
    "Bone": (1800.0, 400.0),
}

# Nodule colours (RGB), cycled by finding id. All saturated, so none is ever a grey CT pixel, and none is the
# crosshair's or the side letters' colour: a test (or a user) can tell a nodule overlay by its colour alone.
NODULE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49), (145, 30, 180),
    (66, 212, 244), (240, 50, 230), (191, 239, 69), (70, 153, 144), (154, 99, 36), (128, 0, 0),
)
CROSSHAIR_COLOUR: tuple[int, int, int] = (0, 255, 128)
LETTER_COLOUR: tuple[int, int, int] = (255, 255, 160)


def nodule_colour(finding_id: int) -> tuple[int, int, int]:
    """The overlay colour of finding ``finding_id`` (ids start at 1)."""
    return NODULE_COLOURS[(int(finding_id) - 1) % len(NODULE_COLOURS)]


@dataclass(frozen=True)
class PatientAxes:
    """How a scan's array axes line up with the patient.

    ``array_axis[w]`` is the array axis (0 = z, 1 = y, 2 = x) closest to world axis ``w`` (0 = x, 1 = y, 2 = z);
    ``toward_negative[w]`` is True when that array index increases toward ``-w`` (patient's Right, Anterior or
    Inferior), i.e. the view must flip it.
    """

    array_axis: tuple[int, int, int]
    toward_negative: tuple[bool, bool, bool]
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    obliquity_deg: float

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> PatientAxes:
        direction = geometry.direction_matrix  # column c: world vector of index axis c, c in (i, j, k) = (x, y, z)
        array_axis = [-1, -1, -1]
        negative = [False, False, False]
        worst = 1.0
        # Greedy on the largest components, so a permutation always results even for a 45-degree oblique scan.
        order = sorted(((abs(direction[w, c]), w, c) for w in range(3) for c in range(3)), reverse=True)
        used_w: set[int] = set()
        used_c: set[int] = set()
        for value, w, c in order:
            if w in used_w or c in used_c:
                continue
            used_w.add(w)
            used_c.add(c)
            array_axis[w] = 2 - c  # index axis i (x) is array axis 2, k (z) is array axis 0
            negative[w] = bool(direction[w, c] < 0)
            worst = min(worst, value)
        return cls(array_axis=tuple(array_axis), toward_negative=tuple(negative),  # type: ignore[arg-type]
                   shape_zyx=geometry.shape_zyx, spacing_zyx=geometry.spacing_zyx,
                   obliquity_deg=math.degrees(math.acos(min(1.0, worst))))

    # ------------------------------------------------------------------------------------------ per view

    def normal_axis(self, view: str) -> int:
        """The array axis a view cuts across (its slice index runs along it)."""
        return self.array_axis[_PLANES[_check(view)][0]]

    def slice_count(self, view: str) -> int:
        return self.shape_zyx[self.normal_axis(view)]

    def _in_plane(self, view: str) -> tuple[tuple[int, bool], tuple[int, bool]]:
        """((row array axis, flipped), (column array axis, flipped)) of a view."""
        _, (row_w, row_sign), (col_w, col_sign) = _PLANES[_check(view)]
        row_flip = (row_sign < 0) != self.toward_negative[row_w]
        col_flip = (col_sign < 0) != self.toward_negative[col_w]
        return (self.array_axis[row_w], row_flip), (self.array_axis[col_w], col_flip)

    def image_shape(self, view: str) -> tuple[int, int]:
        (ra, _), (ca, _) = self._in_plane(view)
        return self.shape_zyx[ra], self.shape_zyx[ca]

    def pixel_spacing(self, view: str) -> tuple[float, float]:
        """(row height, column width) of a view's pixels in mm."""
        (ra, _), (ca, _) = self._in_plane(view)
        return self.spacing_zyx[ra], self.spacing_zyx[ca]

    def edge_letters(self, view: str) -> dict[str, str]:
        """The patient direction at each edge of a view: keys left, right, top, bottom."""
        _, (row_w, row_sign), (col_w, col_sign) = _PLANES[_check(view)]
        return {"left": _LETTERS[(col_w, -col_sign)], "right": _LETTERS[(col_w, col_sign)],
                "top": _LETTERS[(row_w, -row_sign)], "bottom": _LETTERS[(row_w, row_sign)]}

    def slice_image(self, array: np.ndarray, view: str, index: int) -> np.ndarray:
        """The 2D ``(rows, cols)`` image of slice ``index`` (array index along :meth:`normal_axis`): a view of
        ``array`` (any ``(z, y, x)`` array on this grid: HU, labels), oriented as in the module table."""
        normal = self.normal_axis(view)
        index = int(np.clip(index, 0, array.shape[normal] - 1))
        (ra, row_flip), (ca, col_flip) = self._in_plane(view)
        cut = np.take(array, index, axis=normal)  # remaining axes keep their order
        remaining = [a for a in range(3) if a != normal]
        image = cut if remaining.index(ra) == 0 else cut.T
        if row_flip:
            image = image[::-1, :]
        if col_flip:
            image = image[:, ::-1]
        return image

    def voxel_to_display(self, view: str, zyx: np.ndarray | tuple[float, float, float]) -> tuple[float, float, float]:
        """Fractional voxel ``(z, y, x)`` -> ``(row, col, slice index)`` in a view (index is fractional)."""
        p = np.asarray(zyx, dtype=np.float64)
        (ra, row_flip), (ca, col_flip) = self._in_plane(view)
        row = (self.shape_zyx[ra] - 1 - p[ra]) if row_flip else p[ra]
        col = (self.shape_zyx[ca] - 1 - p[ca]) if col_flip else p[ca]
        return float(row), float(col), float(p[self.normal_axis(view)])

    def display_to_voxel(self, view: str, row: float, col: float, index: float) -> tuple[float, float, float]:
        """The inverse of :meth:`voxel_to_display`."""
        (ra, row_flip), (ca, col_flip) = self._in_plane(view)
        p = [0.0, 0.0, 0.0]
        p[ra] = (self.shape_zyx[ra] - 1 - row) if row_flip else row
        p[ca] = (self.shape_zyx[ca] - 1 - col) if col_flip else col
        p[self.normal_axis(view)] = index
        return (float(p[0]), float(p[1]), float(p[2]))

    def box_rectangle(self, view: str, box_zyx: tuple[int, ...]) -> tuple[float, float, float, float]:
        """A ``(z0, y0, x0, z1, y1, x1)`` voxel box (exclusive ends) projected on a view: ``(row0, col0, row1,
        col1)`` in display coordinates along the outer pixel edges (:meth:`box_on_slice` says if it is cut)."""
        lo = np.asarray(box_zyx[:3], dtype=np.float64) - 0.5
        hi = np.asarray(box_zyx[3:], dtype=np.float64) - 0.5
        r0, c0, _ = self.voxel_to_display(view, lo)
        r1, c1, _ = self.voxel_to_display(view, hi)
        return (min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1))

    def box_on_slice(self, view: str, box_zyx: tuple[int, ...], index: int) -> bool:
        normal = self.normal_axis(view)
        return box_zyx[normal] <= index < box_zyx[3 + normal]


def _check(view: str) -> str:
    if view not in _PLANES:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return view


def window_to_uint8(image: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU -> 0..255 grey for display: ``level - width/2`` is black, ``level + width/2`` white (C-contiguous)."""
    width = max(float(width), 1.0)
    low = float(level) - width / 2.0
    scaled = (image.astype(np.float32) - low) * (255.0 / width)
    return np.ascontiguousarray(np.clip(scaled, 0.0, 255.0).astype(np.uint8))


def outline_segments(mask: np.ndarray) -> np.ndarray:
    """The boundary of a 2D boolean mask along pixel EDGES, as ``(n, 4)`` segments ``(row0, col0, row1, col1)``
    in display coordinates (pixel centres at integers): what the measurements count is exactly what is outlined."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    # Horizontal edges: between rows r-1 and r of the padded mask, i.e. at display row (r - 1) - 0.5.
    h_r, h_c = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])
    # Vertical edges: between columns c-1 and c.
    v_r, v_c = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])
    horizontal = np.stack([h_r - 0.5, h_c - 0.5, h_r - 0.5, h_c + 0.5], axis=1)
    vertical = np.stack([v_r - 0.5, v_c - 0.5, v_r + 0.5, v_c - 0.5], axis=1)
    return np.concatenate([horizontal, vertical]).astype(np.float64)
