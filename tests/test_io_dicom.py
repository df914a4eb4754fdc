"""DICOM series reading: real LIDC-IDRI series checked against pydicom directly, and small synthetic
series (written here with pydicom) for orientation, rescale and every bad input a user can hand us."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

from nodulenet.errors import InputError
from nodulenet.io.dicom import list_dicom_series, read_dicom_series
from nodulenet.io.dicom_write import new_file_dataset
from nodulenet.io.volume import Volume

# ---------------------------------------------------------------------------------------------- helpers


def write_series(
    folder: Path,
    positions_xyz: Sequence[Sequence[float]],
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing_rc: Sequence[float] = (0.8, 0.7),
    rows: int = 6,
    columns: int = 5,
    rescale: Sequence[tuple[float, float]] | None = None,
    raw_dtype: type = np.int16,
    prefix: str = "",
    description: str = "",
) -> tuple[str, list[Path], list[np.ndarray]]:
    """Write one slice per position, file names and InstanceNumbers in an order unrelated to position.

    Slice k holds raw values ``k * 100 + arange(rows * columns)`` so every voxel says where it came from.
    Returns (series uid, paths in the order of ``positions_xyz``, raw arrays in that order).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    n = len(positions_xyz)
    # Reverse-and-rotate: names and instance numbers deliberately disagree with z order.
    name_rank = [(n - 1 - k + 1) % n for k in range(n)]
    paths, raws = [], []
    for k, pos in enumerate(positions_xyz):
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        path = folder / f"{prefix}{name_rank[k]:04d}.dcm"
        ds = new_file_dataset(path, sop_class, generate_uid())
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.PatientID = "SYNTH-001"
        ds.PatientName = "Synthetic^Patient"
        ds.Manufacturer = "NoduleNet tests"
        ds.SeriesDescription = description
        ds.SeriesNumber = 7
        ds.ImageType = list(image_type)
        ds.InstanceNumber = name_rank[k] + 1
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing_rc]
        ds.SliceThickness = 9.99  # deliberately wrong: the step must come from the positions
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if np.dtype(raw_dtype).kind == "i" else 0
        slope, intercept = rescale[k] if rescale is not None else (1.0, -1024.0)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        raw = (k * 100 + np.arange(rows * columns).reshape(rows, columns)).astype(raw_dtype)
        ds.PixelData = raw.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        raws.append(raw)
    return series_uid, paths, raws


def axial_positions(n: int, step: float = 2.5, z0: float = -100.0) -> list[list[float]]:
    return [[-50.0, -60.0, z0 + k * step] for k in range(n)]


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def lidc_0001(lidc_0001_series: Path) -> Volume:
    return read_dicom_series(lidc_0001_series)


def _pydicom_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.glob("*.dcm"))]


def test_lidc_0001_shape_spacing_origin_against_pydicom(lidc_0001: Volume, lidc_0001_series: Path) -> None:
    assert lidc_0001.shape_zyx == (133, 512, 512)
    assert lidc_0001.spacing_zyx == pytest.approx((2.5, 0.703125, 0.703125), abs=1e-9)
    assert lidc_0001.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # Independent: the lowest ImagePositionPatient z among the files, read by pydicom.
    headers = _pydicom_headers(lidc_0001_series)
    lowest = min(headers, key=lambda h: float(h[1].ImagePositionPatient[2]))[1]
    assert lidc_0001.origin_xyz_mm == pytest.approx([float(v) for v in lowest.ImagePositionPatient], abs=1e-9)
    assert lidc_0001.origin_xyz_mm == pytest.approx((-166.0, -171.699997, -340.0), abs=1e-6)
    # sop uids in z order, z positions ascending by 2.5 mm, and the source XML was not taken for a slice
    by_z = sorted(headers, key=lambda h: float(h[1].ImagePositionPatient[2]))
    assert lidc_0001.meta["sop_instance_uids"] == [str(h.SOPInstanceUID) for _, h in by_z]
    assert lidc_0001.meta["slice_positions_mm"] == pytest.approx([-340.0 + 2.5 * k for k in range(133)])
    assert [Path(p).name for p in lidc_0001.meta["source_files"]] == [p.name for p, _ in by_z]
    assert lidc_0001.meta["series_instance_uid"].endswith("179049373636438705059720603192")
    assert lidc_0001.meta["patient_id"] == "LIDC-IDRI-0001"
    assert lidc_0001.meta["modality"] == "CT"
    assert lidc_0001.meta["frame_of_reference_uid"] == str(lowest.FrameOfReferenceUID)
    assert lidc_0001.meta["study_instance_uid"] == str(lowest.StudyInstanceUID)
    assert lidc_0001.meta["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert lidc_0001.meta["padding_hu"] == -3024.0  # PixelPaddingValue 63536 read as signed -2000, -1024
    assert lidc_0001.meta["warnings"] == []  # evenly spaced


def test_lidc_0001_hu_equals_pydicom_rescale(lidc_0001: Volume, lidc_0001_series: Path) -> None:
    assert lidc_0001.array.dtype == np.int16  # slope 1, intercept -1024: exact in int16
    # Independent: one file read by pydicom, rescaled by hand, placed by its z position.
    path = lidc_0001_series / "000050.dcm"
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    k = round((float(ds.ImagePositionPatient[2]) - lidc_0001.origin_xyz_mm[2]) / 2.5)
    assert lidc_0001.meta["sop_instance_uids"][k] == ds.SOPInstanceUID
    assert lidc_0001.array[k, 256, 100] == hu[256, 100]
    np.testing.assert_array_equal(lidc_0001.array[k], hu)
    assert int(lidc_0001.array.min()) == -2048 and int(lidc_0001.array.max()) == 3071


def test_lidc_0001_luna_nodule_lands_in_soft_tissue(lidc_0001: Volume) -> None:
    # LUNA16 annotations.csv: the 23.4 mm nodule of this scan at world (56.21, 86.34, -115.87) mm.
    # If the geometry were wrong (flipped axis, RAS for LPS) this point would fall in lung air (< -700 HU).
    z, y, x = np.round(lidc_0001.world_to_voxel([56.21, 86.34, -115.87])).astype(int)
    assert (z, y, x) == (90, 367, 316)  # by hand: (-115.87+340)/2.5, (86.34+171.7)/0.703125, (56.21+166)/0.703125
    core = lidc_0001.array[z, y - 2 : y + 3, x - 2 : x + 3]
    assert float(np.median(core)) > -200


def test_lidc_0002_reads(lidc_0002_series: Path) -> None:
    volume = read_dicom_series(lidc_0002_series)
    assert volume.shape_zyx == (261, 512, 512)
    headers = _pydicom_headers(lidc_0002_series)
    first = min(headers, key=lambda h: float(h[1].ImagePositionPatient[2]))[1]
    assert volume.spacing_zyx[0] == pytest.approx(1.25, abs=1e-6)
    assert volume.spacing_zyx[1:] == pytest.approx([float(v) for v in first.PixelSpacing])
    assert volume.origin_xyz_mm == pytest.approx([float(v) for v in first.ImagePositionPatient])
    assert int(volume.array.min()) == -3024  # padding of this scanner kept as stored


def test_list_series_ignores_xml_and_recurses(lidc_0001_series: Path, lidc_root: Path) -> None:
    assert any(p.suffix == ".xml" for p in lidc_0001_series.iterdir())
    found = list_dicom_series(lidc_root / "LIDC-IDRI-0001")  # patient folder: two levels above the files
    assert len(found) == 1
    info = found[0]
    assert (info.modality, info.num_files, info.is_ct_volume) == ("CT", 133, True)
    assert info.series_instance_uid.endswith("179049373636438705059720603192")
    assert info.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")


def test_missing_middle_slice_of_real_series(lidc_0001_series: Path, tmp_path: Path) -> None:
    headers = sorted(_pydicom_headers(lidc_0001_series), key=lambda h: float(h[1].ImagePositionPatient[2]))
    dropped, before, after = headers[60][0], headers[59][0], headers[61][0]
    folder = tmp_path / "gap"
    folder.mkdir()
    for p, _ in headers:  # symlinks: the test needs the real headers, not 70 MB of copies
        if p != dropped:
            os.symlink(p, folder / p.name)
    with pytest.raises(InputError) as err:
        read_dicom_series(folder)
    message = str(err.value)
    assert str(folder) in message and "missing slice" in message
    assert before.name in message and after.name in message and "5.000 mm" in message


# ---------------------------------------------------------------------------------------------- synthetic


def test_sorted_by_position_not_by_name_or_instance_number(tmp_path: Path) -> None:
    positions = axial_positions(5, step=2.0)
    uid, paths, raws = write_series(tmp_path / "s", positions)
    assert sorted(paths) != paths  # file names are not in z order
    volume = read_dicom_series(tmp_path / "s")
    assert volume.shape_zyx == (5, 6, 5)
    assert volume.spacing_zyx == pytest.approx((2.0, 0.8, 0.7))  # step from positions, not SliceThickness
    assert volume.origin_xyz_mm == pytest.approx((-50.0, -60.0, -100.0))
    for k in range(5):
        np.testing.assert_array_equal(volume.array[k], raws[k].astype(np.int32) - 1024)
    assert volume.meta["slice_positions_mm"] == pytest.approx([-100.0, -98.0, -96.0, -94.0, -92.0])
    assert volume.meta["series_instance_uid"] == uid
    assert volume.meta["patient_name"] == "Synthetic^Patient"


def test_descending_positions_and_oblique_orientation_map_to_dicom_world(tmp_path: Path) -> None:
    # A sagittal-ish oblique series whose files list positions backwards along the normal.
    row = np.array([0.0, np.cos(0.3), np.sin(0.3)])
    col = np.array([0.0, -np.sin(0.3), np.cos(0.3)])
    col = -col  # rows run "downwards"
    normal = np.cross(row, col)
    start = np.array([10.0, 20.0, 30.0])
    positions = [start + (4 - k) * 1.5 * normal for k in range(5)]
    _, _, raws = write_series(tmp_path / "o", positions, orientation=[*row, *col])
    volume = read_dicom_series(tmp_path / "o")
    direction = np.asarray(volume.direction).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], row, atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], col, atol=1e-6)
    np.testing.assert_allclose(direction[:, 2], normal, atol=1e-6)
    # DICOM's own formula (PS3.3 C.7.6.2.1.1) for pixel (r, c) of the file written at positions[j]:
    # IPP + c * column_spacing * row_cosine + r * row_spacing * column_cosine.
    for j in (0, 2, 4):
        r, c = 4, 3
        expected = positions[j] + c * 0.7 * row + r * 0.8 * col
        k = int(np.argmin([np.linalg.norm(np.asarray(volume.voxel_to_world([kk, 0, 0])) - positions[j])
                           for kk in range(5)]))
        np.testing.assert_allclose(volume.voxel_to_world([k, r, c]), expected, atol=1e-5)
        assert volume.array[k, r, c] == raws[j][r, c] - 1024


def test_rescale_applied_per_slice_int16_when_exact(tmp_path: Path) -> None:
    rescale = [(2.0, -1000.0), (2.0, -1000.0), (1.0, -1024.0)]
    _, _, raws = write_series(tmp_path / "r", axial_positions(3), rescale=rescale)
    volume = read_dicom_series(tmp_path / "r")
    assert volume.array.dtype == np.int16
    for k, (slope, intercept) in enumerate(rescale):
        np.testing.assert_array_equal(volume.array[k], raws[k] * slope + intercept)


def test_rescale_float32_for_fractional_slope_or_int16_overflow(tmp_path: Path) -> None:
    _, _, raws = write_series(tmp_path / "f", axial_positions(3), rescale=[(0.5, -1024.0)] * 3)
    volume = read_dicom_series(tmp_path / "f")
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[1], raws[1] * 0.5 - 1024.0)
    # unsigned raw near 65535 with slope 1 leaves int16; float32 holds the integers exactly
    _, _, raws = write_series(tmp_path / "u", axial_positions(3), raw_dtype=np.uint16, rescale=[(1.0, 40000.0)] * 3)
    volume = read_dicom_series(tmp_path / "u")
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[2], raws[2].astype(np.float64) + 40000.0)


def test_uneven_spacing_warns_and_uses_mean(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    zs = [0.0, 2.5, 5.04, 7.5, 10.0]
    write_series(tmp_path / "u", [[0.0, 0.0, z] for z in zs])
    with caplog.at_level(logging.WARNING, logger="nodulenet.io.dicom"):
        volume = read_dicom_series(tmp_path / "u")
    assert volume.spacing_zyx[0] == pytest.approx(2.5)  # (10 - 0) / 4
    assert any("uneven slice spacing" in r.getMessage() for r in caplog.records)
    assert volume.meta["warnings"] and "2.4600" in volume.meta["warnings"][0]


def test_jpeg_lossless_series_written_by_gdcm_decoded_through_pydicom_plugins(tmp_path: Path) -> None:
    # An independent encoder (GDCM inside SimpleITK) writes JPEG-lossless slices with the HU we expect back;
    # pydicom decodes them with the pylibjpeg-libjpeg plugin (a core dependency).
    series_uid = generate_uid()
    expected = [(k * 50 - 1000 + np.arange(30).reshape(6, 5) * 7).astype(np.int16) for k in range(3)]
    for k, hu in enumerate(expected):
        image = sitk.GetImageFromArray(hu[np.newaxis])
        image.SetSpacing((0.7, 0.8, 1.0))
        image.SetOrigin((-5.0, 4.0, 12.0 - 3.0 * k))  # descending z in file order
        tags = {"0008|0060": "CT", "0008|0016": CTImageStorage, "0020|000e": series_uid,
                "0008|0018": generate_uid(), "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                "0028|1052": "-1024", "0028|1053": "1"}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.SetFileName(str(tmp_path / f"IM{k}.dcm"))
        writer.Execute(image)
    header = pydicom.dcmread(tmp_path / "IM0.dcm")
    assert "JPEG Lossless" in header.file_meta.TransferSyntaxUID.name
    volume = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(volume.array, np.stack(expected[::-1]))
    assert volume.origin_xyz_mm == pytest.approx((-5.0, 4.0, 6.0))
    assert volume.spacing_zyx == pytest.approx((3.0, 0.8, 0.7))


@pytest.mark.parametrize("content", ["empty", "non_dicom"])
def test_folder_without_dicom(tmp_path: Path, content: str) -> None:
    if content == "non_dicom":
        (tmp_path / "069.xml").write_text("<LidcReadMessage/>")
        (tmp_path / "notes.txt").write_text("not an image")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "fake.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "no DICOM files" in str(err.value)
    assert list_dicom_series(tmp_path) == []


def test_nonexistent_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as err:
        read_dicom_series(tmp_path / "nope")
    assert err.value.path == tmp_path / "nope"


def test_mr_series_refused(tmp_path: Path) -> None:
    write_series(tmp_path, axial_positions(3), modality="MR", description="T1 axial")
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "no CT image series" in str(err.value) and "MR" in str(err.value) and "T1 axial" in str(err.value)
    uid = list_dicom_series(tmp_path)[0].series_instance_uid
    with pytest.raises(InputError, match="modality MR; NoduleNet reads CT only"):
        read_dicom_series(tmp_path, uid)


def test_ct_chosen_over_larger_localizer(tmp_path: Path) -> None:
    ct_uid, _, _ = write_series(tmp_path / "ct", axial_positions(3), prefix="ct")
    # The localizer has more files than the CT: size alone must not decide.
    loc_uid, _, _ = write_series(tmp_path / "loc", axial_positions(5, step=7.0), prefix="loc",
                                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    infos = list_dicom_series(tmp_path)
    assert [i.series_instance_uid for i in infos] == [ct_uid, loc_uid]
    assert infos[1].is_localizer and not infos[1].is_ct_volume
    assert read_dicom_series(tmp_path).meta["series_instance_uid"] == ct_uid


def test_localizer_only_refused(tmp_path: Path) -> None:
    write_series(tmp_path, axial_positions(2), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(InputError, match="no CT image series") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "LOCALIZER" in str(err.value)


def test_several_ct_series_largest_chosen_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small_uid, _, _ = write_series(tmp_path / "a", axial_positions(3), prefix="a")
    large_uid, _, _ = write_series(tmp_path / "b", axial_positions(4), prefix="b")
    with caplog.at_level(logging.INFO, logger="nodulenet.io.dicom"):
        volume = read_dicom_series(tmp_path)
    assert volume.meta["series_instance_uid"] == large_uid and volume.shape_zyx[0] == 4
    assert any(large_uid in r.getMessage() and small_uid in r.getMessage() for r in caplog.records)
    assert read_dicom_series(tmp_path, small_uid).shape_zyx[0] == 3
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 1.2.3") as err:
        read_dicom_series(tmp_path, "1.2.3")
    assert large_uid in str(err.value)


def test_duplicate_positions_refused(tmp_path: Path) -> None:
    zs = [0.0, 2.5, 2.5, 5.0]
    _, paths, _ = write_series(tmp_path, [[0.0, 0.0, z] for z in zs])
    with pytest.raises(InputError, match="same position") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert paths[1].name in str(err.value) and paths[2].name in str(err.value)


def test_mixed_sizes_refused(tmp_path: Path) -> None:
    uid, _, _ = write_series(tmp_path, axial_positions(3), prefix="a")
    write_series(tmp_path, axial_positions(1, z0=-92.5), series_uid=uid, rows=7, prefix="b")
    with pytest.raises(InputError, match="different sizes") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "7x5" in str(err.value)


def test_mixed_orientations_refused(tmp_path: Path) -> None:
    uid, _, _ = write_series(tmp_path, axial_positions(3), prefix="a")
    write_series(tmp_path, axial_positions(1, z0=-92.5), series_uid=uid, orientation=(0, 1, 0, 1, 0, 0), prefix="b")
    with pytest.raises(InputError, match="different orientations") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_irregular_sideways_drift_refused(tmp_path: Path) -> None:
    # Positions jump sideways and back: no single gantry tilt explains them, so no grid can hold the slices.
    # (A regular tilt is resampled: tests/test_io_dicom_formats.py.)
    write_series(tmp_path, [[0.0, y, 2.5 * k] for k, y in enumerate([0.0, 3.0, 0.0, 3.0])])
    with pytest.raises(InputError, match="sideways") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "not a regular grid" in str(err.value)


def test_truncated_slice_refused(tmp_path: Path) -> None:
    _, paths, _ = write_series(tmp_path, axial_positions(3), rows=64, columns=64)
    paths[1].write_bytes(paths[1].read_bytes()[:-1000])
    with pytest.raises(InputError, match="cannot decode the pixel data") as err:
        read_dicom_series(tmp_path)
    assert err.value.path == paths[1] and "truncated" in str(err.value)


def test_single_slice_refused(tmp_path: Path) -> None:
    write_series(tmp_path, axial_positions(1))
    with pytest.raises(InputError, match="at least 2 slices"):
        read_dicom_series(tmp_path)
