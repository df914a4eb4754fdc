"""One entry point for "read this scan": a DICOM folder, a DICOM file, or a MetaImage/NIfTI/NRRD file.

Whatever the input, the result is a :class:`Volume` with the ``(z, y, x)`` array and the geometry that
places it in DICOM LPS world coordinates (see DESIGN.md and :mod:`nodulenet.io.volume`).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from nodulenet.errors import InputError
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.image_files import IMAGE_FILE_FORMATS, image_format, read_image, write_image
from nodulenet.io.volume import Volume

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")
# What a user may pass as a scan besides a DICOM folder.
SUPPORTED_SCAN_SUFFIXES: tuple[str, ...] = (*DICOM_SUFFIXES, *IMAGE_FILE_FORMATS)

write_volume = write_image

__all__ = ["DICOM_SUFFIXES", "SUPPORTED_SCAN_SUFFIXES", "read_scan", "write_volume"]


def _dicom_series_uid(path: Path) -> str | None:
    """SeriesInstanceUID of a DICOM file, None if it has none; raises InvalidDicomError if not DICOM."""
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    uid = header.get("SeriesInstanceUID")
    return str(uid) if uid else None


def read_scan(path: str | Path, series_instance_uid: str | None = None) -> Volume:
    """Read a CT scan from a DICOM folder, a DICOM file (its folder's series) or an image file.

    ``series_instance_uid`` picks a DICOM series; for a DICOM file it defaults to that file's series.
    It is refused for image files, which hold one volume and no series to choose.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        return read_dicom_series(path, series_instance_uid)
    if image_format(path) is not None:
        if series_instance_uid is not None:
            raise InputError(path, "a series UID can only be chosen for DICOM input; this file holds one volume")
        return read_image(path)
    # A DICOM file, with a DICOM suffix or none at all (many archives name slices IM0001 or by UID).
    try:
        uid = _dicom_series_uid(path)
    except InvalidDicomError:
        if path.suffix.lower() in DICOM_SUFFIXES:
            raise InputError(path, "has a DICOM suffix but is not a DICOM file (no DICM preamble)") from None
        raise InputError(
            path,
            f"unsupported scan file type '{path.suffix or path.name}'; give a DICOM folder or a file ending in "
            f"{', '.join(SUPPORTED_SCAN_SUFFIXES)}",
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged header is the user's input problem, say so
        raise InputError(path, f"unreadable DICOM header ({exc})") from None
    # The file's own series, not the folder's largest: the user pointed at this one.
    return read_dicom_series(path.parent, series_instance_uid or uid)
