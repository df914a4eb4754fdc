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

- Enhanced CT / multi-frame files: every frame is a slice, placed by its functional groups
  (:mod:`nodulenet.io.dicom_frames`); the same sorting, checks and HU conversion as single-frame slices.
- Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom with the pylibjpeg /
  pyjpegls plugins; a corrupt frame is one error naming the file (and frame).
- Gantry tilt (positions drifting sideways of the slice normal) is resampled onto an orthogonal grid
  (:mod:`nodulenet.io.dicom_tilt`), recorded in ``meta["gantry_tilt_deg"]`` and warned about.

A folder may hold several series (LIDC-IDRI ships localizers and XML beside the CT; a PACS export holds
scouts, dose reports, secondary captures and several reconstructions); without an explicit SeriesInstanceUID
the series a reader would pick is read (see :func:`choose_series`) and the choice is logged.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from nodulenet.errors import InputError
from nodulenet.io.dicom_frames import (
    LOCALIZER_IMAGE_TYPES,
    DicomSlice,
    decode_file,
    image_type,
    is_localizer,
    number_of_frames,
    slices_of_file,
)
from nodulenet.io.dicom_tilt import (
    AIR_HU,
    TILT_FIT_TOL_PIXELS,
    measure_tilt,
    resample_tilted,
    source_offsets_px,
)
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

# SOP classes of CT image volumes; anything else in a CT study (secondary captures, dose SRs, presentation
# states, key objects) is not a scan. A file without SOPClassUID is judged by its modality alone.
CT_VOLUME_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
})
# ImageType values and series descriptions of CT-class objects that are pictures of text, not anatomy:
# GE/Siemens/Philips dose reports and protocol pages, screen saves.
NOT_A_VOLUME_IMAGE_TYPES = frozenset({"SCREEN SAVE", "DOSE_INFO", "DOSE INFO", "DOSE REPORT", "CSA REPORT"})
NOT_A_VOLUME_DESCRIPTIONS = ("dose report", "dose info", "patient protocol", "screen save")
LOCALIZER_DESCRIPTIONS = ("scout", "localizer", "topogram", "surview")

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
    num_slices: int = 0  # images: files, or frames of multi-frame files
    slice_thickness_mm: float | None = None
    sop_class_uid: str = ""

    @property
    def is_localizer(self) -> bool:
        description = self.series_description.lower()
        return bool(LOCALIZER_IMAGE_TYPES.intersection(self.image_type)) or any(
            d in description for d in LOCALIZER_DESCRIPTIONS)

    @property
    def is_secondary_capture(self) -> bool:
        return self.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.7")

    @property
    def is_report(self) -> bool:
        """A dose report, protocol page or screen save: text rendered as an image, or a structured report."""
        description = self.series_description.lower()
        return (bool(NOT_A_VOLUME_IMAGE_TYPES.intersection(self.image_type))
                or any(d in description for d in NOT_A_VOLUME_DESCRIPTIONS)
                or self.modality in ("SR", "KO", "PR", "OT", "SC", "DOC"))

    @property
    def is_ct_volume(self) -> bool:
        """A CT series that can be a 3D scan: not a localizer/scout, secondary capture or report."""
        if self.modality != "CT" or self.is_localizer or self.is_secondary_capture or self.is_report:
            return False
        return not self.sop_class_uid or self.sop_class_uid in CT_VOLUME_SOP_CLASSES

    def summary(self) -> str:
        kind = "/".join(self.image_type) or "?"
        desc = f" '{self.series_description}'" if self.series_description else ""
        count = f"{self.num_files} files" if self.num_slices in (0, self.num_files) else \
            f"{self.num_slices} slices in {self.num_files} file(s)"
        thick = "" if self.slice_thickness_mm is None else f", {self.slice_thickness_mm:g} mm"
        return f"{self.series_instance_uid} ({self.modality or '?'}, {kind}, {count}{thick}{desc})"

    def to_dict(self) -> dict[str, Any]:
        """Every field in order but ``files`` (thousands, in a big series), then ``is_ct_volume``."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "files"}
        return {**record, "image_type": list(self.image_type), "is_ct_volume": self.is_ct_volume}


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


def _shared_attribute(ds: Dataset, keyword: str) -> Any:
    """``keyword`` at the top level, else inside a shared functional group of a multi-frame file (Enhanced CT
    keeps SliceThickness in PixelMeasuresSequence, KVP in CTXRayDetailsSequence, and a legacy conversion puts
    the rest in UnassignedSharedConvertedAttributesSequence)."""
    if keyword in ds:
        return ds.get(keyword)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        return None
    for element in shared[0]:
        if element.VR == "SQ" and element.value and keyword in element.value[0]:
            return element.value[0].get(keyword)
    return None


def _series_info(uid: str, members: list[tuple[Path, Dataset]]) -> DicomSeriesInfo:
    first = members[0][1]
    # A series can mix image types (a scout stored in the CT series); report the most common one.
    kind = Counter(image_type(ds) for _, ds in members).most_common(1)[0][0]
    number = first.get("SeriesNumber")
    thickness = _shared_attribute(first, "SliceThickness")
    try:
        thickness_mm = None if thickness in (None, "") else float(thickness)
    except (TypeError, ValueError):
        thickness_mm = None
    return DicomSeriesInfo(
        series_instance_uid=uid,
        modality=_text(first, "Modality").upper(),
        num_files=len(members),
        series_description=_text(first, "SeriesDescription"),
        image_type=kind,
        study_instance_uid=_text(first, "StudyInstanceUID"),
        patient_id=_text(first, "PatientID"),
        series_number=None if number in (None, "") else int(number),
        files=tuple(p for p, _ in members),
        num_slices=sum(number_of_frames(ds) for _, ds in members),
        slice_thickness_mm=thickness_mm,
        sop_class_uid=_text(first, "SOPClassUID"),
    )


def _reader_rank(info: DicomSeriesInfo) -> tuple[Any, ...]:
    """The series a radiologist would open first: a CT volume, the most slices, the thinnest slices."""
    thickness = info.slice_thickness_mm if info.slice_thickness_mm and info.slice_thickness_mm > 0 else math.inf
    return (not info.is_ct_volume, -info.num_slices, thickness, info.series_instance_uid)


def _infos(groups: dict[str, list[tuple[Path, Dataset]]]) -> list[DicomSeriesInfo]:
    return sorted((_series_info(uid, members) for uid, members in groups.items()), key=_reader_rank)


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """Every DICOM series under ``folder`` (searched recursively; non-DICOM files are ignored).

    Ordered as :func:`choose_series` ranks them: CT volumes first (not localizers/scouts, secondary captures or
    dose reports), then most slices, then thinnest slices. An empty list means no DICOM file was found.
    """
    return _infos(_scan_folder(_check_folder(folder)))


def choose_series(folder: Path, infos: list[DicomSeriesInfo], series_instance_uid: str | None = None) -> str:
    """The SeriesInstanceUID to read from ``infos`` (the series of ``folder``).

    ``series_instance_uid`` when given (it must be there); otherwise the CT series a reader would pick: CT
    modality and a CT image SOP class, not a localizer/scout, secondary capture or dose report/protocol page,
    then the most slices (frames count for multi-frame files), then the thinnest SliceThickness. The choice
    and the series passed over are logged (INFO), as is how to choose another.
    """
    if not infos:
        raise InputError(folder, "no DICOM files found (searched sub-folders too)")
    infos = sorted(infos, key=_reader_rank)
    found = "; ".join(i.summary() for i in infos)
    if series_instance_uid is not None:
        if series_instance_uid not in {i.series_instance_uid for i in infos}:
            raise InputError(folder, f"no series with SeriesInstanceUID {series_instance_uid}; found: {found}")
        return series_instance_uid
    ct = [i for i in infos if i.is_ct_volume]
    if not ct:
        raise InputError(folder, "no CT image series (localizers/scouts, secondary captures and dose reports "
                                 f"excluded); found: {found}")
    chosen = ct[0]
    if len(infos) > 1:
        others = "; ".join(i.summary() for i in infos if i is not chosen)
        logger.info("%s holds %d series; reading %s (the CT series with the most slices, then the thinnest); "
                    "passed over: %s. To read another: predict --series UID (inspect --series-uid UID).",
                    folder, len(infos), chosen.summary(), others)
    return chosen.series_instance_uid


# ---------------------------------------------------------------------------------------------- geometry


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


def _check_consistent(folder: Path, slices: list[DicomSlice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(folder, f"slices of different sizes in one series: {first.label} is "
                                     f"{first.rows}x{first.columns}, {s.label} is {s.rows}x{s.columns}")
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOL:
            raise InputError(folder, f"slices with different orientations in one series: {first.label} "
                                     f"{first.orientation.tolist()} vs {s.label} {s.orientation.tolist()}")
        if np.max(np.abs(s.pixel_spacing_rc - first.pixel_spacing_rc)) > 1e-4:
            raise InputError(folder, f"slices with different PixelSpacing in one series: {first.label} "
                                     f"{first.pixel_spacing_rc.tolist()} vs {s.label} {s.pixel_spacing_rc.tolist()}")


def _slice_step(folder: Path, slices: list[DicomSlice], offsets: np.ndarray, warnings: list[str]) -> float:
    """The z spacing from the sorted positions along the normal; rejects gaps, duplicates, disorder."""
    steps = np.diff(offsets)
    duplicates = np.flatnonzero(steps < DUPLICATE_POSITION_TOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise InputError(folder, f"two slices at the same position {offsets[i]:.3f} mm along the slice normal: "
                                 f"{slices[i].label} and {slices[i + 1].label} "
                                 f"({duplicates.size} duplicate(s) in the series); "
                                 "remove the duplicates or choose one acquisition")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > MISSING_SLICE_STEP_RATIO * median)
    if gaps.size:
        i = int(gaps[0])
        missing = round(steps[i] / median) - 1
        raise InputError(folder, f"missing slice(s): a gap of {steps[i]:.3f} mm between {slices[i].label} "
                                 f"(z = {slices[i].position_xyz[2]:.3f} mm) and {slices[i + 1].label} "
                                 f"(z = {slices[i + 1].position_xyz[2]:.3f} mm) where the series steps "
                                 f"{median:.3f} mm (about {max(missing, 1)} slice(s) missing, slice {i + 1} "
                                 f"of {len(slices)} in z order)")
    crowded = np.flatnonzero(steps < median / MISSING_SLICE_STEP_RATIO)
    if crowded.size:
        i = int(crowded[0])
        raise InputError(folder, f"irregular slice positions: a step of {steps[i]:.3f} mm between "
                                 f"{slices[i].label} and {slices[i + 1].label} where the series "
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


# ---------------------------------------------------------------------------------------------- pixels


def _decode(slices: list[DicomSlice]) -> list[np.ndarray]:
    """Stored values of ``slices`` (in their order); each file is decoded once, frame by frame."""
    wanted: dict[Path, dict[int | None, int]] = defaultdict(dict)
    for k, s in enumerate(slices):
        wanted[s.path][s.frame] = k
    out: list[np.ndarray | None] = [None] * len(slices)
    for path, frames in wanted.items():
        s = slices[next(iter(frames.values()))]
        total = number_of_frames(s.header)
        multi = s.frame is not None
        for number, frame in enumerate(decode_file(path, total, s.rows, s.columns, s.header), start=1):
            k = frames.get(number if multi else None)
            if k is not None:
                out[k] = frame
    return out  # type: ignore[return-value]


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

    ``series_instance_uid`` picks the series; without it :func:`choose_series` picks the one a reader would.
    The series may be single-frame slices or multi-frame (Enhanced CT) file(s), in any transfer syntax pydicom
    decodes with the pylibjpeg/pyjpegls plugins. Raises :class:`InputError` for anything that would give a wrong
    volume: no DICOM, no CT, missing or duplicated slices, mixed sizes/orientations, undecodable pixels, an
    irregular sideways drift. A regular gantry tilt is resampled (module doc). See the module doc for conventions.

    ``meta`` (JSON-ready) holds ``source_path``, ``format`` ("dicom"), the series/study/patient/equipment
    attributes a DICOM SEG/SR writer needs (``series_instance_uid``, ``study_instance_uid``,
    ``frame_of_reference_uid``, ``sop_class_uid``, ``patient_id``, ``patient_name``, ``study_date``,
    ``manufacturer``, ... see ``_SERIES_ATTRIBUTES``; None where the tag is absent), and per slice in the
    array's z order: ``sop_instance_uids``, ``slice_positions_mm`` (world z of ImagePositionPatient),
    ``instance_numbers`` and ``slice_locations_mm`` (InstanceNumber / SliceLocation as written, None where
    absent), ``source_files`` and ``frame_numbers`` (None for a single-frame file).

    For a multi-frame file every slice is one frame: ``source_files`` and ``sop_instance_uids`` repeat the one
    file and its SOPInstanceUID, ``frame_numbers`` are the 1-based frame numbers in the file, and
    ``instance_numbers`` are those frame numbers too (1..N, what a PACS viewer shows as the image number of a
    multi-frame object); ``slice_locations_mm`` come from the per-frame SliceLocation a legacy conversion keeps
    (None otherwise).

    Also ``image_type``, ``multi_frame``, ``transfer_syntax_uid``, ``padding_hu`` (PixelPaddingValue in HU, or
    None), ``gantry_tilt_deg`` (angle between the slice step and the slice normal; 0 for none),
    ``gantry_tilt_resampled`` (True when the slices were shifted onto an orthogonal grid; then
    ``gantry_tilt_source_offsets_rc_px`` says where each source slice's first pixel lies on it), ``other_series``
    (the folder's other series, as :meth:`DicomSeriesInfo.to_dict`) and ``warnings`` (what was tolerated or
    corrected: uneven spacing, gantry tilt).
    """
    folder = _check_folder(folder)
    groups = _scan_folder(folder)
    infos = _infos(groups)
    uid = choose_series(folder, infos, series_instance_uid)
    members = groups[uid]
    info = next(i for i in infos if i.series_instance_uid == uid)
    if info.modality != "CT":
        raise InputError(folder, f"series {info.summary()} has modality {info.modality or 'unknown'}; "
                                 "NoduleNet reads CT only")
    images = [(p, ds) for p, ds in members if not LOCALIZER_IMAGE_TYPES.intersection(image_type(ds))]
    slices = [s for p, ds in images for s in slices_of_file(p, ds)]
    n_all = sum(number_of_frames(ds) for _, ds in members)
    slices = [s for s in slices if not is_localizer(s)]
    if len(slices) < n_all:
        logger.info("%s: ignoring %d localizer/scout image(s) in series %s", folder, n_all - len(slices), uid)
    if len(slices) < 2:
        raise InputError(folder, f"series {info.summary()} has {len(slices)} axial image(s); a CT volume needs "
                                 "at least 2 slices (localizers/scouts are not volumes)")

    _check_consistent(folder, slices)
    direction = _direction_columns(slices[0].orientation, slices[0].path)
    normal = direction[:, 2]
    order = np.argsort([float(s.position_xyz @ normal) for s in slices], kind="stable")
    slices = [slices[i] for i in order]
    offsets = np.asarray([float(s.position_xyz @ normal) for s in slices])
    warnings: list[str] = []
    dz = _slice_step(folder, slices, offsets, warnings)
    spacing_rc = slices[0].pixel_spacing_rc
    tilt = measure_tilt(np.stack([s.position_xyz for s in slices]), direction, spacing_rc)
    if tilt.needs_resampling and tilt.fit_residual_px > TILT_FIT_TOL_PIXELS:
        raise InputError(folder, f"slice positions drift up to {tilt.drift_mm:.2f} mm sideways of the slice normal, "
                                 f"and not in proportion to the position along it (off by up to "
                                 f"{tilt.fit_residual_px:.1f} pixels from one gantry tilt): not a regular grid")

    header = slices[0].header
    padding_hu = _padding_hu(header, slices[0].slope, slices[0].intercept)
    array = _to_hu(_decode(slices), [(s.slope, s.intercept) for s in slices])
    origin = slices[0].position_xyz.copy()
    if tilt.needs_resampling:
        fill = padding_hu if padding_hu is not None else AIR_HU
        array, (low_r, low_c) = resample_tilted(list(array), tilt, fill, array.dtype)
        origin = origin + low_r * spacing_rc[0] * direction[:, 1] + low_c * spacing_rc[1] * direction[:, 0]
        message = (f"{folder}: gantry tilt of {tilt.angle_deg:.2f} degrees (slices drift {tilt.drift_mm:.1f} mm "
                   "sideways of the slice normal); resampled onto an orthogonal grid (linear interpolation "
                   f"in-plane, {array.shape[1]}x{array.shape[2]} pixels)")
        logger.warning(message)
        warnings.append(message)

    meta: dict[str, Any] = {"source_path": str(folder), "format": "dicom"}
    for key, keyword in _SERIES_ATTRIBUTES:
        meta[key] = _meta_value(_shared_attribute(header, keyword))
    meta["modality"] = info.modality
    meta["image_type"] = list(image_type(header))
    meta["multi_frame"] = any(s.frame is not None for s in slices)
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    meta["transfer_syntax_uid"] = None if syntax is None else str(syntax)
    meta["sop_instance_uids"] = [s.sop_instance_uid for s in slices]
    meta["slice_positions_mm"] = [float(s.position_xyz[2]) for s in slices]
    # What a PACS shows for each slice (readers navigate by these, not by array index); None where absent.
    meta["instance_numbers"] = [s.instance_number for s in slices]
    meta["slice_locations_mm"] = [s.slice_location_mm for s in slices]
    meta["source_files"] = [str(s.path) for s in slices]
    meta["frame_numbers"] = [s.frame for s in slices]
    meta["padding_hu"] = padding_hu
    meta["gantry_tilt_deg"] = round(tilt.angle_deg, 3) if tilt.needs_resampling else 0.0
    meta["gantry_tilt_resampled"] = tilt.needs_resampling
    if tilt.needs_resampling:  # where each source slice lies on the corrected grid: a SEG maps its labels back
        meta["gantry_tilt_source_offsets_rc_px"] = [[float(r), float(c)] for r, c in source_offsets_px(tilt)]
    meta["other_series"] = [i.to_dict() for i in infos if i.series_instance_uid != uid]
    meta["warnings"] = warnings
    spacing_zyx = (dz, float(spacing_rc[0]), float(spacing_rc[1]))
    return Volume(
        array=array,
        spacing_zyx=spacing_zyx,
        origin_xyz_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(direction.reshape(-1)),
        meta=meta,
    )
