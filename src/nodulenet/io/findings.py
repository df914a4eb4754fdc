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
                "patient_id": "LIDC-IDRI-0001", "patient_name": "", "study_date": "20000101",
                "gantry_tilt_deg": 0.0},
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

Added later (optional on reading, so older files still load):

- ``centre_slice``: the slice a reader opens to see the finding (:class:`SliceReference`): ``index`` (0-based
  array z of the scan grid, nearest the centre along the slice normal), ``instance_number`` and
  ``slice_location_mm`` (the DICOM InstanceNumber and SliceLocation of that slice as written in its file, what
  a PACS shows; ``null`` for non-DICOM input or when the file lacks them) and ``position_z_mm`` (world z, LPS, of
  the finding's centre projected onto that slice: the slice's table position for axial scans).
  Example: ``{"index": 187, "instance_number": 74, "slice_location_mm": -177.5, "position_z_mm": -177.5}``.
- ``site``: where the centre lies (:data:`SITES`): ``"lung"`` (inside the lungs or their 10 mm dilated
  margin), ``"outside_lungs"`` (outside the dilated lung mask) or ``"bone"`` (bone density, mean HU >=
  :data:`BONE_HU`, outside the lungs proper: a rib, a vertebra). ``side`` stays the patient's side of the body
  midline; ``site`` says whether it is in a lung at all. ``null`` when it could not be decided.
- ``nodule_type`` (:data:`NODULE_TYPES`: ``"solid"``, ``"part_solid"``, ``"ground_glass"``), ``mean_diameter_mm``
  (Lung-RADS: (long + short axis) / 2, one decimal) and ``solid_component_mm`` (the solid part's mean diameter,
  part-solid nodules only), read from the mask and the HU inside it (:mod:`nodulenet.export.nodule_type`).
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
from nodulenet.errors import InputError, text_file_errors
from nodulenet.io.atomic import write_json_atomic
from nodulenet.io.volume import Geometry

SCHEMA = "nodulenet.nodules/1"
SIDES = ("right", "left")
SITES = ("lung", "outside_lungs", "bone")
NODULE_TYPES = ("solid", "part_solid", "ground_glass")
# Mean HU from which a finding outside the lungs proper is bone: cancellous bone is ~300-400 HU, cortical
# >= 700; soft tissue and solid nodules are below ~100, so nothing soft reaches it.
BONE_HU = 300.0

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
class SliceReference:
    """The slice of the scan through a finding's centre, named the ways a reader can use (module doc)."""

    index: int
    position_z_mm: float
    instance_number: int | None = None
    slice_location_mm: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or int(self.index) != self.index or int(self.index) < 0:
            raise ValueError(f"centre_slice.index must be an integer >= 0, got {self.index!r}")
        object.__setattr__(self, "index", int(self.index))
        position = _optional_float(self.position_z_mm, "centre_slice.position_z_mm")
        if position is None:
            raise ValueError("centre_slice.position_z_mm must be a number")
        object.__setattr__(self, "position_z_mm", position)
        if self.instance_number is not None:
            if isinstance(self.instance_number, bool) or int(self.instance_number) != self.instance_number:
                raise ValueError(f"centre_slice.instance_number must be an integer, got {self.instance_number!r}")
            object.__setattr__(self, "instance_number", int(self.instance_number))
        object.__setattr__(self, "slice_location_mm",
                           _optional_float(self.slice_location_mm, "centre_slice.slice_location_mm"))

    def describe(self, n_slices: int | None = None) -> str:
        """How a person finds it: ``image 74 (slice location -177.5 mm)`` for DICOM, ``z -177.5 mm`` else."""
        if self.instance_number is not None:
            location = self.slice_location_mm if self.slice_location_mm is not None else self.position_z_mm
            return f"image {self.instance_number} (z {location:.1f} mm)"
        of = f" of {n_slices}" if n_slices else ""
        return f"slice {self.index + 1}{of} (z {self.position_z_mm:.1f} mm)"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "instance_number": self.instance_number,
                "slice_location_mm": self.slice_location_mm, "position_z_mm": self.position_z_mm}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceReference:
        _require(d, ("index", "position_z_mm"), "centre_slice")
        return cls(index=d["index"], position_z_mm=d["position_z_mm"], instance_number=d.get("instance_number"),
                   slice_location_mm=d.get("slice_location_mm"))


def _per_slice_value(meta: Mapping[str, Any], key: str, index: int, n_slices: int) -> Any:
    """``meta[key][index]`` when the reader recorded one value per slice of this grid, else None."""
    values = meta.get(key)
    if not isinstance(values, (list, tuple)) or len(values) != n_slices:
        return None
    value = values[index]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def slice_reference(geometry: Geometry, meta: Mapping[str, Any], world_xyz_mm: Any) -> SliceReference:
    """The slice through a world point on ``geometry``'s grid, with the DICOM numbers the reader recorded in
    ``meta`` (``instance_numbers``, ``slice_locations_mm``: one per slice in array z order).

    The slice is the one whose centre is nearest the point along the slice normal (array z); the DICOM reader
    sorts slices by ImagePositionPatient along that normal, so this is the instance whose position is nearest.
    """
    zyx = np.asarray(geometry.world_to_voxel(np.asarray(world_xyz_mm, dtype=np.float64)), dtype=np.float64)
    index = int(np.clip(np.floor(zyx[0] + 0.5), 0, int(geometry.shape_zyx[0]) - 1))
    return slice_reference_at(geometry, meta, index, (float(zyx[1]), float(zyx[2])))


def slice_reference_at(geometry: Geometry, meta: Mapping[str, Any], index: int,
                       row_col: tuple[float, float] | None = None) -> SliceReference:
    """:class:`SliceReference` of array slice ``index``; ``position_z_mm`` at in-plane voxel ``row_col`` (default
    the slice's middle; all the same for an axial scan)."""
    n = int(geometry.shape_zyx[0])
    index = int(index)
    if row_col is None:
        row_col = ((geometry.shape_zyx[1] - 1) / 2.0, (geometry.shape_zyx[2] - 1) / 2.0)
    position = float(geometry.voxel_to_world((float(index), row_col[0], row_col[1]))[2])
    instance = _per_slice_value(meta, "instance_numbers", index, n)
    location = _per_slice_value(meta, "slice_locations_mm", index, n)
    return SliceReference(index=index, position_z_mm=position,
                          instance_number=None if instance is None else int(instance),
                          slice_location_mm=None if location is None else float(location))


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
    centre_slice: SliceReference | None = None
    site: str | None = None
    nodule_type: str | None = None
    mean_diameter_mm: float | None = None
    solid_component_mm: float | None = None

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
        if self.centre_slice is not None and not isinstance(self.centre_slice, SliceReference):
            object.__setattr__(self, "centre_slice", SliceReference.from_dict(self.centre_slice))
        if self.site is not None and self.site not in SITES:
            raise ValueError(f"finding {self.id}: site must be one of {SITES} or None, got {self.site!r}")
        if self.nodule_type is not None and self.nodule_type not in NODULE_TYPES:
            raise ValueError(f"finding {self.id}: nodule_type must be one of {NODULE_TYPES} or None, "
                             f"got {self.nodule_type!r}")
        for name in ("mean_diameter_mm", "solid_component_mm"):
            object.__setattr__(self, name, _optional_float(getattr(self, name), f"finding {self.id}: {name}",
                                                           minimum=0.0))

    @property
    def location_text(self) -> str:
        """Where it is, in words: ``left lung``, ``right, outside the lungs``, ``left, bone`` (``unknown``)."""
        side = self.side or ""
        if self.site in (None, "lung"):
            return f"{side} lung" if side else ("lung" if self.site else "unknown")
        what = {"outside_lungs": "outside the lungs", "bone": "bone, outside the lungs"}[self.site]
        return f"{side}, {what}" if side else what

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
            "centre_slice": None if self.centre_slice is None else self.centre_slice.to_dict(),
            "site": self.site,
            "nodule_type": self.nodule_type,
            "mean_diameter_mm": self.mean_diameter_mm,
            "solid_component_mm": self.solid_component_mm,
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
            centre_slice=None if d.get("centre_slice") is None else SliceReference.from_dict(d["centre_slice"]),
            site=d.get("site"),
            nodule_type=d.get("nodule_type"),
            mean_diameter_mm=d.get("mean_diameter_mm"),
            solid_component_mm=d.get("solid_component_mm"),
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
    # DICOM input: the gantry tilt in degrees (0: none); non-zero means the reader resampled the sheared series
    # onto an orthogonal grid, which ``geometry`` describes. None for input that is not DICOM.
    gantry_tilt_deg: float | None = None

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
            gantry_tilt_deg=None if meta.get("gantry_tilt_deg") is None else float(meta["gantry_tilt_deg"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScanSource:
        _require(d, ("path", "format"), "source")
        known: dict[str, Any] = {k: (None if d.get(k) is None else str(d[k])) for k in cls.__dataclass_fields__}
        # absent (None) in files written before it was recorded
        known["gantry_tilt_deg"] = _optional_float(d.get("gantry_tilt_deg"), "source.gantry_tilt_deg")
        return cls(**known)


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
    # The best detections scoring BELOW the threshold (not findings: no mask, no label, no SEG segment), so a
    # reader sees what came closest; ids 1..M number this list only.
    below_threshold: list[NoduleFinding] = field(default_factory=list)
    # How the scan was put into the network's canonical orientation (nodulenet.io.orientation: input_code, method
    # "none" | "reindexed" | "resampled"); findings are on the scan's own grid either way. None: not recorded.
    orientation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        ids = sorted(f.id for f in self.findings)
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"finding ids must be 1..{len(ids)} (each once; they are the label-map values), got {ids}")
        below_ids = sorted(f.id for f in self.below_threshold)
        if below_ids != list(range(1, len(below_ids) + 1)):
            raise ValueError(f"below_threshold ids must be 1..{len(below_ids)}, got {below_ids}")
        shape = self.geometry.shape_zyx
        for f in [*self.findings, *self.below_threshold]:
            if any(f.box_zyx[3 + a] > shape[a] for a in range(3)):
                raise ValueError(f"finding {f.id}: box_zyx {f.box_zyx} reaches outside the scan grid {shape}")
            if f.mask is not None and not f.mask.fits(shape):
                raise ValueError(f"finding {f.id}: mask crop {f.mask.crop_box_zyx} reaches outside the scan "
                                 f"grid {shape}")
        self.threshold = _optional_float(self.threshold, "threshold")
        self.timings = {str(k): float(v) for k, v in self.timings.items()}

    def with_centre_slices(self, meta: Mapping[str, Any]) -> ScanFindings:
        """A copy in which every finding lacking ``centre_slice`` gets it, from this grid and the per-slice DICOM
        numbers of ``meta`` (the scan's ``Volume.meta``): results made anywhere carry the same slice references."""
        def fill(items: list[NoduleFinding]) -> list[NoduleFinding]:
            return [f if f.centre_slice is not None else
                    replace(f, centre_slice=slice_reference(self.geometry, meta, f.center_world_xyz_mm)) for f in items]

        return replace(self, findings=fill(self.findings), below_threshold=fill(self.below_threshold))

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
            "below_threshold": [f.to_dict() for f in sorted(self.below_threshold, key=lambda f: f.id)],
            "timings": dict(self.timings),
            **({} if self.orientation is None else {"orientation": dict(self.orientation)}),
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
        findings = _findings_list(d["findings"], "findings")
        below = _findings_list(d.get("below_threshold") or [], "below_threshold")
        try:
            geometry = Geometry.from_dict(d["geometry"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"geometry: {exc}") from None
        timings = d.get("timings") or {}
        if not isinstance(timings, Mapping):
            raise ValueError("'timings' must be an object of numbers")
        orientation = d.get("orientation")
        if orientation is not None and not isinstance(orientation, Mapping):
            raise ValueError("'orientation' must be an object")
        return cls(
            source=ScanSource.from_dict(d["source"]),
            geometry=geometry,
            findings=findings,
            model=ModelInfo.from_dict(d.get("model") or {}),
            threshold=d.get("threshold"),
            timings=dict(timings),
            nodulenet_version=str(d.get("nodulenet_version", "unknown")),
            created_utc=str(d.get("created_utc", "")),
            below_threshold=below,
            orientation=None if orientation is None else dict(orientation),
        )

    def write_json(self, path: str | Path) -> Path:
        """Write ``nodules.json`` atomically (a reader never sees half a file)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def read_json(cls, path: str | Path) -> ScanFindings:
        """Read ``nodules.json``; any problem is an :class:`InputError` naming the file."""
        return read_findings_json(path)


def _findings_list(items: Any, name: str) -> list[NoduleFinding]:
    if not isinstance(items, list):
        raise ValueError(f"'{name}' must be a list")
    findings = []
    for k, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"{name}[{k}] must be an object")
        try:
            findings.append(NoduleFinding.from_dict(item))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}[{k}]: {exc}") from None
    return findings


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
    with text_file_errors(path, expected="nodules.json"):
        text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    try:
        return ScanFindings.from_dict(obj)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(path, f"not a valid nodules.json: {exc}") from None


def _same_source(findings_json: Path, scan: Path) -> bool:
    try:
        source = json.loads(findings_json.read_text(encoding="utf-8")).get("source", {}).get("path", "")
    except (OSError, ValueError, AttributeError):
        return False
    try:
        return bool(source) and Path(source).resolve() == scan.resolve()
    except OSError:
        return False


def find_results_json(path: str | Path, scan: str | Path | None = None) -> Path:
    """``nodules.json`` of a results folder, of the file itself, or of the one scan folder inside a ``predict -o``
    folder (which holds one sub-folder per scan beside ``summary.json``).

    With several scan folders, the one whose ``nodules.json`` names ``scan`` as its source is chosen; without a
    match an :class:`InputError` lists them, so the user can name one.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if not path.is_dir():
        return path
    if (path / "nodules.json").is_file():
        return path / "nodules.json"
    inside = sorted(p / "nodules.json" for p in path.iterdir() if (p / "nodules.json").is_file())
    if len(inside) == 1:
        return inside[0]
    if not inside:
        raise InputError(path, "no nodules.json in this folder or its sub-folders (a complete predict output "
                               "folder has one per scan)")
    if scan is not None:
        matching = [j for j in inside if _same_source(j, Path(scan))]
        if len(matching) == 1:
            return matching[0]
    names = ", ".join(j.parent.name for j in inside[:8]) + (", ..." if len(inside) > 8 else "")
    raise InputError(path, f"holds the results of {len(inside)} scans ({names}): give one of these sub-folders"
                           + ("" if scan is None else f" (none is for {scan})"))

