"""Read a CT series from a folder of DICOM files into a :class:`~nodulenet.io.volume.Volume`.

Conventions (see DESIGN.md):

- The array is ``(z, y, x)``: slice, row, column. Slices are ordered by their position along the slice
  normal (the cross product of the two ImageOrientationPatient cosines), never by file name or
  InstanceNumber, which are arbitrary in many archives (LIDC-IDRI files are shuffled).
- Values are Hounsfield units, ``stored * RescaleSlope + RescaleIntercept`` applied per slice. The
  array is **int16** when that is exact (integer slope/intercept and every value fits in int16, the usual
  CT case) and **float32** otherwise (still exact for integer HU from 16-bit data).
  Padding values (-2048/-3024 HU and the like) are kept as stored.
- Geometry: ``origin_xyz_mm`` = ImagePositionPatient of the first slice in sorted order; direction
  columns = (row cosine, column cosine, normal) in world LPS ``(x, y, z)``; the slice step comes from
  the positions (the mean step), not from SliceThickness.

A folder may hold several series (LIDC-IDRI ships localizers and XML beside the CT); without an explicit
SeriesInstanceUID the largest CT series that is not a LOCALIZER/SCOUT is read, and the choice is logged.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array as decode_pixel_array

from nodulenet.errors import InputError
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT"})

# A step larger than this multiple of the median step means slices are missing; the usual tools
# (ITK, dcm2niix) use thresholds in this range, and no clinical protocol skips positions on purpose.
MISSING_SLICE_STEP_RATIO = 1.5
# Positions closer than this (mm) are the same slice stored twice.
DUPLICATE_POSITION_TOL_MM = 0.01
# Step differences below this (mm) are rounding of the DS strings (6 decimals), not uneven spacing.
UNEVEN_STEP_TOL_MM = 0.01
# Orientation cosines written by different slices of one series agree to DS rounding.
ORIENTATION_TOL = 1e-4

# meta key -> DICOM keyword: study/patient/equipment attributes that a DICOM SEG/SR writer needs to
# place its objects in the same study and frame of reference, plus a few a user wants to see.
_SERIES_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("modality", "Modality"),
    ("series_instance_uid", "SeriesInstanceUID"),
    ("series_number", "SeriesNumber"),
    ("series_description", "SeriesDescription"),
    ("study_instance_uid", "StudyInstanceUID"),
    ("study_date", "StudyDate"),
    ("study_time", "StudyTime"),
    ("study_id", "StudyID"),
    ("study_description", "StudyDescription"),
    ("accession_number", "AccessionNumber"),
    ("referring_physician_name", "ReferringPhysicianName"),
    ("patient_id", "PatientID"),
    ("patient_name", "PatientName"),
    ("patient_birth_date", "PatientBirthDate"),
    ("patient_sex", "PatientSex"),
    ("frame_of_reference_uid", "FrameOfReferenceUID"),
    ("sop_class_uid", "SOPClassUID"),
    ("manufacturer", "Manufacturer"),
    ("manufacturer_model_name", "ManufacturerModelName"),
    ("body_part_examined", "BodyPartExamined"),
    ("convolution_kernel", "ConvolutionKernel"),
    ("slice_thickness_mm", "SliceThickness"),
    ("kvp", "KVP"),
)


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series found in a folder (from headers only; pixel data is not read)."""

    series_instance_uid: str
    modality: str
    num_files: int
    series_description: str
    image_type: tuple[str, ...]
    study_instance_uid: str
    patient_id: str
    series_number: int | None
    files: tuple[Path, ...] = field(repr=False)

    @property
    def is_localizer(self) -> bool:
        return bool(LOCALIZER_IMAGE_TYPES.intersection(self.image_type))

    @property
    def is_ct_volume(self) -> bool:
        """A CT series that can be a 3D scan (not a localizer/scout)."""
        return self.modality == "CT" and not self.is_localizer

    def summary(self) -> str:
        kind = "/".join(self.image_type) or "?"
        desc = f" '{self.series_description}'" if self.series_description else ""
        return f"{self.series_instance_uid} ({self.modality or '?'}, {kind}, {self.num_files} files{desc})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "num_files": self.num_files,
            "series_description": self.series_description,
            "image_type": list(self.image_type),
            "study_instance_uid": self.study_instance_uid,
            "patient_id": self.patient_id,
            "series_number": self.series_number,
        }


# ---------------------------------------------------------------------------------------------- scanning


def _check_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.exists():
        raise InputError(path, "folder does not exist")
    if not path.is_dir():
        raise InputError(path, "is a file; a DICOM series is read from its folder")
    return path


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None for a file that is not DICOM (LIDC XML, notes, thumbnails)."""
    try:
        # force=False: a file without the DICM preamble is not DICOM; stop_before_pixels keeps it fast.
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as exc:  # noqa: BLE001 - a corrupt header must not stop the scan of the folder
        logger.warning("skipping %s: unreadable DICOM header (%s)", path, exc)
        return None


def _scan_folder(folder: Path) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers of every DICOM image under ``folder`` (recursively), grouped by SeriesInstanceUID."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if not path.is_file():
                continue
            header = _read_header(path)
            # DICOMDIR and other non-image objects have no series; they are not slices.
            uid = None if header is None else header.get("SeriesInstanceUID")
            if header is not None and uid:
                groups[str(uid)].append((path, header))
    return dict(groups)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _image_type(ds: Dataset) -> tuple[str, ...]:
    value = ds.get("ImageType")
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)


def _series_info(uid: str, members: list[tuple[Path, Dataset]]) -> DicomSeriesInfo:
    first = members[0][1]
    # A series can mix image types (a scout stored in the CT series); report the most common one.
    image_type = Counter(_image_type(ds) for _, ds in members).most_common(1)[0][0]
    number = first.get("SeriesNumber")
    return DicomSeriesInfo(
        series_instance_uid=uid,
        modality=_text(first, "Modality").upper(),
        num_files=len(members),
        series_description=_text(first, "SeriesDescription"),
        image_type=image_type,
        study_instance_uid=_text(first, "StudyInstanceUID"),
        patient_id=_text(first, "PatientID"),
        series_number=None if number in (None, "") else int(number),
        files=tuple(p for p, _ in members),
    )


def _infos(groups: dict[str, list[tuple[Path, Dataset]]]) -> list[DicomSeriesInfo]:
    infos = [_series_info(uid, members) for uid, members in groups.items()]
    # Most likely the scan a user wants first: CT volumes, then by size.
    return sorted(infos, key=lambda i: (not i.is_ct_volume, -i.num_files, i.series_instance_uid))


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """Every DICOM series under ``folder`` (searched recursively; non-DICOM files are ignored).

    Ordered CT volumes first, then by number of files. An empty list means no DICOM file was found.
    """
    return _infos(_scan_folder(_check_folder(folder)))


def _choose_series(
    folder: Path, groups: dict[str, list[tuple[Path, Dataset]]], series_instance_uid: str | None
) -> str:
    if not groups:
        raise InputError(folder, "no DICOM files found (searched sub-folders too)")
    infos = _infos(groups)
    found = "; ".join(i.summary() for i in infos)
    if series_instance_uid is not None:
        if series_instance_uid not in groups:
            raise InputError(folder, f"no series with SeriesInstanceUID {series_instance_uid}; found: {found}")
        return series_instance_uid
    ct = [i for i in infos if i.is_ct_volume]
    if not ct:
        raise InputError(folder, f"no CT image series (localizers/scouts excluded); found: {found}")
    chosen = ct[0]
    if len(ct) > 1:
        others = "; ".join(i.summary() for i in ct[1:])
        logger.warning(
            "%s holds %d CT series; reading the largest, %s (others: %s). Pass a SeriesInstanceUID to choose.",
            folder, len(ct), chosen.summary(), others,
        )
    return chosen.series_instance_uid


# ---------------------------------------------------------------------------------------------- geometry


def _floats(ds: Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InputError(path, f"missing or invalid {keyword} (needs {count} numbers, got {value!r})")
    return arr


@dataclass(frozen=True)
class _Slice:
    path: Path
    header: Dataset
    position_xyz: np.ndarray
    orientation: np.ndarray  # 6 cosines
    pixel_spacing_rc: np.ndarray  # (row spacing = y, column spacing = x)
    rows: int
    columns: int


def _slice_of(path: Path, ds: Dataset) -> _Slice:
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames, enhanced CT) is not supported; "
                               "convert it to single-frame slices or NIfTI first")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise InputError(path, "colour DICOM image; a CT slice has one sample per pixel")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise InputError(path, "missing Rows/Columns")
    return _Slice(
        path=path,
        header=ds,
        position_xyz=_floats(ds, "ImagePositionPatient", 3, path),
        orientation=_floats(ds, "ImageOrientationPatient", 6, path),
        pixel_spacing_rc=_floats(ds, "PixelSpacing", 2, path),
        rows=int(rows),
        columns=int(columns),
    )


def _direction_columns(orientation: np.ndarray, path: Path) -> np.ndarray:
    """3x3 matrix whose columns are the world directions of the column, row and slice index axes."""
    row_cos = orientation[:3] / np.linalg.norm(orientation[:3])
    col_cos = orientation[3:] / np.linalg.norm(orientation[3:])
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise InputError(path, f"ImageOrientationPatient {orientation.tolist()} is not two perpendicular directions")
    # DS strings carry ~6 decimals, so re-orthogonalise to give Geometry an exactly orthonormal matrix.
    col_cos = col_cos - (col_cos @ row_cos) * row_cos
    col_cos /= np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    return np.stack([row_cos, col_cos, normal], axis=1)


def _check_consistent(folder: Path, slices: list[_Slice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(folder, f"slices of different sizes in one series: {first.path.name} is "
                                     f"{first.rows}x{first.columns}, {s.path.name} is {s.rows}x{s.columns}")
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOL:
            raise InputError(folder, f"slices with different orientations in one series: {first.path.name} "
                                     f"{first.orientation.tolist()} vs {s.path.name} {s.orientation.tolist()}")
        if np.max(np.abs(s.pixel_spacing_rc - first.pixel_spacing_rc)) > 1e-4:
            raise InputError(folder, f"slices with different PixelSpacing in one series: {first.path.name} "
                                     f"{first.pixel_spacing_rc.tolist()} vs {s.path.name} {s.pixel_spacing_rc.tolist()}")


def _slice_step(folder: Path, slices: list[_Slice], offsets: np.ndarray, warnings: list[str]) -> float:
    """The z spacing from the sorted positions along the normal; rejects gaps, duplicates, disorder."""
    steps = np.diff(offsets)
    duplicates = np.flatnonzero(steps < DUPLICATE_POSITION_TOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise InputError(folder, f"two slices at the same position {offsets[i]:.3f} mm along the slice normal: "
                                 f"{slices[i].path.name} and {slices[i + 1].path.name} "
                                 f"({duplicates.size} duplicate(s) in the series); "
                                 "remove the duplicates or choose one acquisition")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > MISSING_SLICE_STEP_RATIO * median)
    if gaps.size:
        i = int(gaps[0])
        missing = round(steps[i] / median) - 1
        raise InputError(folder, f"missing slice(s): a gap of {steps[i]:.3f} mm between {slices[i].path.name} "
                                 f"(z = {slices[i].position_xyz[2]:.3f} mm) and {slices[i + 1].path.name} "
                                 f"(z = {slices[i + 1].position_xyz[2]:.3f} mm) where the series steps "
                                 f"{median:.3f} mm (about {max(missing, 1)} slice(s) missing, slice {i + 1} "
                                 f"of {len(slices)} in z order)")
    crowded = np.flatnonzero(steps < median / MISSING_SLICE_STEP_RATIO)
    if crowded.size:
        i = int(crowded[0])
        raise InputError(folder, f"irregular slice positions: a step of {steps[i]:.3f} mm between "
                                 f"{slices[i].path.name} and {slices[i + 1].path.name} where the series "
                                 f"steps {median:.3f} mm (two interleaved series?)")
    mean = float((offsets[-1] - offsets[0]) / (len(offsets) - 1))
    if float(steps.max() - steps.min()) > UNEVEN_STEP_TOL_MM:
        message = (f"{folder}: uneven slice spacing (steps {steps.min():.4f} to {steps.max():.4f} mm); "
                   f"using the mean step {mean:.4f} mm, so slices may sit up to "
                   f"{float(np.max(np.abs(offsets - offsets[0] - mean * np.arange(len(offsets))))):.3f} mm "
                   "from their stored position")
        logger.warning(message)
        warnings.append(message)
    return mean


def _check_no_shear(folder: Path, slices: list[_Slice], normal: np.ndarray) -> None:
    """Positions must move along the normal; a sideways drift (gantry tilt) is a sheared grid that an
    origin/spacing/direction geometry cannot represent, and ignoring it misplaces nodules."""
    rel = np.stack([s.position_xyz for s in slices]) - slices[0].position_xyz
    sideways = rel - np.outer(rel @ normal, normal)
    drift = float(np.max(np.linalg.norm(sideways, axis=1)))
    if drift > 0.5 * float(np.min(slices[0].pixel_spacing_rc)):
        raise InputError(folder, f"slice positions drift {drift:.2f} mm sideways of the slice normal (gantry tilt?); "
                                 "a sheared series is not supported, resample it to an orthogonal grid first")


# ---------------------------------------------------------------------------------------------- pixels


def _decode_slice(path: Path) -> tuple[np.ndarray, bool]:
    """Stored values of one slice and whether they are already rescaled to HU.

    pydicom decodes uncompressed and RLE/JPEG-2000 data itself; for what it cannot (JPEG lossless and
    JPEG-LS without extra plugins) SimpleITK's built-in GDCM decodes, and GDCM applies the rescale.
    """
    try:
        return decode_pixel_array(path), False
    except Exception as pydicom_error:  # noqa: BLE001 - fall back, then report both causes
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = getattr(header.file_meta, "TransferSyntaxUID", None)
            name = getattr(syntax, "name", syntax)
            raise InputError(path, f"cannot decode the pixel data (transfer syntax {name}; a truncated file or an "
                                   f"unsupported compression): {pydicom_error}") from None
        return sitk.GetArrayFromImage(image).reshape(image.GetHeight(), image.GetWidth()), True


def _padding_hu(ds: Dataset, slope: float, intercept: float) -> float | None:
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    stored = int(value)
    bits = int(ds.get("BitsAllocated") or 16)
    # The tag is written as US even for signed pixels; reinterpret it with the pixels' signedness.
    if int(ds.get("PixelRepresentation") or 0) == 1 and stored >= 2 ** (bits - 1):
        stored -= 2**bits
    return stored * slope + intercept


def _to_hu(raw_slices: list[np.ndarray], rescale: list[tuple[float, float]]) -> np.ndarray:
    """Stack slices as HU, int16 when exact, float32 otherwise (see module doc). Frees ``raw_slices``."""
    integral = all(float(s).is_integer() and float(b).is_integer() for s, b in rescale) and all(
        np.issubdtype(r.dtype, np.integer) for r in raw_slices
    )
    if integral:
        lo = min(int(r.min()) * int(s) + int(b) if s >= 0 else int(r.max()) * int(s) + int(b)
                 for r, (s, b) in zip(raw_slices, rescale))
        hi = max(int(r.max()) * int(s) + int(b) if s >= 0 else int(r.min()) * int(s) + int(b)
                 for r, (s, b) in zip(raw_slices, rescale))
        integral = np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max
    dtype = np.int16 if integral else np.float32
    out = np.empty((len(raw_slices), *raw_slices[0].shape), dtype=dtype)
    for k, (slope, intercept) in enumerate(rescale):
        raw = raw_slices[k]
        if integral:
            out[k] = raw.astype(np.int32) * int(slope) + int(intercept)
        else:
            out[k] = raw.astype(np.float64) * slope + intercept
        raw_slices[k] = None  # type: ignore[call-overload]  # release memory as we go
    return out


def _meta_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, MultiValue):
        return [_meta_value(v) for v in value]
    if isinstance(value, (float, Decimal)):  # DS values (DSfloat / DSdecimal)
        return float(value)
    if isinstance(value, int):  # IS values
        return int(value)
    return str(value).strip()


# ---------------------------------------------------------------------------------------------- reading


def read_dicom_series(folder: str | Path, series_instance_uid: str | None = None) -> Volume:
    """Read one CT series from ``folder`` (searched recursively) as HU with its geometry.

    ``series_instance_uid`` picks the series; without it the largest non-localizer CT series is read.
    Raises :class:`InputError` for anything that would give a wrong volume: no DICOM, no CT, missing or
    duplicated slices, mixed sizes/orientations, undecodable pixels. See the module doc for conventions.

    ``meta`` (JSON-ready) holds ``source_path``, ``format`` ("dicom"), the series/study/patient/equipment
    attributes a DICOM SEG/SR writer needs (``series_instance_uid``, ``study_instance_uid``,
    ``frame_of_reference_uid``, ``sop_class_uid``, ``patient_id``, ``patient_name``, ``study_date``,
    ``manufacturer``, ... see ``_SERIES_ATTRIBUTES``; None where the tag is absent), and per slice in the
    array's z order: ``sop_instance_uids``, ``slice_positions_mm`` (world z of ImagePositionPatient),
    ``instance_numbers`` and ``slice_locations_mm`` (InstanceNumber / SliceLocation as written, None where
    absent), ``source_files``. Also ``image_type``, ``padding_hu`` (PixelPaddingValue in HU, or None) and
    ``warnings`` (what was tolerated, e.g. uneven spacing).
    """
    folder = _check_folder(folder)
    groups = _scan_folder(folder)
    uid = _choose_series(folder, groups, series_instance_uid)
    members = groups[uid]
    info = _series_info(uid, members)
    if info.modality != "CT":
        raise InputError(folder, f"series {info.summary()} has modality {info.modality or 'unknown'}; "
                                 "NoduleNet reads CT only")
    images = [(p, ds) for p, ds in members if not LOCALIZER_IMAGE_TYPES.intersection(_image_type(ds))]
    if len(images) < len(members):
        logger.info("%s: ignoring %d localizer/scout image(s) in series %s", folder, len(members) - len(images), uid)
    if len(images) < 2:
        raise InputError(folder, f"series {info.summary()} has {len(images)} axial image(s); a CT volume needs "
                                 "at least 2 slices (localizers/scouts are not volumes)")

    slices = [_slice_of(p, ds) for p, ds in images]
    _check_consistent(folder, slices)
    direction = _direction_columns(slices[0].orientation, slices[0].path)
    normal = direction[:, 2]
    order = np.argsort([float(s.position_xyz @ normal) for s in slices], kind="stable")
    slices = [slices[i] for i in order]
    offsets = np.asarray([float(s.position_xyz @ normal) for s in slices])
    warnings: list[str] = []
    dz = _slice_step(folder, slices, offsets, warnings)
    _check_no_shear(folder, slices, normal)

    raw_slices: list[np.ndarray] = []
    rescale: list[tuple[float, float]] = []
    for s in slices:
        raw, already_hu = _decode_slice(s.path)
        if raw.shape != (s.rows, s.columns):
            raise InputError(s.path, f"pixel data is {raw.shape}, header says {s.rows}x{s.columns}")
        raw_slices.append(raw)
        slope = 1.0 if already_hu else float(s.header.get("RescaleSlope", 1.0) or 1.0)
        intercept = 0.0 if already_hu else float(s.header.get("RescaleIntercept", 0.0) or 0.0)
        rescale.append((slope, intercept))
    first_slope = float(slices[0].header.get("RescaleSlope", 1.0) or 1.0)
    first_intercept = float(slices[0].header.get("RescaleIntercept", 0.0) or 0.0)
    array = _to_hu(raw_slices, rescale)

    header = slices[0].header
    meta: dict[str, Any] = {"source_path": str(folder), "format": "dicom"}
    for key, keyword in _SERIES_ATTRIBUTES:
        meta[key] = _meta_value(header.get(keyword))
    meta["modality"] = info.modality
    meta["image_type"] = list(_image_type(header))
    meta["sop_instance_uids"] = [str(s.header.get("SOPInstanceUID", "")) for s in slices]
    meta["slice_positions_mm"] = [float(s.position_xyz[2]) for s in slices]
    # What a PACS shows for each slice (readers navigate by these, not by array index); None where absent.
    meta["instance_numbers"] = [_meta_value(s.header.get("InstanceNumber")) for s in slices]
    meta["slice_locations_mm"] = [_meta_value(s.header.get("SliceLocation")) for s in slices]
    meta["source_files"] = [str(s.path) for s in slices]
    meta["padding_hu"] = _padding_hu(header, first_slope, first_intercept)
    meta["warnings"] = warnings
    origin = slices[0].position_xyz
    spacing_zyx = (dz, float(slices[0].pixel_spacing_rc[0]), float(slices[0].pixel_spacing_rc[1]))
    return Volume(
        array=array,
        spacing_zyx=spacing_zyx,
        origin_xyz_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(direction.reshape(-1)),
        meta=meta,
    )
