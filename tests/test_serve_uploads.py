"""Upload checks of the server, in-process (no model, no subprocess): the streamed byte limit, zip-slip, absolute
paths, symlink members, zip bombs, MetaImage/NRRD references outside the job, type detection. Each refusal has the
right status, names the file or member, and leaves nothing behind - inside or outside the job folder."""

from __future__ import annotations

import gzip
import os
import stat
import zipfile
from pathlib import Path

import pytest

from nodulenet.serve.uploads import (MultipartReceiver, Upload, UploadedFile, UploadError, ZipLimits, check_zip,
                                     extract_zip, parse_job_options, prepare_input, safe_filename, zip_member_parts)

LIMITS = ZipLimits(max_members=50, max_unpacked_bytes=20_000_000, max_ratio=200.0)
NIFTI_HEADER = (348).to_bytes(4, "little") + b"\0" * 344 + b"n+1\0"


def make_zip(path: Path, members: list[tuple[str, bytes]], *, symlinks: dict[str, str] | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip written member by member, names exactly as given (zipfile itself never sanitises when writing)."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            archive.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def _job(tmp_path: Path, name: str, data: bytes, fields: dict[str, str] | None = None) -> tuple[Path, Upload]:
    job_dir = tmp_path / "jobs" / ("a" * 32)
    (job_dir / "upload").mkdir(parents=True)
    path = job_dir / "upload" / name
    path.write_bytes(data)
    return job_dir, Upload(files=[UploadedFile("file", name, path, len(data))], fields=fields or {})


def _all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("member, words", [
    ("../../evil.txt", "escapes the job folder"),
    ("ok/../../evil.txt", "escapes the job folder"),
    ("..\\..\\evil.txt", "escapes the job folder"),
    ("/tmp/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
])
def test_zip_slip_and_absolute_members_are_refused_before_anything_is_unpacked(tmp_path: Path, member: str,
                                                                              words: str) -> None:
    archive = make_zip(tmp_path / "scan.zip", [("dicom/0001.dcm", b"x" * 10), (member, b"owned")])
    with pytest.raises(UploadError) as err:
        check_zip(archive, LIMITS, "scan.zip")
    assert err.value.status == 400 and words in err.value.detail and repr(member) in err.value.detail
    assert _all_files(tmp_path) == {"scan.zip"}


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "scan.zip", [("a.dcm", b"x")], symlinks={"link.dcm": "/etc/passwd"})
    with pytest.raises(UploadError) as err:
        check_zip(archive, LIMITS, "scan.zip")
    assert err.value.status == 400 and "'link.dcm' is a symbolic link" in err.value.detail


def test_zip_bomb_is_refused_by_compression_ratio_and_total_size(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", [("zeros.dcm", b"\0" * 8_000_000)])
    assert bomb.stat().st_size < 50_000  # 8 MB of zeros deflate to a few kB
    with pytest.raises(UploadError) as err:
        check_zip(bomb, LIMITS, "bomb.zip")
    assert err.value.status == 413 and "'zeros.dcm' expands" in err.value.detail and "zip bomb" in err.value.detail
    big = make_zip(tmp_path / "big.zip", [(f"{i}.dcm", os.urandom(1000)) for i in range(3)],
                   compression=zipfile.ZIP_STORED)
    with pytest.raises(UploadError) as err:
        check_zip(big, ZipLimits(max_members=50, max_unpacked_bytes=2500, max_ratio=200.0), "big.zip")
    assert err.value.status == 413 and "unpacks to more than" in err.value.detail
    many = make_zip(tmp_path / "many.zip", [(f"{i}.dcm", b"x") for i in range(51)])
    with pytest.raises(UploadError) as err:
        check_zip(many, LIMITS, "many.zip")
    assert err.value.status == 413 and "more than 50 files" in err.value.detail


def test_damaged_member_is_caught_while_unpacking(tmp_path: Path) -> None:
    """Headers that pass the checks but data that does not match its CRC: refused, not used half-written."""
    payload = os.urandom(5000)
    archive = make_zip(tmp_path / "bad.zip", [("a.dcm", payload)], compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    at = raw.index(payload[:64]) + 100
    raw[at] ^= 0xFF  # one flipped byte in the member's data
    archive.write_bytes(bytes(raw))
    members = check_zip(archive, LIMITS, "bad.zip")
    with pytest.raises(UploadError) as err:
        extract_zip(archive, members, tmp_path / "input", LIMITS, "bad.zip")
    assert err.value.status == 400 and "'a.dcm' is damaged" in err.value.detail


def test_valid_zip_unpacks_only_inside_the_folder(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ok.zip", [("series/./0001.dcm", b"a"), ("series/sub/0002.dcm", b"b"),
                                             ("series/", b"")])
    members = check_zip(archive, LIMITS, "ok.zip")
    written = extract_zip(archive, members, tmp_path / "input", LIMITS, "ok.zip")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == ["input/series/0001.dcm",
                                                                           "input/series/sub/0002.dcm"]
    assert zip_member_parts("a/./b//c.dcm") == ["a", "b", "c.dcm"]


def test_multipart_stream_stops_at_the_byte_limit(tmp_path: Path) -> None:
    body = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="../../x.nii.gz"\r\n\r\n' + b"a" * 5000
            + b"\r\n--XX--\r\n")
    receiver = MultipartReceiver(tmp_path, "multipart/form-data; boundary=XX", max_bytes=4000)
    with pytest.raises(UploadError) as err:
        for i in range(0, len(body), 1000):
            receiver.feed(body[i:i + 1000])
    receiver.close()
    assert err.value.status == 413 and "4000" not in err.value.detail and "0.004 MB" in err.value.detail
    # the part was being written under its sanitised name, inside the staging folder only
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
    ok = MultipartReceiver(tmp_path / "b", "multipart/form-data; boundary=XX", max_bytes=10_000)
    (tmp_path / "b").mkdir()
    for i in range(0, len(body), 7):  # boundaries split across chunks
        ok.feed(body[i:i + 7])
    upload = ok.finish()
    assert [(f.name, f.bytes) for f in upload.files] == [("x.nii.gz", 5000)]
    assert (tmp_path / "b" / "x.nii.gz").read_bytes() == b"a" * 5000


@pytest.mark.parametrize("content_type, status", [("application/json", 415), ("multipart/form-data", 400)])
def test_multipart_content_type_is_checked(tmp_path: Path, content_type: str, status: int) -> None:
    with pytest.raises(UploadError) as err:
        MultipartReceiver(tmp_path, content_type, 100)
    assert err.value.status == status


def test_truncated_multipart_body_is_refused(tmp_path: Path) -> None:
    receiver = MultipartReceiver(tmp_path, "multipart/form-data; boundary=XX", 10_000)
    receiver.feed(b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.nii"\r\n\r\nabc')
    with pytest.raises(UploadError) as err:
        receiver.finish()
    assert err.value.status == 400 and "ended before" in err.value.detail


def test_options_are_validated() -> None:
    assert parse_job_options({}, 0.5) == {"threshold": 0.5, "label_format": "nii.gz", "dicom_outputs": True}
    assert parse_job_options({"threshold": "0.9", "label_format": "nrrd", "dicom_outputs": "false"}, 0.5) == {
        "threshold": 0.9, "label_format": "nrrd", "dicom_outputs": False}
    for bad in ({"threshold": "1.5"}, {"threshold": "high"}, {"label_format": "png"}, {"dicom_outputs": "maybe"}):
        with pytest.raises(UploadError) as err:
            parse_job_options(bad, 0.5)
        assert err.value.status == 400


def test_file_names_are_reduced_to_a_safe_last_component() -> None:
    assert safe_filename("C:\\Users\\me\\scan 1.nii.gz") == "scan_1.nii.gz"
    assert safe_filename("../../.hidden.nrrd") == "hidden.nrrd"
    with pytest.raises(UploadError):
        safe_filename("../")


def test_image_uploads_are_placed_in_input_and_typed(tmp_path: Path) -> None:
    job_dir, upload = _job(tmp_path, "scan.nii.gz", gzip.compress(NIFTI_HEADER))
    got = prepare_input(upload, job_dir, LIMITS)
    assert (got.kind, got.scan_path) == ("nifti", "input/scan.nii.gz")
    assert _all_files(job_dir) == {"input/scan.nii.gz"}


@pytest.mark.parametrize("name, data, status, words", [
    ("scan.nii.gz", b"not gzip at all", 415, "not a gzip-compressed NIfTI"),
    ("scan.nii", b"\0" * 400, 415, "not a NIfTI file"),
    ("scan.png", b"\x89PNG", 415, "unsupported file type"),
    ("scan.nrrd", b"NRRD0004\ntype: short\ndata file: /etc/passwd\n\n", 400, "detached data"),
    ("scan.mha", b"ObjectType = Image\nElementDataFile = ../../etc/passwd\n", 400, "must be LOCAL"),
    ("scan.mhd", b"ObjectType = Image\nElementDataFile = scan.raw\n", 400, "must be sent together"),
    ("scan.zip", b"PK\x03\x04 but truncated", 400, "not a valid zip"),
    ("scan.zip", b"hello", 415, "not a zip archive"),
])
def test_bad_single_files_are_refused(tmp_path: Path, name: str, data: bytes, status: int, words: str) -> None:
    job_dir, upload = _job(tmp_path, name, data)
    with pytest.raises(UploadError) as err:
        prepare_input(upload, job_dir, LIMITS)
    assert err.value.status == status and words in err.value.detail and name in err.value.detail


def test_mhd_pair_must_reference_its_uploaded_data_file(tmp_path: Path) -> None:
    header = b"ObjectType = Image\nNDims = 3\nElementDataFile = other.raw\n"
    job_dir, upload = _job(tmp_path, "scan.mhd", header)
    raw = job_dir / "upload" / "scan.raw"
    raw.write_bytes(b"\0" * 8)
    upload.files.append(UploadedFile("file", "scan.raw", raw, 8))
    with pytest.raises(UploadError) as err:
        prepare_input(upload, job_dir, LIMITS)
    assert err.value.status == 400 and "'other.raw'" in err.value.detail and "not in the upload" in err.value.detail


def test_zip_content_decides_the_scan(tmp_path: Path) -> None:
    dicom = b"\0" * 128 + b"DICM" + b"\0" * 10
    make_zip(tmp_path / "s.zip", [("pt/series/1.dcm", dicom), ("pt/series/2.dcm", dicom), ("pt/notes.xml", b"<a/>")])
    job_dir, upload = _job(tmp_path, "s.zip", (tmp_path / "s.zip").read_bytes(), {"scan_member": "pt/series/2.dcm"})
    got = prepare_input(upload, job_dir, LIMITS)
    assert (got.kind, got.scan_path) == ("dicom-zip", "input/pt/series/2.dcm")
    assert "upload/s.zip" not in _all_files(job_dir)
    two = make_zip(tmp_path / "two.zip", [("a.nii.gz", gzip.compress(NIFTI_HEADER)), ("b.nrrd", b"NRRD0004\n\n")])
    job_dir, upload = _job(tmp_path / "t", "two.zip", two.read_bytes())
    with pytest.raises(UploadError) as err:
        prepare_input(upload, job_dir, LIMITS)
    assert err.value.status == 400 and "holds 2 image files" in err.value.detail
    junk = make_zip(tmp_path / "junk.zip", [("readme.txt", b"hello")])
    job_dir, upload = _job(tmp_path / "j", "junk.zip", junk.read_bytes())
    with pytest.raises(UploadError) as err:
        prepare_input(upload, job_dir, LIMITS)
    assert err.value.status == 415 and "neither DICOM" in err.value.detail


def test_huge_central_directory_is_refused_before_it_is_read(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "dirs.zip", [(f"d{i}/", b"") for i in range(120)])
    from nodulenet.serve.uploads import zip_entry_count

    assert zip_entry_count(archive) == 120
    with pytest.raises(UploadError) as err:
        check_zip(archive, LIMITS, "dirs.zip")
    assert err.value.status == 413 and "120 entries" in err.value.detail


def test_nrrd_header_must_end_within_what_is_checked(tmp_path: Path) -> None:
    job_dir, upload = _job(tmp_path, "long.nrrd", b"NRRD0004\n" + b"# comment\n" * 7000 + b"data file: /etc/x\n\n")
    with pytest.raises(UploadError) as err:
        prepare_input(upload, job_dir, LIMITS)
    assert err.value.status == 400 and "header longer" in err.value.detail
