"""A CT volume with the geometry that places it on the patient.

Conventions (see DESIGN.md):

- ``array`` is indexed ``(z, y, x)`` (slice, row, column).
- ``spacing_zyx`` is the voxel size in millimetres in the same order as the array axes.
- ``origin_xyz_mm`` is the world position (DICOM patient coordinates, LPS, mm) of the centre of voxel
  ``(0, 0, 0)``, ordered ``(x, y, z)`` like every world coordinate.
- ``direction`` is the 3x3 ITK/DICOM direction matrix: column ``c`` is the unit world ``(x, y, z)``
  vector of index axis ``c`` where index axes are ordered ``(i, j, k)`` = (column, row, slice), exactly as
  SimpleITK's ``GetDirection()`` reshaped to 3x3. It is never assumed to be the identity.

So, for an array index ``(z, y, x)``::

    world_xyz_mm = origin_xyz_mm + direction @ (spacing_xyz * (x, y, z))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

Array = np.ndarray


def _as_triplet(values: Any, name: str) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers, got {values!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True)
class Geometry:
    """Where a ``(z, y, x)`` grid sits in the patient: origin, spacing and direction (see module doc)."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape_zyx)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape_zyx must be 3 positive sizes, got {self.shape_zyx!r}")
        spacing = _as_triplet(self.spacing_zyx, "spacing_zyx")
        if min(spacing) <= 0:
            raise ValueError(f"spacing_zyx must be positive, got {spacing!r}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(-1)
        if direction.shape != (9,):
            raise ValueError("direction must hold 9 numbers (a 3x3 matrix, row-major)")
        matrix = direction.reshape(3, 3)
        det = np.linalg.det(matrix)
        if not np.isfinite(det) or abs(det) < 1e-6:
            raise ValueError(f"direction matrix is singular (det = {det:.4g}): its axes do not span 3D space")
        if abs(abs(det) - 1.0) > 1e-3:
            raise ValueError(f"direction must be orthonormal (|det| = 1), got det = {det:.4f}")
        # |det| = 1 alone lets a sheared matrix through, and world_to_voxel inverts by transposing.
        if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-3):
            raise ValueError("direction must be orthonormal (unit axes at right angles), got a sheared matrix "
                             f"{np.round(matrix, 4).tolist()}")
        object.__setattr__(self, "shape_zyx", shape)
        object.__setattr__(self, "spacing_zyx", spacing)
        object.__setattr__(self, "origin_xyz_mm", _as_triplet(self.origin_xyz_mm, "origin_xyz_mm"))
        object.__setattr__(self, "direction", tuple(float(v) for v in direction))

    @property
    def direction_matrix(self) -> Array:
        """3x3 array; column c is the world direction of index axis c in (i, j, k) = (x, y, z) order."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        z, y, x = self.spacing_zyx
        return (x, y, z)

    def voxel_to_world(self, index_zyx: Any) -> Array:
        """Map voxel indices ``(..., 3)`` in ``(z, y, x)`` order (may be fractional) to world ``(x, y, z)`` mm."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        ijk = idx[..., ::-1] * np.asarray(self.spacing_xyz)
        return np.asarray(self.origin_xyz_mm) + ijk @ self.direction_matrix.T

    def world_to_voxel(self, world_xyz_mm: Any) -> Array:
        """Map world ``(..., 3)`` ``(x, y, z)`` mm to fractional voxel indices in ``(z, y, x)`` order."""
        world = np.asarray(world_xyz_mm, dtype=np.float64)
        rel = world - np.asarray(self.origin_xyz_mm)
        # direction is orthonormal, so its inverse is its transpose.
        ijk = (rel @ self.direction_matrix) / np.asarray(self.spacing_xyz)
        return ijk[..., ::-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape_zyx": list(self.shape_zyx),
            "spacing_zyx": list(self.spacing_zyx),
            "origin_xyz_mm": list(self.origin_xyz_mm),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        return cls(
            shape_zyx=tuple(d["shape_zyx"]),
            spacing_zyx=tuple(d["spacing_zyx"]),
            origin_xyz_mm=tuple(d["origin_xyz_mm"]),
            direction=tuple(d.get("direction", Geometry.direction)),
        )


@dataclass
class Volume:
    """A ``(z, y, x)`` array (HU for CT, labels for masks) plus its :class:`Geometry`.

    ``meta`` carries what the reader knew about the source (e.g. ``source_path``, ``modality``,
    ``series_instance_uid``, ``patient_id``, ``sop_instance_uids`` per slice in z order). It is
    informational: geometry never lives there.
    """

    array: Array
    spacing_zyx: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a Volume array must be 3D (z, y, x), got shape {self.array.shape}")
        geom = self.geometry  # validates spacing/origin/direction
        self.spacing_zyx = geom.spacing_zyx
        self.origin_xyz_mm = geom.origin_xyz_mm
        self.direction = geom.direction

    @property
    def geometry(self) -> Geometry:
        return Geometry(
            shape_zyx=tuple(self.array.shape),
            spacing_zyx=self.spacing_zyx,
            origin_xyz_mm=self.origin_xyz_mm,
            direction=self.direction,
        )

    @classmethod
    def from_geometry(cls, array: Array, geometry: Geometry, meta: dict[str, Any] | None = None) -> "Volume":
        if tuple(array.shape) != tuple(geometry.shape_zyx):
            raise ValueError(f"array shape {array.shape} does not match geometry {geometry.shape_zyx}")
        return cls(array, geometry.spacing_zyx, geometry.origin_xyz_mm, geometry.direction, dict(meta or {}))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def voxel_to_world(self, index_zyx: Any) -> Array:
        return self.geometry.voxel_to_world(index_zyx)

    def world_to_voxel(self, world_xyz_mm: Any) -> Array:
        return self.geometry.world_to_voxel(world_xyz_mm)

    def with_array(self, array: Array, **meta_updates: Any) -> "Volume":
        """A new Volume on the same grid holding ``array`` (e.g. a mask of this scan)."""
        if tuple(array.shape) != self.shape_zyx:
            raise ValueError(f"array shape {array.shape} does not match volume shape {self.shape_zyx}")
        return replace(self, array=array, meta={**self.meta, **meta_updates})
