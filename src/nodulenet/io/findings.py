"""What ``nodulenet predict`` found in one scan, and its ``nodules.json`` file (schema ``nodulenet.nodules/1``).

This is a plain data module: dataclasses, validation and JSON (de)serialisation. The measurements that fill
a :class:`NoduleFinding` are computed in :mod:`nodulenet.export.measurements`; the inference stage may
import this module (``io``) but not ``export`` (layering in DESIGN.md).

Conventions (see DESIGN.md), all on the ORIGINAL scan's grid, the one ``geometry`` describes:

- ``center_zyx``: fractional voxel index ``(z, y, x)`` of the nodule centre (mask centroid).
- ``center_world_xyz_mm``: the same point in DICOM patient coordinates (LPS, mm), ordered ``(x, y, z)``.
- ``box_zyx``: ``(z0, y0, x0, z1, y1, x1)`` integer voxels, ``z1/y1/x1`` exclusive: the tight bounding box
  of the mask.
- ``id``: 1..K, unique within a scan; it is the finding's value in the label map and its DICOM SEG
  segment number.
- ``mask``: an optional crop (:class:`NoduleMask`: bool array + ``offset_zyx`` of its first voxel in the
  scan grid). It is NOT written to JSON: the label map written beside ``nodules.json`` carries it.

Example ``nodules.json`` (abridged)::

    {"schema": "nodulenet.nodules/1", "nodulenet_version": "0.1.0", "created_utc": "2025-01-01T12:00:00Z",
     "source": {"path": ".../LIDC-IDRI-0001/...", "format": "dicom", "series_instance_uid": "1.3.6...",
                "study_instance_uid": "1.3.6...", "frame_of_reference_uid": "1.3.6...",
                "patient_id": "LIDC-IDRI-0001", "patient_name": "", "study_date": "20000101"},
     "geometry": {"shape_zyx": [133, 512, 512], "spacing_zyx": [2.5, 0.703125, 0.703125],
                  "origin_xyz_mm": [-166.0, -171.7, -340.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
     "model": {"name": "NoduleNet", "version": "1", "weights_sha256": "ab12...", "config_sha256": "cd34..."},
     "threshold": 0.5,
     "findings": [{"id": 1, "score": 0.93, "center_world_xyz_mm": [56.2, 86.3, -115.9],
                   "center_zyx": [89.65, 366.99, 316.03], "box_zyx": [85, 350, 299, 95, 384, 333],
                   "diameter_mm": 24.1, "equivalent_diameter_mm": 23.3, "max_extent_mm": 25.8,
                   "volume_mm3": 6620.0, "voxel_count": 5356, "mean_hu": -12.5, "side": "left",
                   "long_axis_zyx": [[89.0, 350.5, 305.5], [89.0, 383.5, 327.5]]}],
     "timings": {"read_s": 0.9, "infer_s": 14.2}}

``diameter_mm`` is the long-axis diameter (longest in-plane diameter, see
:mod:`nodulenet.export.measurements`); ``long_axis_zyx`` its two end points (voxel coordinates on the
slice where it was measured). Mask-derived values are ``null`` for a finding without a mask.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet import __version__
from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.io.volume import Geometry

SCHEMA = "nodulenet.nodules/1"
SIDES = ("right", "left")

Triplet = tuple[float, float, float]


def utc_now_iso() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (what ``created_utc`` holds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite_triplet(values: Any, name: str) -> Triplet:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers, got {values!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _optional_float(value: Any, name: str, *, minimum: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number or null, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return number


@dataclass(frozen=True)
class NoduleMask:
    """A nodule's voxels as a crop of the scan grid: ``array[z, y, x]`` is voxel
    ``offset_zyx + (z, y, x)`` of the scan."""

    array: np.ndarray = field(repr=False)
    offset_zyx: tuple[int, int, int]

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise ValueError(f"a nodule mask must be a 3D (z, y, x) array, got shape {array.shape}")
        object.__setattr__(self, "array", array.astype(bool, copy=False))
        offset = tuple(int(v) for v in self.offset_zyx)
        if len(offset) != 3:
            raise ValueError(f"offset_zyx must be 3 integers, got {self.offset_zyx!r}")
        object.__setattr__(self, "offset_zyx", offset)

    @property
    def crop_box_zyx(self) -> tuple[int, int, int, int, int, int]:
        """The crop's extent in the scan grid ``(z0, y0, x0, z1, y1, x1)`` (exclusive ends)."""
        z, y, x = self.offset_zyx
        dz, dy, dx = self.array.shape
        return (z, y, x, z + dz, y + dy, x + dx)

    def slices(self) -> tuple[slice, slice, slice]:
        """Index of the crop in a full ``(z, y, x)`` array of the scan."""
        b = self.crop_box_zyx
        return (slice(b[0], b[3]), slice(b[1], b[4]), slice(b[2], b[5]))

    def fits(self, shape_zyx: tuple[int, ...]) -> bool:
        b = self.crop_box_zyx
        return min(b[:3]) >= 0 and all(b[3 + a] <= shape_zyx[a] for a in range(3))

    def tight(self) -> NoduleMask:
        """The same voxels in the smallest crop that holds them (an empty mask stays as it is)."""
        nz = np.nonzero(self.array)
        if nz[0].size == 0:
            return self
        lo = [int(a.min()) for a in nz]
        hi = [int(a.max()) + 1 for a in nz]
        crop = self.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        return NoduleMask(crop, tuple(o + start for o, start in zip(self.offset_zyx, lo)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class NoduleFinding:
    """One nodule on the original scan grid (see the module doc for every field's convention)."""

    id: int
    score: float
    center_world_xyz_mm: Triplet
    center_zyx: Triplet
    box_zyx: tuple[int, int, int, int, int, int]
    diameter_mm: float | None = None
    equivalent_diameter_mm: float | None = None
    max_extent_mm: float | None = None
    volume_mm3: float | None = None
    voxel_count: int | None = None
    mean_hu: float | None = None
    side: str | None = None
    long_axis_zyx: tuple[Triplet, Triplet] | None = None
    mask: NoduleMask | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or int(self.id) != self.id or int(self.id) < 1:
            raise ValueError(f"finding id must be an integer >= 1, got {self.id!r}")
        object.__setattr__(self, "id", int(self.id))
        score = _optional_float(self.score, "score")
        if score is None or not 0.0 <= score <= 1.0:
            raise ValueError(f"finding {self.id}: score must be in [0, 1], got {self.score!r}")
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "center_world_xyz_mm",
                           _finite_triplet(self.center_world_xyz_mm, "center_world_xyz_mm"))
        object.__setattr__(self, "center_zyx", _finite_triplet(self.center_zyx, "center_zyx"))
        box = tuple(int(v) for v in self.box_zyx)
        if len(box) != 6 or any(box[a] >= box[a + 3] for a in range(3)) or min(box[:3]) < 0:
            raise ValueError(f"finding {self.id}: box_zyx must be (z0, y0, x0, z1, y1, x1) with 0 <= start < end, "
                             f"got {self.box_zyx!r}")
        object.__setattr__(self, "box_zyx", box)
        for name in ("diameter_mm", "equivalent_diameter_mm", "max_extent_mm", "volume_mm3"):
            value = _optional_float(getattr(self, name), f"finding {self.id}: {name}", minimum=0.0)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "mean_hu", _optional_float(self.mean_hu, f"finding {self.id}: mean_hu"))
        if self.voxel_count is not None:
            if int(self.voxel_count) != self.voxel_count or int(self.voxel_count) < 0:
                raise ValueError(f"finding {self.id}: voxel_count must be an integer >= 0, got {self.voxel_count!r}")
            object.__setattr__(self, "voxel_count", int(self.voxel_count))
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"finding {self.id}: side must be one of {SIDES} or None, got {self.side!r}")
        if self.long_axis_zyx is not None:
            ends = tuple(_finite_triplet(p, "long_axis_zyx end point") for p in self.long_axis_zyx)
            if len(ends) != 2:
                raise ValueError(f"finding {self.id}: long_axis_zyx must hold 2 end points")
            object.__setattr__(self, "long_axis_zyx", ends)
        if self.mask is not None and not isinstance(self.mask, NoduleMask):
            raise ValueError(f"finding {self.id}: mask must be a NoduleMask")

    def with_mask(self, mask: NoduleMask | None) -> NoduleFinding:
        return replace(self, mask=mask)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "center_world_xyz_mm": list(self.center_world_xyz_mm),
            "center_zyx": list(self.center_zyx),
            "box_zyx": list(self.box_zyx),
            "diameter_mm": self.diameter_mm,
            "equivalent_diameter_mm": self.equivalent_diameter_mm,
            "max_extent_mm": self.max_extent_mm,
            "volume_mm3": self.volume_mm3,
            "voxel_count": self.voxel_count,
            "mean_hu": self.mean_hu,
            "side": self.side,
            "long_axis_zyx": None if self.long_axis_zyx is None else [list(p) for p in self.long_axis_zyx],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoduleFinding:
        _require(d, ("id", "score", "center_world_xyz_mm", "center_zyx", "box_zyx"), "finding")
        return cls(
            id=d["id"],
            score=d["score"],
            center_world_xyz_mm=d["center_world_xyz_mm"],
            center_zyx=d["center_zyx"],
            box_zyx=d["box_zyx"],
            diameter_mm=d.get("diameter_mm"),
            equivalent_diameter_mm=d.get("equivalent_diameter_mm"),
            max_extent_mm=d.get("max_extent_mm"),
            volume_mm3=d.get("volume_mm3"),
            voxel_count=d.get("voxel_count"),
            mean_hu=d.get("mean_hu"),
            side=d.get("side"),
            long_axis_zyx=d.get("long_axis_zyx"),
        )


@dataclass(frozen=True)
class ScanSource:
    """Where the scan came from. Identifiers are copied from the input (they may be PHI, like the input)."""

    path: str
    format: str
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None

    @classmethod
    def from_volume_meta(cls, meta: Mapping[str, Any]) -> ScanSource:
        """Build it from ``Volume.meta`` as filled by the readers in :mod:`nodulenet.io`."""

        def text(key: str) -> str | None:
            value = meta.get(key)
            return None if value is None else str(value)

        return cls(
            path=str(meta.get("source_path", "")),
            format=str(meta.get("format", "unknown")),
            series_instance_uid=text("series_instance_uid"),
            study_instance_uid=text("study_instance_uid"),
            frame_of_reference_uid=text("frame_of_reference_uid"),
            patient_id=text("patient_id"),
            patient_name=text("patient_name"),
            study_date=text("study_date"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScanSource:
        _require(d, ("path", "format"), "source")
        known = {k: (None if d.get(k) is None else str(d[k])) for k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced the findings: enough to reproduce the run."""

    name: str = "NoduleNet"
    version: str | None = None
    weights_sha256: str | None = None
    config_sha256: str | None = None
    runtime: str | None = None  # what ran the network: "torch", "onnx" or "openvino"
    precision: str | None = None  # "fp32" or "bf16" (bf16: the backbone only)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        known = {k: (None if d.get(k) is None else str(d[k])) for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)  # type: ignore[arg-type]


@dataclass
class ScanFindings:
    """Everything ``nodules.json`` holds for one scan. Finding ids must be exactly 1..K."""

    source: ScanSource
    geometry: Geometry
    findings: list[NoduleFinding]
    model: ModelInfo = field(default_factory=ModelInfo)
    threshold: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    nodulenet_version: str = __version__
    created_utc: str = field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        ids = sorted(f.id for f in self.findings)
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"finding ids must be 1..{len(ids)} (each once; they are the label-map values), got {ids}")
        shape = self.geometry.shape_zyx
        for f in self.findings:
            if any(f.box_zyx[3 + a] > shape[a] for a in range(3)):
                raise ValueError(f"finding {f.id}: box_zyx {f.box_zyx} reaches outside the scan grid {shape}")
            if f.mask is not None and not f.mask.fits(shape):
                raise ValueError(f"finding {f.id}: mask crop {f.mask.crop_box_zyx} reaches outside the scan "
                                 f"grid {shape}")
        self.threshold = _optional_float(self.threshold, "threshold")
        self.timings = {str(k): float(v) for k, v in self.timings.items()}

    def by_id(self, finding_id: int) -> NoduleFinding:
        for f in self.findings:
            if f.id == finding_id:
                return f
        raise KeyError(finding_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "nodulenet_version": self.nodulenet_version,
            "created_utc": self.created_utc,
            "source": self.source.to_dict(),
            "geometry": self.geometry.to_dict(),
            "model": self.model.to_dict(),
            "threshold": self.threshold,
            "findings": [f.to_dict() for f in sorted(self.findings, key=lambda f: f.id)],
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScanFindings:
        """Parse a ``nodules.json`` object; raises ValueError naming the first problem."""
        if not isinstance(d, Mapping):
            raise ValueError("the top level must be a JSON object")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"schema is {schema!r}; this NoduleNet reads {SCHEMA!r}")
        _require(d, ("source", "geometry", "findings"), "nodules.json")
        if not isinstance(d["findings"], list):
            raise ValueError("'findings' must be a list")
        findings = []
        for k, item in enumerate(d["findings"]):
            if not isinstance(item, Mapping):
                raise ValueError(f"findings[{k}] must be an object")
            try:
                findings.append(NoduleFinding.from_dict(item))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"findings[{k}]: {exc}") from None
        try:
            geometry = Geometry.from_dict(d["geometry"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"geometry: {exc}") from None
        timings = d.get("timings") or {}
        if not isinstance(timings, Mapping):
            raise ValueError("'timings' must be an object of numbers")
        return cls(
            source=ScanSource.from_dict(d["source"]),
            geometry=geometry,
            findings=findings,
            model=ModelInfo.from_dict(d.get("model") or {}),
            threshold=d.get("threshold"),
            timings=dict(timings),
            nodulenet_version=str(d.get("nodulenet_version", "unknown")),
            created_utc=str(d.get("created_utc", "")),
        )

    def write_json(self, path: str | Path) -> Path:
        """Write ``nodules.json`` atomically (a reader never sees half a file)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def read_json(cls, path: str | Path) -> ScanFindings:
        """Read ``nodules.json``; any problem is an :class:`InputError` naming the file."""
        return read_findings_json(path)


def _require(d: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} must be a JSON object")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(repr(k) for k in missing)}")


def write_findings_json(findings: ScanFindings, path: str | Path) -> Path:
    return findings.write_json(path)


def read_findings_json(path: str | Path) -> ScanFindings:
    """Read a ``nodules.json`` file (schema ``nodulenet.nodules/1``). Masks are not in the file: attach them
    from the label map with :func:`nodulenet.export.labelmap.attach_masks_from_label_map`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file (expected nodules.json)") from None
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    try:
        return ScanFindings.from_dict(obj)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(path, f"not a valid nodules.json: {exc}") from None
