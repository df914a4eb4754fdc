"""What the DICOM exporters share: finding the source slices of a scan read from DICOM, and saving.

Only pydicom here (highdicom loads with :mod:`nodulenet.export.dicom_seg` / ``dicom_sr``), so the
orchestrator can decide "skipped (input was not DICOM)" without the DICOM writers installed.

The source slices are ``volume.meta["source_files"]``, listed by the DICOM reader in the array's z order.
Their headers are read again (no pixel data); each must still carry the SOPInstanceUID the reader recorded,
so a SEG/SR never references slices that changed since the scan was read. A multi-frame (Enhanced CT) source
is one file listed for every slice, with ``volume.meta["frame_numbers"]`` saying which frame each slice is:
its header is read once, and the SEG's frames are put in the source's frame order (:func:`source_frame_order`)
so that each references its own source frame. A series resampled to correct a gantry tilt has its labels put
back onto the tilted source slices first (:func:`labels_on_source_slices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from nodulenet import __version__
from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import atomic_path
from nodulenet.io.dicom_tilt import to_source_slices
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
    if hu.meta.get("gantry_tilt_resampled") and not hu.meta.get("gantry_tilt_source_offsets_rc_px"):
        raise ExportSkipped(what, f"the series was resampled to correct a gantry tilt of "
                                  f"{hu.meta.get('gantry_tilt_deg')} degrees and where its source slices lie on the "
                                  "corrected grid is not recorded")
    frame_numbers = [f for f in hu.meta.get("frame_numbers") or [] if f is not None]
    if frame_numbers and len(set(files)) > 1:
        raise ExportSkipped(what, f"the series is spread over {len(set(files))} files of which some are multi-frame; "
                                  "a DICOM SEG here references one multi-frame source or single-frame slices")
    return [Path(f) for f in files]


def labels_on_source_slices(hu: Volume, labels: np.ndarray, source_headers: Sequence[Dataset]) -> np.ndarray:
    """The label map (on ``hu``'s grid) on the source slices' own pixels: itself, except for a series the reader
    resampled to correct a gantry tilt, whose labels go back onto each tilted source slice (nearest neighbour)."""
    offsets = hu.meta.get("gantry_tilt_source_offsets_rc_px")
    if not hu.meta.get("gantry_tilt_resampled") or not offsets:
        return labels
    first = source_headers[0]
    return to_source_slices(labels, np.asarray(offsets), int(first.Rows), int(first.Columns))


def source_frame_order(hu: Volume) -> list[int] | None:
    """For a multi-frame source: the array's z index of each source frame, in frame order (so that
    ``labels[order]`` lists the label slices as the source's frames 1..N); None for single-frame slices."""
    frames = hu.meta.get("frame_numbers") or []
    if not frames or frames[0] is None:
        return None
    order = sorted(range(len(frames)), key=lambda z: int(frames[z]))
    if [int(frames[z]) for z in order] != list(range(1, len(frames) + 1)):
        # Frames left out (localizer frames in the file): the SEG cannot list one label frame per source frame.
        raise ExportSkipped("DICOM SEG", f"the multi-frame source has frames the scan does not use (frame numbers "
                                         f"{min(frames)}..{max(frames)} for {len(frames)} slices)")
    return order


def read_source_headers(hu: Volume, what: str = "DICOM export") -> list[Dataset]:
    """Headers (no pixel data) of the scan's source slices in z order, checked against the reader's record."""
    files = require_dicom_source(hu, what)
    expected_uids = hu.meta.get("sop_instance_uids") or [None] * len(files)
    headers: list[Dataset] = []
    # A multi-frame file stands for all its slices: read it once.
    for path, uid in dict.fromkeys(zip(files, expected_uids)):
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


def new_series_attributes(series_number: int, series_description: str) -> dict[str, Any]:
    """The highdicom keyword arguments every exported object shares: it is instance 1 of a new series
    (new series and SOP instance UIDs, the series' number and description), made by this project."""
    import highdicom as hd  # the writers' dependency: not needed to decide "skipped"

    return {"series_instance_uid": hd.UID(), "series_number": series_number, "series_description": series_description,
            "sop_instance_uid": hd.UID(), "instance_number": 1, "manufacturer": MANUFACTURER}


def save_dataset(dataset: Dataset, path: str | Path) -> Path:
    """Save a DICOM dataset atomically (temp file beside ``path``, renamed when complete)."""
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return Path(path)
