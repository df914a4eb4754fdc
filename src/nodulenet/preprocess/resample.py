"""Resample a :class:`~nodulenet.io.volume.Volume` to a new voxel spacing, keeping it in place on the patient.

Conventions (DESIGN.md): arrays ``(z, y, x)``; spacing ``spacing_zyx`` in mm; world ``(x, y, z)`` LPS mm.

The resampled grid keeps the scan's **direction** and the **world position of voxel (0, 0, 0)**: the centre
of the first voxel stays on the same patient point, only the step between voxel centres changes. Its size is
chosen so that every new voxel centre lies inside the span of the old voxel centres (no extrapolation), so
for each axis ``n_new = floor((n_old - 1) * old_spacing / new_spacing) + 1``.

Because origin and direction are shared, the two grids relate by a pure per-axis scale::

    original_index_zyx = resampled_index_zyx * (new_spacing_zyx / old_spacing_zyx)

which :class:`ResampleMapping` records (and :mod:`nodulenet.preprocess.prepare` writes to ``transform.json``).

Images are interpolated linearly (CT: a smooth signal); label maps use nearest neighbour so a label map
never gains values it did not have (instance ids stay exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nodulenet.io.orientation import Reorientation
from nodulenet.io.volume import Geometry, Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

# SimpleITK is imported inside the functions that resample: CaseTransform (below) is all the training path needs
# from here, and training runs without ITK (see data/nrrd_mmap.py).
Interpolation = Literal["linear", "nearest", "bspline"]
_INTERPOLATORS = ("linear", "nearest", "bspline")

# A small tolerance so that e.g. 132 slices * 2.5 mm / 1.0 mm = 330 is not floored to 329 by rounding error.
_SIZE_EPS = 1e-6


@dataclass(frozen=True)
class ResampleMapping:
    """How an index of the resampled grid maps to an index of the original grid (same origin + direction)."""

    original: Geometry
    resampled: Geometry

    @property
    def scale_zyx(self) -> tuple[float, float, float]:
        """``original_index = resampled_index * scale_zyx`` (per axis, fractional)."""
        return tuple(n / o for n, o in zip(self.resampled.spacing_zyx, self.original.spacing_zyx))  # type: ignore[return-value]

    def resampled_to_original_index(self, index_zyx: Any) -> np.ndarray:
        return np.asarray(index_zyx, dtype=np.float64) * np.asarray(self.scale_zyx)

    def original_to_resampled_index(self, index_zyx: Any) -> np.ndarray:
        return np.asarray(index_zyx, dtype=np.float64) / np.asarray(self.scale_zyx)

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original.to_dict(),
            "resampled": self.resampled.to_dict(),
            "scale_zyx": list(self.scale_zyx),
            "formula": "original_index_zyx = resampled_index_zyx * scale_zyx",
        }


def resampled_geometry(geometry: Geometry, spacing_zyx: tuple[float, float, float]) -> Geometry:
    """The grid with ``spacing_zyx`` that shares ``geometry``'s origin and direction and stays inside its span."""
    new_spacing = tuple(float(s) for s in spacing_zyx)
    if len(new_spacing) != 3 or min(new_spacing) <= 0:
        raise ValueError(f"target spacing must be 3 positive numbers (z, y, x), got {spacing_zyx!r}")
    shape = tuple(
        int(math.floor((n - 1) * old / new + _SIZE_EPS)) + 1
        for n, old, new in zip(geometry.shape_zyx, geometry.spacing_zyx, new_spacing)
    )
    return Geometry(shape, new_spacing, geometry.origin_xyz_mm, geometry.direction)  # type: ignore[arg-type]


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image sharing the volume's geometry (SimpleITK orders index axes (x, y, z))."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(volume.geometry.spacing_xyz)
    image.SetOrigin(volume.origin_xyz_mm)
    image.SetDirection(volume.direction)
    return image


def resample_volume(
    volume: Volume,
    spacing_zyx: tuple[float, float, float],
    interpolation: Interpolation = "linear",
    default_value: float = 0.0,
    output_dtype: np.dtype | type | None = None,
) -> tuple[Volume, ResampleMapping]:
    """Resample ``volume`` onto the grid :func:`resampled_geometry` defines; return it and the index mapping.

    ``output_dtype`` defaults to float32 for linear/B-spline interpolation (so HU are not truncated) and to
    the input dtype for nearest neighbour (so labels stay exactly the same integers).
    ``default_value`` fills any voxel that falls outside the input (none with the default grid; it matters
    only through rounding at the very edge).
    """
    import SimpleITK as sitk

    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}")
    target = resampled_geometry(volume.geometry, spacing_zyx)
    mapping = ResampleMapping(original=volume.geometry, resampled=target)
    if output_dtype is None:
        output_dtype = volume.array.dtype if interpolation == "nearest" else np.float32
    out_dtype = np.dtype(output_dtype)

    source = volume.array
    if interpolation != "nearest" and source.dtype != np.float32:
        # Interpolating in float avoids ITK's truncating cast back to an integer pixel type.
        source = source.astype(np.float32)
    elif interpolation == "nearest" and source.dtype == np.bool_:
        source = source.astype(np.uint8)  # SimpleITK has no bool pixel type
    image = volume_to_sitk(volume.with_array(source))

    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing(target.spacing_xyz)
    resampler.SetOutputOrigin(target.origin_xyz_mm)
    resampler.SetOutputDirection(target.direction)
    resampler.SetSize([int(s) for s in target.shape_zyx[::-1]])
    resampler.SetInterpolator({"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
                              "bspline": sitk.sitkBSpline}[interpolation])
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetTransform(sitk.Transform())
    out = sitk.GetArrayFromImage(resampler.Execute(image))
    if out.dtype != out_dtype:
        out = out.astype(out_dtype)
    meta = {**volume.meta, "resampled_from_spacing_zyx": list(volume.spacing_zyx), "interpolation": interpolation}
    return Volume.from_geometry(out, target, meta), mapping


def resample_labels(labels: Volume, spacing_zyx: tuple[float, float, float]) -> tuple[Volume, ResampleMapping]:
    """Nearest-neighbour resampling of a label map: the output holds only values the input held."""
    return resample_volume(labels, spacing_zyx, interpolation="nearest", default_value=0)


@dataclass(frozen=True)
class CaseTransform:
    """Where a prepared case's voxels come from: canonical orientation of the original scan, resampling, a crop.

    ``original`` is the scan's own grid as read. ``orientation`` (None when the scan was canonical already, the
    usual axial DICOM) is the :class:`~nodulenet.io.orientation.Reorientation` onto the ``canonical`` grid; the
    ``resampled`` grid shares the canonical grid's origin and direction. ``crop_start_zyx``/``crop_stop_zyx`` are
    in resampled voxels (stop exclusive). For a preprocessed index ``p`` (z, y, x)::

        resampled_index = p + crop_start_zyx
        canonical_index = (p + crop_start_zyx) * scale_zyx          (scale = resampled / canonical spacing)
        original_index  = orientation.canonical_to_input_index(canonical_index)   (= canonical_index if None)
        world_xyz_mm    = preprocessed.voxel_to_world(p)           (= original.voxel_to_world(original_index))

    ``preprocessed`` is the geometry stored in the case's NRRD headers.
    """

    original: Geometry
    resampled: Geometry
    crop_start_zyx: tuple[int, int, int]
    crop_stop_zyx: tuple[int, int, int]
    orientation: Reorientation | None = None

    def __post_init__(self) -> None:
        start = tuple(int(v) for v in self.crop_start_zyx)
        stop = tuple(int(v) for v in self.crop_stop_zyx)
        if any(not 0 <= a < b <= n for a, b, n in zip(start, stop, self.resampled.shape_zyx)):
            raise ValueError(f"crop {start}..{stop} does not fit the resampled grid {self.resampled.shape_zyx}")
        if self.orientation is not None and self.orientation.input.shape_zyx != self.original.shape_zyx:
            raise ValueError(f"orientation input grid {self.orientation.input.shape_zyx} is not the original grid "
                             f"{self.original.shape_zyx}")
        object.__setattr__(self, "crop_start_zyx", start)
        object.__setattr__(self, "crop_stop_zyx", stop)

    @property
    def canonical(self) -> Geometry:
        """The grid that was resampled: the original scan in canonical orientation."""
        return self.original if self.orientation is None else self.orientation.canonical

    @property
    def mapping(self) -> ResampleMapping:
        return ResampleMapping(self.canonical, self.resampled)

    @property
    def scale_zyx(self) -> tuple[float, float, float]:
        return self.mapping.scale_zyx

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.crop_start_zyx, self.crop_stop_zyx))  # type: ignore[return-value]

    @property
    def preprocessed(self) -> Geometry:
        """The cropped grid: resampled spacing and direction, origin at the crop's first voxel centre."""
        origin = self.resampled.voxel_to_world(np.asarray(self.crop_start_zyx, dtype=np.float64))
        shape = tuple(b - a for a, b in zip(self.crop_start_zyx, self.crop_stop_zyx))
        return Geometry(shape, self.resampled.spacing_zyx, tuple(origin), self.resampled.direction)  # type: ignore[arg-type]

    def orientation_summary(self) -> dict[str, Any]:
        """How the scan was put into canonical orientation (:meth:`Reorientation.summary`; method "none" when it
        already was)."""
        return (self.orientation or Reorientation.of(self.original)).summary()

    def preprocessed_to_canonical_index(self, index_zyx: Any) -> np.ndarray:
        idx = np.asarray(index_zyx, dtype=np.float64) + np.asarray(self.crop_start_zyx, dtype=np.float64)
        return self.mapping.resampled_to_original_index(idx)

    def preprocessed_to_original_index(self, index_zyx: Any) -> np.ndarray:
        canonical = self.preprocessed_to_canonical_index(index_zyx)
        return canonical if self.orientation is None else self.orientation.canonical_to_input_index(canonical)

    def original_to_preprocessed_index(self, index_zyx: Any) -> np.ndarray:
        if self.orientation is not None:
            index_zyx = self.orientation.input_to_canonical_index(index_zyx)
        resampled = self.mapping.original_to_resampled_index(index_zyx)
        return resampled - np.asarray(self.crop_start_zyx, dtype=np.float64)

    def preprocessed_to_world(self, index_zyx: Any) -> np.ndarray:
        return self.preprocessed.voxel_to_world(index_zyx)

    def world_to_preprocessed(self, world_xyz_mm: Any) -> np.ndarray:
        return self.preprocessed.world_to_voxel(world_xyz_mm)

    def to_dict(self) -> dict[str, Any]:
        return {
            "conventions": (
                "indices (z, y, x), fractional = voxel centres; world (x, y, z) DICOM LPS mm; "
                "crop stop exclusive, in resampled voxels"
            ),
            "original": self.original.to_dict(),
            "resampled": self.resampled.to_dict(),
            "preprocessed": self.preprocessed.to_dict(),
            "crop_start_zyx": list(self.crop_start_zyx),
            "crop_stop_zyx": list(self.crop_stop_zyx),
            "scale_zyx": list(self.scale_zyx),
            **({} if self.orientation is None else {"orientation": self.orientation.to_dict()}),
            "formulas": {
                "preprocessed_to_resampled_index": "resampled_index_zyx = preprocessed_index_zyx + crop_start_zyx",
                "preprocessed_to_original_index": (
                    "original_index_zyx = (preprocessed_index_zyx + crop_start_zyx) * scale_zyx"
                    if self.orientation is None else
                    "canonical_index_zyx = (preprocessed_index_zyx + crop_start_zyx) * scale_zyx; original_index_zyx "
                    "[axes[a]] = canonical_index_zyx[a], or original shape_zyx[axes[a]] - 1 - canonical_index_zyx[a] "
                    "where flips[a] (axes, flips from 'orientation')"
                    if not self.orientation.resampled else
                    "canonical_index_zyx = (preprocessed_index_zyx + crop_start_zyx) * scale_zyx; original_index_zyx "
                    "= original.world_to_voxel(orientation.canonical.voxel_to_world(canonical_index_zyx))"
                ),
                "index_to_world": (
                    "world_xyz_mm = origin_xyz_mm + D @ (spacing_xyz * index_xyz), D = direction as 3x3 row-major, "
                    "index_xyz = index_zyx reversed; with the 'preprocessed' or 'original' geometry"
                ),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaseTransform":
        return cls(
            original=Geometry.from_dict(d["original"]),
            resampled=Geometry.from_dict(d["resampled"]),
            crop_start_zyx=tuple(d["crop_start_zyx"]),  # type: ignore[arg-type]
            crop_stop_zyx=tuple(d["crop_stop_zyx"]),  # type: ignore[arg-type]
            orientation=Reorientation.from_dict(d["orientation"]) if d.get("orientation") else None,
        )
