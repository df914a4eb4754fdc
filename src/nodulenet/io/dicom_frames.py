"""The 2D images of a DICOM series: one per single-frame file (classic CT) or one per frame of a multi-frame
file (Enhanced CT, Legacy Converted Enhanced CT), each with its own position, orientation, pixel spacing and
rescale, and the decoding of their pixels (uncompressed or any compressed transfer syntax).

A multi-frame file keeps per-frame attributes in functional groups (DICOM PS3.3 C.7.6.16): each frame's
item of the PerFrameFunctionalGroupsSequence, else the one SharedFunctionalGroupsSequence item, holds
PlanePositionSequence > ImagePositionPatient, PlaneOrientationSequence > ImageOrientationPatient,
PixelMeasuresSequence > PixelSpacing / SliceThickness and PixelValueTransformationSequence > RescaleSlope /
RescaleIntercept. Read here with pydicom, the same library as the classic slices, so both kinds of series go
through one sorting, checking and HU path in :mod:`nodulenet.io.dicom`.

Compressed pixel data (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's
pixel handlers with the pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle and pyjpegls plugins
(core dependencies of nodulenet).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from nodulenet.errors import InputError

LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT"})


@dataclass(frozen=True)
class DicomSlice:
    """One 2D image of a series: a single-frame file, or frame ``frame`` (1-based) of a multi-frame file."""

    path: Path
    header: Dataset  # the file's header (without pixel data), shared by all frames of a multi-frame file
    position_xyz: np.ndarray
    orientation: np.ndarray  # 6 cosines: row direction, column direction
    pixel_spacing_rc: np.ndarray  # (row spacing = y, column spacing = x)
    rows: int
    columns: int
    slope: float
    intercept: float
    frame: int | None = None  # None: a single-frame file
    instance_number: int | None = None  # InstanceNumber; for a frame: its frame number (what a PACS shows)
    slice_location_mm: float | None = None
    image_type: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How an error message names this image: the file name, plus the frame for a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))


def number_of_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def image_type(ds: Dataset, keyword: str = "ImageType") -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)


def floats(ds: Dataset, keyword: str, count: int, path: Path, where: str = "") -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InputError(path, f"missing or invalid {keyword}{where} (needs {count} numbers, got {value!r})")
    return arr


def _number(value: Any, kind: type = float) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = _number(ds.get("RescaleSlope"))
    intercept = _number(ds.get("RescaleIntercept"))
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _check_image_header(path: Path, ds: Dataset) -> tuple[int, int]:
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise InputError(path, "colour DICOM image; a CT slice has one sample per pixel")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise InputError(path, "missing Rows/Columns")
    return int(rows), int(columns)


def _single_frame_slice(path: Path, ds: Dataset) -> DicomSlice:
    rows, columns = _check_image_header(path, ds)
    slope, intercept = _rescale(ds)
    return DicomSlice(
        path=path, header=ds, rows=rows, columns=columns, slope=slope, intercept=intercept,
        position_xyz=floats(ds, "ImagePositionPatient", 3, path),
        orientation=floats(ds, "ImageOrientationPatient", 6, path),
        pixel_spacing_rc=floats(ds, "PixelSpacing", 2, path),
        instance_number=_number(ds.get("InstanceNumber"), int),
        slice_location_mm=_number(ds.get("SliceLocation")),
        image_type=image_type(ds),
    )


def _group_item(frame_groups: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` for one frame: its own, else the shared one."""
    for groups in (frame_groups, shared):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            return groups[sequence].value[0]
    return None


def _frame_slices(path: Path, ds: Dataset, frames: int) -> list[DicomSlice]:
    rows, columns = _check_image_header(path, ds)
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise InputError(path, f"multi-frame DICOM with {frames} frames but "
                               f"{0 if per_frame is None else len(per_frame)} PerFrameFunctionalGroupsSequence "
                               "items; its frames cannot be placed")
    file_type = image_type(ds)
    out: list[DicomSlice] = []
    for k, groups in enumerate(per_frame):
        where = f" (frame {k + 1} of {frames})"
        position = _group_item(groups, shared, "PlanePositionSequence")
        orientation = _group_item(groups, shared, "PlaneOrientationSequence")
        measures = _group_item(groups, shared, "PixelMeasuresSequence")
        for name, item in (("PlanePositionSequence", position), ("PlaneOrientationSequence", orientation),
                           ("PixelMeasuresSequence", measures)):
            if item is None:
                raise InputError(path, f"multi-frame DICOM without {name}{where}; its frames cannot be placed")
        transform = _group_item(groups, shared, "PixelValueTransformationSequence")
        # Legacy files converted to multi-frame may keep Rescale at the top level instead.
        slope, intercept = _rescale(transform if transform is not None else ds)
        frame_type_item = _group_item(groups, shared, "CTImageFrameTypeSequence")
        frame_type = image_type(frame_type_item, "FrameType") if frame_type_item is not None else file_type
        unassigned = _group_item(groups, None, "UnassignedPerFrameConvertedAttributesSequence")
        location = None if unassigned is None else _number(unassigned.get("SliceLocation"))
        out.append(DicomSlice(
            path=path, header=ds, rows=rows, columns=columns, slope=slope, intercept=intercept, frame=k + 1,
            position_xyz=floats(position, "ImagePositionPatient", 3, path, where),
            orientation=floats(orientation, "ImageOrientationPatient", 6, path, where),
            pixel_spacing_rc=floats(measures, "PixelSpacing", 2, path, where),
            instance_number=k + 1, slice_location_mm=location, image_type=frame_type,
        ))
    return out


def slices_of_file(path: Path, ds: Dataset) -> list[DicomSlice]:
    """The images of one DICOM file (its header, read without pixel data): one, or one per frame."""
    frames = number_of_frames(ds)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [_single_frame_slice(path, ds)]
    return _frame_slices(path, ds, frames)


def is_localizer(s: DicomSlice) -> bool:
    return bool(LOCALIZER_IMAGE_TYPES.intersection(s.image_type))


# ---------------------------------------------------------------------------------------------- pixels


def _transfer_syntax_name(path: Path) -> str:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        syntax = header.file_meta.TransferSyntaxUID
        return f"{syntax.name} ({syntax})" if getattr(syntax, "name", None) else str(syntax)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "unknown"


def _decode_error(path: Path, what: str, exc: Exception) -> InputError:
    # pydicom lists each plugin's reason on its own line: keep them, on one line (the CLI prints one line).
    lines = [line.strip(" :") for line in str(exc).splitlines() if line.strip(" :")]
    reason = "; ".join(lines) if lines else type(exc).__name__
    if len(reason) > 400:
        reason = reason[:400] + "..."
    return InputError(path, f"cannot decode the pixel data of {what} (transfer syntax {_transfer_syntax_name(path)}; "
                            f"a truncated file or corrupt compressed data): {reason}")


# JPEG-LS Lossless / Near-Lossless. pydicom tries pylibjpeg(-libjpeg) first; pyjpegls (CharLS) decodes the
# same frames 3.9x faster (LIDC-IDRI-0001 as Enhanced CT JPEG-LS: 0.63 s vs 2.43 s CPU for 133 frames).
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})


def _decoding_plugin(header: Dataset) -> str:
    syntax = str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax in JPEG_LS_SYNTAXES:
        try:
            import jpeg_ls  # noqa: F401 - pyjpegls, a core dependency; without it pydicom picks what it has
        except ImportError:
            return ""
        return "pyjpegls"
    return ""


def decode_file(path: Path, frames: int, rows: int, columns: int,
                header: Dataset | None = None) -> Iterator[np.ndarray]:
    """The stored values of every frame of ``path``, in file order (no rescale applied).

    Frame by frame (pydicom's ``iter_pixels``), so a corrupt frame is named and memory stays at one frame.
    ``header`` (the file's, without pixels) lets the fastest decoder be chosen for its transfer syntax.
    """
    from pydicom.pixels import iter_pixels

    produced = 0
    what = "the slice" if frames == 1 else f"frame {{}} of {frames}"
    plugin = _decoding_plugin(header) if header is not None else ""
    try:
        for frame in iter_pixels(path, decoding_plugin=plugin):
            produced += 1
            yield _checked_shape(path, np.asarray(frame), rows, columns, what.format(produced))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors come from many plugins; name file and frame
        raise _decode_error(path, what.format(produced + 1), exc) from None
    if produced != frames:
        raise InputError(path, f"the pixel data holds {produced} frame(s), the header says {frames}")


def _checked_shape(path: Path, frame: np.ndarray, rows: int, columns: int, what: str) -> np.ndarray:
    if frame.shape != (rows, columns):
        raise InputError(path, f"pixel data of {what} is {frame.shape}, header says {rows}x{columns}")
    return frame
