"""Canonical voxel orientation: every scan reaches the network as axial slices with LPS axis signs.

Conventions (DESIGN.md, :mod:`nodulenet.io.volume`): arrays ``(z, y, x)``; the direction's column ``c`` is the
world ``(x, y, z)`` direction of index axis ``c`` in ``(i, j, k)`` order (the array axes reversed); world = DICOM
LPS mm.

**Canonical** is what a standard axial DICOM series gives when :mod:`nodulenet.io.dicom` reads it (slices sorted
along their normal), and so what every training case was: index ``i`` (array x) runs to the patient's left,
``j`` (array y) to posterior, ``k`` (array z, the slice) to superior, i.e. direction = identity, ``"LPS"`` in the
three-letter code of ``SimpleITK.DICOMOrient`` (the letter each index axis ``i, j, k`` points to). A NIfTI from
dcm2niix is ``"LAS"``/``"RAS"`` in that code, a sagittal file e.g. ``"PIL"``; the network was only ever shown
``"LPS"``, and fed a sagittal file as if its slices were axial it misses nodules.

Two ways there (:func:`canonical_orientation`):

- **axis-aligned** input (every direction column within :data:`AXIS_ALIGNED_TOL` of a signed world axis): an
  exact re-indexing, a transpose plus flips of the array. No voxel changes value, the voxel grid stays the same
  set of points in the patient (the canonical direction is the input's columns permuted and signed, so it is the
  identity up to that tolerance), and every index maps back exactly (:class:`Reorientation`).
- **oblique** input: a resampling (SimpleITK, linear for images, nearest neighbour for labels) onto the
  axis-aligned grid (direction = identity) that covers the input's voxel centres, with each canonical axis taking
  the spacing of the input axis nearest to it; outside the input the fill value (air for CT). Indices map back
  through world coordinates.

Outputs go back to the input's own grid with the same record, so a label map lines up voxel for voxel with the
file the user gave.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from nodulenet.io.volume import Geometry, Volume

# The largest off-axis direction cosine still treated as axis-aligned (about 0.06 degrees). DICOM writers store
# cosines as decimal strings and scanners write values like 1e-6 for "0"; a real obliquity or tilt is degrees.
AXIS_ALIGNED_TOL = 1e-3
# What fills canonical voxels outside an oblique scan: air, as the preprocessing fills scanner padding.
OUTSIDE_FILL_HU = -1000.0
CANONICAL_CODE = "LPS"
_POSITIVE_LETTERS, _NEGATIVE_LETTERS = "LPS", "RAI"

Index = np.ndarray


def orientation_code(direction: Any) -> str:
    """The three-letter code (``SimpleITK.DICOMOrient`` convention) of the world axis each index axis i, j, k
    points to most; ``"LPS"`` for the identity."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    letters = []
    for c in range(3):
        w = int(np.argmax(np.abs(d[:, c])))
        letters.append((_POSITIVE_LETTERS if d[w, c] > 0 else _NEGATIVE_LETTERS)[w])
    return "".join(letters)


def nearest_axes(direction: Any) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], float]:
    """``(axes, flips, deviation)``: canonical array axis ``a`` (z, y, x) holds input array axis ``axes[a]``,
    reversed when ``flips[a]``; ``deviation`` is the largest off-axis cosine left (0.0 for an exact permutation).

    The assignment of index axes to world axes is the permutation with the largest total |cosine|, so an oblique
    direction still gets a one-to-one assignment (its nearest axes)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # d[w, c]: world axis w of index axis c
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[w, p[w]]) for w in range(3)))
    # best[w] = input index axis (i, j, k) along world axis w; array axis = 2 - index axis.
    axes = tuple(2 - best[2 - a] for a in range(3))
    flips = tuple(bool(d[2 - a, best[2 - a]] < 0) for a in range(3))
    off = [abs(d[w, c]) for w in range(3) for c in range(3) if c != best[w]]
    return axes, flips, float(max(off))  # type: ignore[return-value]


def reindex_array(array: np.ndarray, axes: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """A VIEW of ``array`` with its axes taken in ``axes`` order, then reversed where ``flips`` (no copy)."""
    view = np.transpose(array, axes)
    return view[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def unreindex_array(array: np.ndarray, axes: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """The inverse of :func:`reindex_array` (a view)."""
    unflipped = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(unflipped, np.argsort(axes))


def reindex_index(index_zyx: Any, shape_zyx: tuple[int, ...], axes: tuple[int, ...],
                  flips: tuple[bool, ...]) -> Index:
    """Fractional ``(..., 3)`` indices of an array of ``shape_zyx`` as indices of its :func:`reindex_array` view."""
    q = np.asarray(index_zyx, dtype=np.float64)
    c = np.empty_like(q)
    for a, (axis, flip) in enumerate(zip(axes, flips)):
        c[..., a] = (shape_zyx[axis] - 1 - q[..., axis]) if flip else q[..., axis]
    return c


def unreindex_index(index_zyx: Any, shape_zyx: tuple[int, ...], axes: tuple[int, ...],
                    flips: tuple[bool, ...]) -> Index:
    """The inverse of :func:`reindex_index` (``shape_zyx`` is still the shape of the array before re-indexing).

    It is :func:`reindex_index` of the view: axis ``axes[a]`` comes back from view axis ``a`` (the inverse
    permutation ``argsort(axes)``), reversed where view axis ``a`` was."""
    inverse = tuple(int(a) for a in np.argsort(axes))
    view_shape = tuple(shape_zyx[axis] for axis in axes)
    return reindex_index(index_zyx, view_shape, inverse, tuple(flips[a] for a in inverse))


def _reindex_geometry(geometry: Geometry, axes: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Geometry:
    """The same physical voxel grid, indexed the canonical way (direction columns permuted and signed)."""
    shape = tuple(geometry.shape_zyx[axes[a]] for a in range(3))
    spacing = tuple(geometry.spacing_zyx[axes[a]] for a in range(3))
    first = np.array([geometry.shape_zyx[axes[a]] - 1 if flips[a] else 0 for a in range(3)], dtype=np.float64)
    first_input = np.empty(3)
    first_input[list(axes)] = first
    d = geometry.direction_matrix
    canonical = np.empty((3, 3))
    for a in range(3):  # canonical index axis 2 - a is input index axis 2 - axes[a], signed
        canonical[:, 2 - a] = (-1.0 if flips[a] else 1.0) * d[:, 2 - axes[a]]
    origin = geometry.voxel_to_world(first_input)
    return Geometry(shape, spacing, tuple(origin), tuple(canonical.reshape(-1)))  # type: ignore[arg-type]


def _covering_geometry(geometry: Geometry, axes: tuple[int, int, int]) -> Geometry:
    """The identity-direction grid covering every voxel centre of ``geometry``; canonical axis ``a`` takes the
    spacing of its nearest input axis ``axes[a]``."""
    spacing = np.array([geometry.spacing_zyx[axes[a]] for a in range(3)], dtype=np.float64)
    last = np.asarray(geometry.shape_zyx, dtype=np.float64) - 1.0
    corners = np.array(list(itertools.product(*[(0.0, n) for n in last])))
    world = geometry.voxel_to_world(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)  # (x, y, z)
    extent_zyx = (hi - lo)[::-1]
    shape = tuple(int(np.ceil(e / s - 1e-6)) + 1 for e, s in zip(extent_zyx, spacing))
    return Geometry(shape, tuple(spacing), tuple(lo))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Reorientation:
    """How a scan's own grid (``input``) relates to the canonical grid the network sees (``canonical``).

    ``axes``/``flips`` as in :func:`nearest_axes`; ``resampled`` is False for an exact re-indexing and True for an
    oblique scan resampled onto ``canonical``. Index maps take ``(..., 3)`` fractional ``(z, y, x)`` indices.
    """

    input: Geometry
    canonical: Geometry
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    resampled: bool
    deviation: float = 0.0

    @classmethod
    def of(cls, geometry: Geometry, tol: float = AXIS_ALIGNED_TOL) -> Reorientation:
        """The reorientation of a scan on ``geometry`` (re-indexing if axis-aligned within ``tol``)."""
        axes, flips, deviation = nearest_axes(geometry.direction)
        if deviation <= tol:
            return cls(geometry, _reindex_geometry(geometry, axes, flips), axes, flips, False, deviation)
        return cls(geometry, _covering_geometry(geometry, axes), axes, flips, True, deviation)

    @property
    def is_identity(self) -> bool:
        """True when the input is already canonical (nothing to do, and nothing to map back)."""
        return not self.resampled and self.axes == (0, 1, 2) and not any(self.flips)

    @property
    def input_code(self) -> str:
        return orientation_code(self.input.direction)

    def canonical_to_input_index(self, index_zyx: Any) -> Index:
        if self.resampled:
            return self.input.world_to_voxel(self.canonical.voxel_to_world(np.asarray(index_zyx, dtype=np.float64)))
        return unreindex_index(index_zyx, self.input.shape_zyx, self.axes, self.flips)

    def input_to_canonical_index(self, index_zyx: Any) -> Index:
        if self.resampled:
            return self.canonical.world_to_voxel(self.input.voxel_to_world(np.asarray(index_zyx, dtype=np.float64)))
        return reindex_index(index_zyx, self.input.shape_zyx, self.axes, self.flips)

    def input_to_canonical_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(M, t)`` with ``canonical_index = M @ input_index + t`` (both maps are affine)."""
        t = self.input_to_canonical_index(np.zeros(3))
        m = np.stack([self.input_to_canonical_index(e) - t for e in np.eye(3)], axis=1)
        return m, t

    def crop_to_input(self, array: np.ndarray, offset_zyx: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """A crop of the canonical grid (``array`` whose first voxel is ``offset_zyx``) as the crop of the input grid
        holding the same voxels; exact, so for re-indexed scans only."""
        if self.resampled:
            raise ValueError("crops of a resampled (oblique) scan cannot be re-indexed; resample them instead")
        out = np.ascontiguousarray(unreindex_array(array, self.axes, self.flips))
        offset = [0, 0, 0]
        for a, (axis, flip) in enumerate(zip(self.axes, self.flips)):
            lo = int(offset_zyx[a])
            offset[axis] = self.input.shape_zyx[axis] - lo - array.shape[a] if flip else lo
        return out, (offset[0], offset[1], offset[2])

    def to_canonical(self, volume: Volume, *, interpolation: str = "linear",
                     fill_value: float = OUTSIDE_FILL_HU) -> Volume:
        """``volume`` (on ``input``) on the canonical grid: an exact re-indexed copy, or a SimpleITK resampling
        (``interpolation`` "linear" gives float32, "nearest" keeps the dtype: use it for label maps)."""
        if tuple(volume.shape_zyx) != tuple(self.input.shape_zyx):
            raise ValueError(f"volume {volume.shape_zyx} is not on the reorientation's input grid "
                             f"{self.input.shape_zyx}")
        meta = {**volume.meta, "orientation": self.summary()}
        if self.is_identity:
            return Volume.from_geometry(volume.array, self.canonical, meta)
        if not self.resampled:
            array = np.ascontiguousarray(reindex_array(volume.array, self.axes, self.flips))
            return Volume.from_geometry(array, self.canonical, meta)
        return Volume.from_geometry(_resample(volume, self.canonical, interpolation, fill_value), self.canonical,
                                    meta)

    def to_input(self, volume: Volume, *, interpolation: str = "nearest", fill_value: float = 0.0) -> Volume:
        """A volume on the canonical grid (e.g. a label map) back on the input's own grid."""
        if tuple(volume.shape_zyx) != tuple(self.canonical.shape_zyx):
            raise ValueError(f"volume {volume.shape_zyx} is not on the canonical grid {self.canonical.shape_zyx}")
        if self.is_identity:
            return Volume.from_geometry(volume.array, self.input, volume.meta)
        if not self.resampled:
            array = np.ascontiguousarray(unreindex_array(volume.array, self.axes, self.flips))
            return Volume.from_geometry(array, self.input, volume.meta)
        return Volume.from_geometry(_resample(volume, self.input, interpolation, fill_value), self.input,
                                    volume.meta)

    def summary(self) -> dict[str, Any]:
        """What was done, for ``nodules.json``, ``summary.json`` and the log."""
        method = "none" if self.is_identity else ("resampled" if self.resampled else "reindexed")
        return {"input_code": self.input_code, "canonical_code": CANONICAL_CODE, "method": method,
                "max_off_axis_cosine": round(self.deviation, 6)}

    def describe(self) -> str:
        """One line for the log."""
        if self.is_identity:
            return f"orientation {self.input_code}: already canonical"
        if self.resampled:
            return (f"oblique orientation (off-axis cosine {self.deviation:.3f}, nearest {self.input_code}): "
                    f"resampled onto an axis-aligned {CANONICAL_CODE} grid {self.canonical.shape_zyx}")
        return f"orientation {self.input_code}: re-indexed to {CANONICAL_CODE} (exact, no interpolation)"

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input.to_dict(), "canonical": self.canonical.to_dict(), "axes": list(self.axes),
                "flips": list(self.flips), "resampled": self.resampled, "deviation": self.deviation,
                **self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reorientation:
        return cls(Geometry.from_dict(d["input"]), Geometry.from_dict(d["canonical"]),
                   tuple(int(v) for v in d["axes"]), tuple(bool(v) for v in d["flips"]),  # type: ignore[arg-type]
                   bool(d["resampled"]), float(d.get("deviation", 0.0)))


def _resample(volume: Volume, target: Geometry, interpolation: str, fill_value: float) -> np.ndarray:
    """``volume`` sampled at ``target``'s voxel centres (SimpleITK; linear -> float32, nearest keeps the dtype)."""
    import SimpleITK as sitk

    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    source = volume.array
    if interpolation == "linear" and source.dtype != np.float32:
        source = source.astype(np.float32)  # interpolate in float: ITK would truncate into an integer type
    elif source.dtype == np.bool_:
        source = source.astype(np.uint8)  # SimpleITK has no bool pixel type
    image = sitk.GetImageFromArray(np.ascontiguousarray(source))
    image.SetSpacing(volume.geometry.spacing_xyz)
    image.SetOrigin(volume.origin_xyz_mm)
    image.SetDirection(volume.direction)
    out = sitk.Resample(image, [int(s) for s in target.shape_zyx[::-1]], sitk.Transform(),
                        sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor,
                        target.origin_xyz_mm, target.spacing_xyz, target.direction, float(fill_value))
    array = sitk.GetArrayFromImage(out)
    return array.astype(volume.array.dtype) if interpolation == "nearest" and array.dtype != volume.array.dtype \
        else array


def canonical_orientation(volume: Volume, *, interpolation: str = "linear",
                          fill_value: float = OUTSIDE_FILL_HU) -> tuple[Volume, Reorientation]:
    """The ONE place a scan is put into canonical orientation (module doc): ``(canonical volume, the record back)``.

    The canonical volume's ``meta`` gains ``"orientation"`` (:meth:`Reorientation.summary`). An input that is
    already canonical comes back as the same array (no copy)."""
    reorientation = Reorientation.of(volume.geometry)
    return reorientation.to_canonical(volume, interpolation=interpolation, fill_value=fill_value), reorientation
