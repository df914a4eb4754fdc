"""Write a CT :class:`~nodulenet.io.volume.Volume` as a DICOM series: one CT Image Storage file per slice (pydicom).

What it is for: sending a scan (the phantom, a NIfTI) to a PACS or a DICOM listener, where only DICOM is taken.
The geometry is the volume's own (DICOM PS3.3 C.7.6.2): ``ImageOrientationPatient`` is the world direction of the
column and row index axes (direction matrix columns 0 and 1), ``ImagePositionPatient`` of slice ``k`` is
``origin + D[:, 2] * k * spacing_z``; ``PixelSpacing`` is (row spacing, column spacing) = (y, x). Reading the
written folder with :func:`nodulenet.io.dicom.read_dicom_series` gives the same array and geometry back.

HU are stored as signed 16-bit pixels with ``RescaleSlope 1`` and ``RescaleIntercept 0`` (-1024 when the HU only
fit shifted). Files are ``<0001..N>.dcm`` in array
z order, written atomically; the UIDs are the caller's (derive them from something stable for reproducible files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from nodulenet.errors import InputError
from nodulenet.io.atomic import atomic_path
from nodulenet.io.volume import Volume


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and what the series belongs to (the patient/study/series modules' identifying attributes)."""

    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    patient_id: str = "NODULENET-PHANTOM"
    patient_name: str = "Phantom^NoduleNet"
    study_id: str = "1"
    accession_number: str = ""
    study_description: str = "NoduleNet phantom chest CT"
    series_description: str = "Synthetic chest CT (not a patient)"
    series_number: int = 1
    manufacturer: str = "NoduleNet project"
    date: str = "20250101"  # StudyDate/SeriesDate/ContentDate: fixed, so the same scan gives the same bytes
    time: str = "120000"


def _dicom_decimal(value: float) -> str:
    """A DS value (at most 16 characters) that keeps sub-micrometre precision."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def new_file_dataset(path: str | Path, sop_class_uid: str, sop_instance_uid: str) -> FileDataset:
    """An empty DICOM file for ``path`` (Explicit VR Little Endian, 128-byte preamble) whose file meta and
    dataset both carry ``sop_class_uid`` and ``sop_instance_uid``; the caller adds the attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def write_ct_series(volume: Volume, folder: str | Path, identity: SeriesIdentity | None = None) -> list[Path]:
    """Write ``volume`` (HU, ``(z, y, x)``) as CT slices ``folder/0001.dcm ...``; return the paths in z order."""
    identity = identity or SeriesIdentity()
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(folder, f"a CT series needs a 3-D volume, got shape {array.shape}")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    intercept = 0.0 if lo >= -32768 and hi <= 32767 else -1024.0
    stored = np.rint(array.astype(np.float64) - intercept)
    if stored.min(initial=0) < -32768 or stored.max(initial=0) > 32767:
        raise InputError(folder, f"HU range {lo:.0f}..{hi:.0f} does not fit 16-bit DICOM pixels")
    stored = stored.astype("<i2")
    g = volume.geometry
    direction = g.direction_matrix
    spacing_z, spacing_y, spacing_x = g.spacing_zyx
    orientation = [*direction[:, 0], *direction[:, 1]]
    origin = np.asarray(g.origin_xyz_mm, dtype=np.float64)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(array.shape[0]):
        path = out / f"{k + 1:04d}.dcm"
        ds = new_file_dataset(path, CTImageStorage, generate_uid(entropy_srcs=[identity.series_uid, str(k)]))
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.Manufacturer = identity.manufacturer
        ds.PatientID = identity.patient_id
        ds.PatientName = identity.patient_name
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = identity.study_uid
        ds.StudyID = identity.study_id
        ds.AccessionNumber = identity.accession_number
        ds.StudyDescription = identity.study_description
        ds.ReferringPhysicianName = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = identity.date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = identity.time
        ds.SeriesInstanceUID = identity.series_uid
        ds.SeriesNumber = identity.series_number
        ds.SeriesDescription = identity.series_description
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.FrameOfReferenceUID = identity.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        position = origin + direction[:, 2] * (k * spacing_z)
        ds.ImagePositionPatient = [_dicom_decimal(v) for v in position]
        ds.ImageOrientationPatient = [_dicom_decimal(v) for v in orientation]
        ds.SliceLocation = _dicom_decimal(float(position[2]))
        ds.PixelSpacing = [_dicom_decimal(spacing_y), _dicom_decimal(spacing_x)]
        ds.SliceThickness = _dicom_decimal(spacing_z)
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _dicom_decimal(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.PixelData = stored[k].tobytes()
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths
