"""read_scan: one entry point for DICOM folders, DICOM files and image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_io_dicom import axial_positions, write_series  # shared synthetic-DICOM writer (same folder)

from nodulenet.errors import InputError
from nodulenet.io.image_files import write_image
from nodulenet.io.scan import SUPPORTED_SCAN_SUFFIXES, read_scan, write_volume
from nodulenet.io.volume import Volume


def test_supported_suffixes_cover_every_reader() -> None:
    assert set(SUPPORTED_SCAN_SUFFIXES) == {".dcm", ".dicom", ".ima", ".mhd", ".mha", ".nii", ".nii.gz", ".nrrd",
                                            ".nhdr"}
    assert write_volume is write_image


def test_real_dcm_file_reads_its_series(lidc_0001_series: Path) -> None:
    volume = read_scan(lidc_0001_series / "000050.dcm")
    assert volume.shape_zyx == (133, 512, 512)
    assert volume.meta["source_path"] == str(lidc_0001_series)


def test_folder_and_file_of_two_series(tmp_path: Path) -> None:
    big_uid, _, _ = write_series(tmp_path, axial_positions(4), prefix="big")
    small_uid, small_paths, small_raws = write_series(tmp_path, axial_positions(3, z0=0.0), prefix="small")
    assert read_scan(tmp_path).meta["series_instance_uid"] == big_uid  # folder: the largest CT
    # a file: that file's series, even though the folder's largest is another
    volume = read_scan(small_paths[0])
    assert volume.meta["series_instance_uid"] == small_uid
    np.testing.assert_array_equal(volume.array[0], small_raws[0] - 1024)
    assert read_scan(small_paths[0], series_instance_uid=big_uid).shape_zyx[0] == 4


def test_dicom_file_without_suffix(tmp_path: Path) -> None:
    uid, paths, _ = write_series(tmp_path, axial_positions(3))
    bare = paths[0].with_suffix("")
    paths[0].rename(bare)
    assert read_scan(bare).meta["series_instance_uid"] == uid


def test_image_file(tmp_path: Path) -> None:
    volume = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), (2.0, 1.0, 0.5), (1.0, 2.0, 3.0))
    path = write_image(volume, tmp_path / "scan.nii.gz")
    back = read_scan(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.origin_xyz_mm == pytest.approx(volume.origin_xyz_mm)
    with pytest.raises(InputError, match="only be chosen for DICOM") as err:
        read_scan(path, series_instance_uid="1.2.3")
    assert err.value.path == path


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as err:
        read_scan(tmp_path / "absent")
    assert err.value.path == tmp_path / "absent"
    (tmp_path / "report.txt").write_text("hello")
    with pytest.raises(InputError) as err:
        read_scan(tmp_path / "report.txt")
    message = str(err.value)
    assert str(tmp_path / "report.txt") in message and "unsupported scan file type '.txt'" in message
    assert ".nii.gz" in message and ".mhd" in message and "DICOM folder" in message
    (tmp_path / "fake.dcm").write_text("not dicom")
    with pytest.raises(InputError, match="not a DICOM file"):
        read_scan(tmp_path / "fake.dcm")
    with pytest.raises(InputError, match="no DICOM files"):
        read_scan(tmp_path)
