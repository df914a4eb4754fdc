"""What the DICOM exporters share: finding the source slices of a scan read from DICOM, and saving.

Only pydicom here (highdicom loads with :mod:`nodulenet.export.dicom_seg` / ``dicom_sr``), so the
orchestrator can decide "skipped (input was not DICOM)" without the DICOM writers installed.

The source slices are ``volume.meta["source_files"]``, listed by the DICOM reader in the array's z order.
Their headers are read again (no pixel data); each must still carry the SOPInstanceUID the reader recorded,
so a SEG/SR never references slices that changed since the scan was read.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from nodulenet import __version__
from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import atomic_path
from nodulenet.io.findings import ScanFindings
from nodulenet.io.volume import Volume

MANUFACTURER = "NoduleNet project"
MODEL_NAME = "NoduleNet"


class ExportSkipped(NoduleNetError):
    """This export does not apply to this input (not DICOM, no findings); ``reason`` says why in words."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what} skipped: {reason}")


def algorithm_version(findings: ScanFindings) -> str:
    """The version recorded as the algorithm's: the model version when known, else NoduleNet's."""
    return findings.model.version or findings.nodulenet_version or __version__


def require_dicom_source(hu: Volume, what: str) -> list[Path]:
    """The source slice files of a scan read from DICOM, in the array's z order; else :class:`ExportSkipped`."""
    fmt = hu.meta.get("format")
    files = hu.meta.get("source_files")
    if fmt != "dicom" or not files:
        raise ExportSkipped(what, f"input was not DICOM (format: {fmt or 'unknown'}); "
                                  "DICOM SEG/SR reference the source DICOM slices")
    if len(files) != hu.shape_zyx[0]:
        raise ExportSkipped(what, f"the scan has {hu.shape_zyx[0]} slices but {len(files)} source files are "
                                  "recorded (was it resampled or cropped after reading?)")
    return [Path(f) for f in files]


def read_source_headers(hu: Volume, what: str = "DICOM export") -> list[Dataset]:
    """Headers (no pixel data) of the scan's source slices in z order, checked against the reader's record."""
    files = require_dicom_source(hu, what)
    expected_uids = hu.meta.get("sop_instance_uids") or [None] * len(files)
    headers: list[Dataset] = []
    for path, uid in zip(files, expected_uids):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except FileNotFoundError:
            raise InputError(path, "source DICOM slice no longer exists (needed to reference it)") from None
        except Exception as exc:  # noqa: BLE001 - the user's file is damaged: say which and why
            raise InputError(path, f"cannot re-read the source DICOM slice ({exc})") from None
        if uid is not None and str(ds.get("SOPInstanceUID", "")) != uid:
            raise InputError(path, f"source slice changed since the scan was read (SOPInstanceUID "
                                   f"{ds.get('SOPInstanceUID')} != {uid})")
        headers.append(ds)
    return headers


def save_dataset(dataset: Dataset, path: str | Path) -> Path:
    """Save a DICOM dataset atomically (temp file beside ``path``, renamed when complete)."""
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return Path(path)
