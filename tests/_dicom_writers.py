"""Writers of the DICOM files hospitals send, made from real or phantom scans for the reader's tests:
a volume as classic single-frame slices (optionally sampled on gantry-tilted planes), a series converted to
Legacy Converted Enhanced CT (highdicom), re-encoded in a compressed transfer syntax (pydicom's encoders with
the pylibjpeg/pyjpegls plugins), and one compressed frame corrupted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import CTImageStorage, generate_uid
from scipy import ndimage

from nodulenet.io.dicom_write import new_file_dataset
from nodulenet.io.volume import Volume

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.8.498.78"


def tilted_plane_axes(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines of an axial plane tilted by ``tilt_deg`` about the patient's x axis (a gantry
    tilt: the image's columns run anterior-posterior and rise in z)."""
    t = math.radians(tilt_deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(t), math.sin(t)])


def sample_tilted_slices(volume: Volume, tilt_deg: float, n_slices: int, table_step_mm: float,
                         first_position_xyz: Sequence[float], rows: int, columns: int,
                         fill: float) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """What a scanner with its gantry tilted by ``tilt_deg`` records of ``volume``: slice k is the plane through
    ``first_position + k * table_step * z`` with :func:`tilted_plane_axes`, sampled (linear) at the volume's
    in-plane spacing. Returns (slices, positions, 6 orientation cosines)."""
    row_cos, col_cos = tilted_plane_axes(tilt_deg)
    spacing_r, spacing_c = volume.spacing_zyx[1], volume.spacing_zyx[2]
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    slices, positions = [], []
    for k in range(n_slices):
        position = np.asarray(first_position_xyz, dtype=np.float64) + np.array([0.0, 0.0, k * table_step_mm])
        world = position + c[..., None] * spacing_c * row_cos + r[..., None] * spacing_r * col_cos
        zyx = volume.world_to_voxel(world)
        sampled = ndimage.map_coordinates(volume.array.astype(np.float32), np.moveaxis(zyx, -1, 0), order=1,
                                          mode="constant", cval=fill)
        slices.append(sampled)
        positions.append(position)
    return slices, positions, np.concatenate([row_cos, col_cos])


def write_ct_slices(folder: Path, slices: Sequence[np.ndarray], positions: Sequence[Sequence[float]],
                    orientation: Sequence[float], pixel_spacing_rc: Sequence[float], *, series_uid: str | None = None,
                    series_number: int = 1, description: str = "", slice_thickness: float | None = None,
                    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), sop_class: str = CTImageStorage,
                    modality: str = "CT", gantry_tilt_deg: float = 0.0, prefix: str = "IM") -> str:
    """Write HU ``slices`` as a classic CT series (int16 stored, slope 1, intercept -1024); returns its UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for k, (hu, position) in enumerate(zip(slices, positions)):
        path = folder / f"{prefix}{k:04d}.dcm"
        ds = new_file_dataset(path, sop_class, generate_uid())
        ds.Modality = modality
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, STUDY_UID
        ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
        ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = "PHANTOM-1", "Phantom^Tilted", "O", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "NoduleNet tests"
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, k + 1
        ds.ImageType = list(image_type)
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing_rc]
        if slice_thickness is not None:
            ds.SliceThickness = slice_thickness
        ds.GantryDetectorTilt = gantry_tilt_deg
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.PixelData = (np.rint(hu).astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return series_uid


def write_volume_as_series(volume: Volume, folder: Path, **kwargs) -> str:
    """``volume`` (axis-aligned, identity direction) as classic axial slices."""
    direction = np.asarray(volume.direction).reshape(3, 3)
    assert np.allclose(direction, np.eye(3)), "write_volume_as_series writes identity-direction volumes"
    positions = [volume.voxel_to_world([k, 0, 0]) for k in range(volume.shape_zyx[0])]
    kwargs.setdefault("slice_thickness", float(volume.spacing_zyx[0]))
    return write_ct_slices(folder, list(volume.array), positions, (1, 0, 0, 0, 1, 0), volume.spacing_zyx[1:], **kwargs)


def to_enhanced_ct(series_files: Sequence[Path], out_file: Path) -> Path:
    """The classic series as one Legacy Converted Enhanced CT multi-frame file (highdicom)."""
    legacy = [pydicom.dcmread(p) for p in series_files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out_file, enforce_file_format=True)
    return out_file


def compress_file(src: Path, dst: Path, transfer_syntax: str) -> Path:
    """``src`` re-encoded losslessly in ``transfer_syntax`` (pydicom's ``Dataset.compress`` with the plugins)."""
    ds = pydicom.dcmread(src)
    ds.compress(transfer_syntax, generate_instance_uid=False)  # lossless: the same image, the same instance
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def corrupt_frame(path: Path, frame: int) -> None:
    """Overwrite the compressed codestream of ``frame`` (1-based), keeping its length, with zeros after its
    first marker bytes: the decoder finds no valid image there."""
    ds = pydicom.dcmread(path)
    n = int(ds.get("NumberOfFrames") or 1)
    frames = list(generate_frames(ds.PixelData, number_of_frames=n))
    data = frames[frame - 1]
    frames[frame - 1] = data[:4] + b"\0" * (len(data) - 4)
    ds.PixelData = encapsulate(frames)
    ds.save_as(path, enforce_file_format=True)


def lidc_variants(series_dir: Path, root: Path, *, classic_rle: bool = True) -> dict[str, Path]:
    """Folders holding the classic series ``series_dir`` as one Enhanced CT file (uncompressed, JPEG-LS lossless,
    JPEG 2000 lossless) and, with ``classic_rle``, as classic slices in RLE lossless."""
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    files = sorted(series_dir.glob("*.dcm"))
    enhanced = to_enhanced_ct(files, root / "enhanced" / "ct.dcm")
    folders = {"enhanced": enhanced.parent}
    for name, syntax in (("enhanced_jpegls", JPEGLSLossless), ("enhanced_jpeg2000", JPEG2000Lossless)):
        folders[name] = compress_file(enhanced, root / name / "ct.dcm", syntax).parent
    if classic_rle:
        for f in files:
            compress_file(f, root / "classic_rle" / f.name, RLELossless)
        folders["classic_rle"] = root / "classic_rle"
    return folders
