"""MetaImage / NIfTI / NRRD reading and writing: exact HU, geometry checked against SimpleITK's own
index->physical mapping, LPS kept through NIfTI's RAS header, bad files, and atomic writes."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nodulenet.errors import InputError
from nodulenet.io import image_files
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.image_files import read_image, write_image
from nodulenet.io.volume import Volume

# (file name, compress) for every writable variant; .mhd twice for .raw and .zraw data.
FORMATS = [
    ("scan.nii.gz", None),
    ("scan.nii", None),
    ("scan.nrrd", None),
    ("scan.mhd", False),
    ("scan.mhd", True),
    ("scan.mha", None),
]
FORMAT_IDS = ["nii.gz", "nii", "nrrd", "mhd-raw", "mhd-zraw", "mha"]

# Permuted + flipped axes (a proper rotation), a pure flip (det -1) and an oblique rotation.
DIRECTIONS = {
    "permuted": (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "flipped": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    "oblique": tuple(
        np.array([[np.cos(0.5), -np.sin(0.5), 0.0], [np.sin(0.5), np.cos(0.5), 0.0], [0.0, 0.0, 1.0]]).ravel()
    ),
}


def small_volume(dtype: type = np.int16, direction: tuple[float, ...] = DIRECTIONS["permuted"]) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 2000, size=(4, 5, 6)).astype(dtype)
    # Spacing/origin exactly representable in float32 so NIfTI can return them unchanged.
    return Volume(array, spacing_zyx=(2.5, 1.25, 0.75), origin_xyz_mm=(-100.5, 50.25, -300.75), direction=direction)


def sitk_world(image: sitk.Image, index_zyx: tuple[int, int, int]) -> np.ndarray:
    z, y, x = index_zyx
    return np.asarray(image.TransformIndexToPhysicalPoint((x, y, z)))


# ---------------------------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def lidc_0001(lidc_0001_series: Path) -> Volume:
    return read_dicom_series(lidc_0001_series)


@pytest.mark.parametrize(("name", "compress"), FORMATS, ids=FORMAT_IDS)
def test_dicom_round_trip_keeps_hu_and_geometry(lidc_0001: Volume, tmp_path: Path, name: str,
                                                compress: bool | None) -> None:
    volume = lidc_0001
    if compress is not False and name != "scan.nii":
        # gzip of the whole 70 MB scan costs seconds per format on the 2-core CI machine; a 24-slice slab
        # (real HU, origin moved to slice 80) exercises the same codec and geometry path.
        origin = tuple(lidc_0001.voxel_to_world((80, 0, 0)))
        volume = Volume(lidc_0001.array[80:104], lidc_0001.spacing_zyx, origin, lidc_0001.direction)
    written = write_image(volume, tmp_path / name, compress=compress)
    back = read_image(written)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    last = volume.shape_zyx[0] - 1
    corners = [(0, 0, 0), (last, 511, 511), (10, 367, 316), (17, 3, 400)]
    np.testing.assert_allclose(back.voxel_to_world(corners), volume.voxel_to_world(corners), atol=1e-6)
    assert back.spacing_zyx == pytest.approx(volume.spacing_zyx, abs=1e-6)
    if name.endswith(".mhd"):
        assert (tmp_path / ("scan.zraw" if compress else "scan.raw")).is_file()
        assert not (tmp_path / ("scan.raw" if compress else "scan.zraw")).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


@pytest.mark.parametrize("direction", list(DIRECTIONS), ids=list(DIRECTIONS))
@pytest.mark.parametrize(("name", "compress"), FORMATS, ids=FORMAT_IDS)
def test_non_identity_direction_maps_world_points(tmp_path: Path, name: str, compress: bool | None,
                                                  direction: str) -> None:
    # Ground truth: an image built by SimpleITK and its own TransformIndexToPhysicalPoint.
    array = np.zeros((4, 5, 6), dtype=np.int16)
    array[3, 1, 4] = 777
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.75, 1.25, 2.5))
    image.SetOrigin((-100.5, 50.25, -300.75))
    image.SetDirection(DIRECTIONS[direction])
    sitk.WriteImage(image, str(tmp_path / "truth.nrrd"))
    volume = read_image(tmp_path / "truth.nrrd")
    tol = 1e-5 if "nii" in name else 1e-9  # NIfTI stores float32 (quaternion for the rotation)
    back = read_image(write_image(volume, tmp_path / name, compress=compress))
    for idx in [(0, 0, 0), (3, 1, 4), (2, 4, 5), (1, 0, 3)]:
        np.testing.assert_allclose(back.voxel_to_world(idx), sitk_world(image, idx), atol=tol)
    marker_world = sitk_world(image, (3, 1, 4))
    z, y, x = np.round(back.world_to_voxel(marker_world)).astype(int)
    assert back.array[z, y, x] == 777
    np.testing.assert_allclose(back.world_to_voxel(marker_world), (3, 1, 4), atol=1e-5)


def _nifti_sform_ras(path: Path) -> np.ndarray:
    """The 3x4 sform of a NIfTI-1 file, parsed from the header bytes (srow_x/y/z at byte 280)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        header = f.read(348)
    assert struct.unpack("<h", header[254:256])[0] > 0  # sform_code set
    return np.asarray(struct.unpack("<12f", header[280:328]), dtype=np.float64).reshape(3, 4)


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_nifti_file_holds_ras_of_our_lps(tmp_path: Path, name: str) -> None:
    # Independent of ITK's reader: the sform in the file must map voxel (i, j, k) to RAS = (-x, -y, z) of LPS.
    volume = small_volume(direction=DIRECTIONS["oblique"])
    write_image(volume, tmp_path / name)
    sform = _nifti_sform_ras(tmp_path / name)
    for z, y, x in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        ras = sform @ np.array([x, y, z, 1.0])
        lps = volume.voxel_to_world((z, y, x))
        np.testing.assert_allclose(ras, lps * np.array([-1.0, -1.0, 1.0]), atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize(("name", "compress"), FORMATS, ids=FORMAT_IDS)
def test_dtype_preserved(tmp_path: Path, name: str, compress: bool | None, dtype: type) -> None:
    volume = small_volume(dtype=dtype)
    back = read_image(write_image(volume, tmp_path / name, compress=compress))
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, volume.array)


def test_bool_written_as_uint8(tmp_path: Path) -> None:
    mask = small_volume().array > 0
    back = read_image(write_image(small_volume().with_array(mask), tmp_path / "mask.nrrd"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.astype(np.uint8))


def test_luna_style_name_gives_series_uid(tmp_path: Path) -> None:
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    volume = read_image(write_image(small_volume(), tmp_path / f"{uid}.mhd"))
    assert volume.meta["series_instance_uid"] == uid
    assert volume.meta["format"] == "metaimage" and volume.meta["source_path"] == str(tmp_path / f"{uid}.mhd")
    assert "series_instance_uid" not in read_image(write_image(small_volume(), tmp_path / "case1.mha")).meta


def test_nifti_4d_with_one_time_point_reads_as_3d(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(small_volume().array)
    image.SetSpacing((0.75, 1.25, 2.5))
    sitk.WriteImage(sitk.JoinSeries([image]), str(tmp_path / "t1.nii.gz"))
    volume = read_image(tmp_path / "t1.nii.gz")
    assert volume.shape_zyx == (4, 5, 6)
    assert volume.spacing_zyx == pytest.approx((2.5, 1.25, 0.75))
    np.testing.assert_array_equal(volume.array, small_volume().array)


# ---------------------------------------------------------------------------------------------- bad input


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(("name", "compress", "data_name"), [
    ("scan.mhd", False, "scan.raw"),
    ("scan.mhd", True, "scan.zraw"),
    ("scan.mha", False, "scan.mha"),
    ("scan.mha", True, "scan.mha"),
    ("scan.nii", None, "scan.nii"),
    ("scan.nrrd", False, "scan.nrrd"),
])
def test_truncated_data_refused(tmp_path: Path, name: str, compress: bool | None, data_name: str) -> None:
    write_image(small_volume(), tmp_path / name, compress=compress)
    _truncate(tmp_path / data_name, (tmp_path / data_name).stat().st_size - 7)
    with pytest.raises(InputError, match="truncated") as err:
        read_image(tmp_path / name)
    assert err.value.path == tmp_path / data_name


def test_truncated_nii_gz_refused(tmp_path: Path) -> None:
    write_image(small_volume(), tmp_path / "scan.nii.gz")
    _truncate(tmp_path / "scan.nii.gz", (tmp_path / "scan.nii.gz").stat().st_size // 2)
    with pytest.raises(InputError, match="truncated") as err:
        read_image(tmp_path / "scan.nii.gz")
    assert err.value.path == tmp_path / "scan.nii.gz"


def test_nifti_header_that_lies_refused(tmp_path: Path) -> None:
    # A complete, valid gzip stream whose header claims 40 slices where 4 are stored: ITK zero-fills.
    write_image(small_volume(), tmp_path / "scan.nii")
    data = bytearray((tmp_path / "scan.nii").read_bytes())
    data[46:48] = struct.pack("<h", 40)  # dim[3] (slices)
    (tmp_path / "lies.nii.gz").write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(InputError, match="truncated or inconsistent") as err:
        read_image(tmp_path / "lies.nii.gz")
    assert str(tmp_path / "lies.nii.gz") in str(err.value)


def test_metaimage_header_that_lies_refused(tmp_path: Path) -> None:
    write_image(small_volume(), tmp_path / "scan.mhd")
    header = (tmp_path / "scan.mhd").read_text()
    assert "DimSize = 6 5 4" in header
    (tmp_path / "scan.mhd").write_text(header.replace("DimSize = 6 5 4", "DimSize = 6 5 40"))
    # 6 x 5 x 40 int16 = 2400 bytes promised, 6 x 5 x 4 x 2 = 240 stored
    with pytest.raises(InputError, match="2400 bytes of image data but only 240") as err:
        read_image(tmp_path / "scan.mhd")
    assert err.value.path == tmp_path / "scan.raw"


def test_missing_data_file_refused(tmp_path: Path) -> None:
    write_image(small_volume(), tmp_path / "scan.mhd")
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(InputError, match="does not exist") as err:
        read_image(tmp_path / "scan.mhd")
    assert err.value.path == tmp_path / "scan.mhd" and "scan.raw" in str(err.value)


def test_missing_nhdr_data_file_refused(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(small_volume().array)
    sitk.WriteImage(image, str(tmp_path / "scan.nhdr"))
    assert read_image(tmp_path / "scan.nhdr").shape_zyx == (4, 5, 6)
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(InputError, match="does not exist") as err:
        read_image(tmp_path / "scan.nhdr")
    assert err.value.path == tmp_path / "scan.nhdr"


def test_truncated_gzip_nrrd_refused_via_itk(tmp_path: Path) -> None:
    write_image(small_volume(), tmp_path / "scan.nrrd", compress=True)
    _truncate(tmp_path / "scan.nrrd", (tmp_path / "scan.nrrd").stat().st_size - 20)
    with pytest.raises(InputError, match="cannot read as nrrd") as err:
        read_image(tmp_path / "scan.nrrd")
    assert err.value.path == tmp_path / "scan.nrrd"
    assert "Exception thrown" not in str(err.value)  # ITK's boilerplate is trimmed


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.nii", "garbage.nrrd", "garbage.mha"])
def test_garbage_file_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(os.urandom(600))
    with pytest.raises(InputError) as err:
        read_image(tmp_path / name)
    assert str(tmp_path / name) in str(err.value)


def test_4d_2d_and_vector_images_refused(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(small_volume().array)
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(tmp_path / "time.nii.gz"))
    with pytest.raises(InputError, match="4D image") as err:
        read_image(tmp_path / "time.nii.gz")
    assert err.value.path == tmp_path / "time.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "flat.mha"))
    with pytest.raises(InputError, match="2D image"):
        read_image(tmp_path / "flat.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True),
                    str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="3 components"):
        read_image(tmp_path / "rgb.nrrd")


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"supported: \.nii\.gz, \.nii, \.mhd"):
        read_image(tmp_path / "scan.png")
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "absent.nii.gz")
    with pytest.raises(InputError, match="cannot write this file type"):
        write_image(small_volume(), tmp_path / "scan.png")
    with pytest.raises(InputError, match="use .nii.gz"):
        write_image(small_volume(), tmp_path / "scan.nii", compress=True)
    with pytest.raises(InputError, match="use .nii"):
        write_image(small_volume(), tmp_path / "scan.nii.gz", compress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize(("name", "compress"), FORMATS, ids=FORMAT_IDS)
def test_parent_that_is_a_file_leaves_nothing(tmp_path: Path, name: str, compress: bool | None) -> None:
    (tmp_path / "occupied").write_text("a file, not a folder")
    with pytest.raises(InputError, match="cannot write") as err:
        write_image(small_volume(), tmp_path / "occupied" / name, compress=compress)
    assert str(tmp_path / "occupied") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="cannot write"):
            write_image(small_volume(), folder / "scan.mhd")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def _crashing_writer(real_write):  # type: ignore[no-untyped-def]
    """A SimpleITK WriteImage that writes the files, then damages them and fails, as a crash would."""

    def write(image: sitk.Image, name: str, useCompression: bool = False) -> None:  # SimpleITK keyword name
        folder = Path(name).parent
        existing = set(folder.iterdir())
        real_write(image, name, useCompression=useCompression)
        for p in set(folder.iterdir()) - existing:  # only what this write created
            p.write_bytes(p.read_bytes()[:10])
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: x.cxx:1:\nITK ERROR: disk full")

    return write


@pytest.mark.parametrize(("name", "compress"), FORMATS, ids=FORMAT_IDS)
def test_failed_write_keeps_previous_file_and_leaves_no_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 name: str, compress: bool | None) -> None:
    old = small_volume(dtype=np.uint8)
    write_image(old, tmp_path / name, compress=compress)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(image_files.sitk, "WriteImage", _crashing_writer(sitk.WriteImage))
    with pytest.raises(InputError, match="cannot write: ITK ERROR: disk full") as err:
        write_image(small_volume(dtype=np.float32), tmp_path / name, compress=compress)
    assert err.value.path == tmp_path / name
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp, old pair intact
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(tmp_path / name).array, old.array)


def test_mhd_overwrite_replaces_the_pair(tmp_path: Path) -> None:
    write_image(small_volume(dtype=np.uint8), tmp_path / "scan.mhd")
    new = small_volume(dtype=np.float64)
    write_image(new, tmp_path / "scan.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.mhd", "scan.raw"]
    back = read_image(tmp_path / "scan.mhd")
    assert back.array.dtype == np.float64
    np.testing.assert_array_equal(back.array, new.array)


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        for name in ("a.nii.gz", "b.mhd"):
            write_image(small_volume(), tmp_path / name)
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.nii.gz": 0o644, "b.mhd": 0o644, "b.raw": 0o644}
