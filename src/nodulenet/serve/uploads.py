"""Uploads of ``POST /v1/jobs``: streamed to disk under a byte limit, checked, unpacked inside the job folder.

Request: ``multipart/form-data`` with

- one ``file`` part: a ``.zip`` (a DICOM series, or one image file with its data file), ``.nii``, ``.nii.gz``,
  ``.nrrd`` (attached data) or ``.mha``; or two ``file`` parts: a ``.mhd`` header and the ``.raw``/``.zraw`` it
  names in ``ElementDataFile``;
- optional fields ``threshold`` (0..1), ``label_format`` (nii.gz | nii | nrrd), ``dicom_outputs`` (true/false) and,
  for a DICOM zip, ``scan_member``: the path inside the zip of one slice whose series to read (default: the largest
  CT series, as for a local folder).

Rules (each refusal is a :class:`UploadError` with the HTTP status and a one-line reason naming the file/member):

- the body is counted while it streams: past ``max_upload_bytes`` it stops with 413 (nothing is kept);
- file names are reduced to their last path component and ``[A-Za-z0-9._+-]``;
- a zip is checked completely BEFORE anything is unpacked: absolute paths, ``..`` components, symlinks and other
  special members -> 400; more than ``max_members`` files, more than ``max_unpacked_bytes`` in all, or one member
  whose compression ratio is above ``max_ratio`` (a zip bomb) -> 413; encrypted members -> 400. Unpacking writes only
  regular files, created new (``O_EXCL | O_NOFOLLOW``) under ``<job>/input/``, and counts the bytes again (a zip
  header can lie);
- scans never reference files outside the job: a MetaImage's ``ElementDataFile`` must be ``LOCAL`` or a plain file
  name beside the header; a ``.nrrd`` with detached data (``data file:``) is refused;
- a suffix whose content does not match (a ``.nii.gz`` that is not gzip) and unknown types -> 415.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from nodulenet.errors import InputError
from nodulenet.io.header_text import parse_metaimage_header

ACCEPTED = ".zip (a DICOM series or one image), .nii, .nii.gz, .nrrd, .mha, or .mhd with its .raw/.zraw"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
DATA_SUFFIXES = (".raw", ".zraw")
LABEL_FORMATS = ("nii.gz", "nii", "nrrd")
FIELDS = ("threshold", "label_format", "dicom_outputs", "scan_member")
MAX_FILE_PARTS = 2
MAX_FIELD_BYTES = 4096
CHUNK = 1 << 20
# Below this size a high compression ratio is harmless (and common: a small all-padding slice).
RATIO_CHECK_MIN_BYTES = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UploadError(Exception):
    """An upload refused with HTTP ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {detail}")


@dataclass
class UploadedFile:
    field: str
    name: str  # sanitised
    path: Path
    bytes: int = 0


@dataclass
class Upload:
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0


@dataclass(frozen=True)
class ZipLimits:
    max_members: int
    max_unpacked_bytes: int
    max_ratio: float


@dataclass(frozen=True)
class JobInput:
    """The scan of a job: ``scan_path`` relative to the job folder (inside ``input/``)."""

    kind: str  # nifti | nrrd | metaimage | dicom-zip | image-zip
    name: str  # the uploaded file name (sanitised)
    scan_path: str
    bytes: int


def safe_filename(raw: str) -> str:
    """The last path component of ``raw`` with anything but ``[A-Za-z0-9._+-]`` replaced by ``_``."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = _UNSAFE.sub("_", base).lstrip(".")
    if not name:
        raise UploadError(400, f"file name {raw!r} is not usable")
    if len(name) > 200:
        suffix = next((s for s in (*IMAGE_SUFFIXES, *DATA_SUFFIXES, ".zip") if name.lower().endswith(s)), "")
        name = name[: 200 - len(suffix)] + suffix
    return name


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB"


# ---------------------------------------------------------------------------------------- multipart stream


class MultipartReceiver:
    """Parse a ``multipart/form-data`` body chunk by chunk, writing file parts into ``staging`` as they arrive.

    Call :meth:`feed` per received chunk (raises :class:`UploadError` 413 as soon as the body passes
    ``max_bytes``), then :meth:`finish`. Memory use is one chunk plus the small form fields.
    """

    def __init__(self, staging: Path, content_type: str | None, max_bytes: int) -> None:
        ctype, params = parse_options_header(content_type or "")
        if ctype != b"multipart/form-data":
            raise UploadError(415, f"POST /v1/jobs takes multipart/form-data (a 'file' part), got "
                                   f"{(content_type or 'no Content-Type')[:80]!r}")
        boundary = params.get(b"boundary")
        if not boundary:
            raise UploadError(400, "multipart/form-data without a boundary")
        self.staging = staging
        self.max_bytes = max_bytes
        self.upload = Upload()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._file: Any = None
        self._current: UploadedFile | None = None
        self._field_name: str | None = None
        self._field_value = bytearray()
        self._ended = False
        callbacks = {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field_cb, "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def feed(self, chunk: bytes) -> None:
        self.upload.total_bytes += len(chunk)
        if self.upload.total_bytes > self.max_bytes:
            raise UploadError(413, f"the upload is larger than the server's limit of {_mb(self.max_bytes)}")
        try:
            self._parser.write(chunk)
        except UploadError:
            raise
        except Exception as exc:  # noqa: BLE001 - python-multipart raises its own errors on a malformed body
            raise UploadError(400, f"malformed multipart body ({exc})") from None

    def finish(self) -> Upload:
        try:
            self._parser.finalize()
        except Exception as exc:  # noqa: BLE001
            raise UploadError(400, f"malformed multipart body ({exc})") from None
        self.close()
        if not self._ended:
            raise UploadError(400, "the upload ended before its multipart body was complete")
        if not self.upload.files:
            raise UploadError(400, f"no 'file' part in the upload; send the scan as {ACCEPTED}")
        return self.upload

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- parser callbacks ----------------------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise UploadError(400, "a multipart part without 'Content-Disposition: form-data; name=...'")
        name = params[b"name"].decode("utf-8", "replace")
        if b"filename" in params:
            if name != "file":
                raise UploadError(400, f"file part named {name!r}; send files as 'file' parts")
            if len(self.upload.files) >= MAX_FILE_PARTS:
                raise UploadError(400, f"more than {MAX_FILE_PARTS} files in one upload; send {ACCEPTED}")
            filename = safe_filename(params[b"filename"].decode("utf-8", "replace"))
            if any(f.name == filename for f in self.upload.files):
                raise UploadError(400, f"two files named {filename!r} in one upload")
            path = self.staging / filename
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self._file = os.fdopen(fd, "wb")
            self._current = UploadedFile(field=name, name=filename, path=path)
            self.upload.files.append(self._current)
        else:
            if name not in FIELDS:
                raise UploadError(400, f"unknown form field {name!r}; accepted: file, {', '.join(FIELDS)}")
            if name in self.upload.fields:
                raise UploadError(400, f"form field {name!r} given twice")
            self._field_name = name
            self._field_value = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            assert self._current is not None
            self._current.bytes += end - start
        elif self._field_name is not None:
            self._field_value += data[start:end]
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise UploadError(400, f"form field {self._field_name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._file is not None:
            self.close()
            self._current = None
        elif self._field_name is not None:
            self.upload.fields[self._field_name] = self._field_value.decode("utf-8", "replace").strip()
            self._field_name = None

    def _end(self) -> None:
        self._ended = True


# -------------------------------------------------------------------------------------------- options


def parse_job_options(fields: dict[str, str], default_threshold: float) -> dict[str, Any]:
    """The job's options from the form fields; 400 for values out of range."""
    options: dict[str, Any] = {"threshold": default_threshold, "label_format": "nii.gz", "dicom_outputs": True}
    if "threshold" in fields:
        try:
            value = float(fields["threshold"])
        except ValueError:
            raise UploadError(400, f"threshold must be a number in [0, 1], got {fields['threshold']!r}") from None
        if not 0.0 <= value <= 1.0:
            raise UploadError(400, f"threshold must be a probability in [0, 1], got {value}")
        options["threshold"] = value
    if "label_format" in fields:
        if fields["label_format"] not in LABEL_FORMATS:
            raise UploadError(400, f"label_format must be one of {', '.join(LABEL_FORMATS)}, "
                                   f"got {fields['label_format']!r}")
        options["label_format"] = fields["label_format"]
    if "dicom_outputs" in fields:
        text = fields["dicom_outputs"].lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise UploadError(400, f"dicom_outputs must be true or false, got {fields['dicom_outputs']!r}")
        options["dicom_outputs"] = text in ("true", "1", "yes")
    return options


# ------------------------------------------------------------------------------------------ type checks


def _suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    low = name.lower()
    return next((s for s in suffixes if low.endswith(s)), None)


def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _check_image_content(path: Path, shown: str) -> str:
    """The input kind of an image file, after checking its content matches its suffix (415 otherwise)."""
    suffix = _suffix(path.name, IMAGE_SUFFIXES)
    head = _head(path, 64 * 1024)
    if suffix == ".nii.gz":
        if not head.startswith(b"\x1f\x8b"):
            raise UploadError(415, f"{shown}: not a gzip-compressed NIfTI file")
        return "nifti"
    if suffix == ".nii":
        sizes = (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
        if len(head) < 348 or not {348, 540} & set(sizes):
            raise UploadError(415, f"{shown}: not a NIfTI file (no NIfTI-1/2 header)")
        return "nifti"
    if suffix == ".nrrd":
        if not head.startswith(b"NRRD"):
            raise UploadError(415, f"{shown}: not an NRRD file (no NRRD magic)")
        ends = [i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n")) if i >= 0]
        if not ends:  # the whole header must be seen to know it names no other file
            raise UploadError(400, f"{shown}: NRRD header longer than {len(head)} bytes (or no data after it)")
        header = head[: min(ends)]
        for line in header.splitlines():
            key = line.split(b":", 1)[0].strip().lower()
            if key in (b"data file", b"datafile"):
                raise UploadError(400, f"{shown}: NRRD with detached data ('data file:') is not accepted; send an "
                                       "attached .nrrd (data in the same file)")
        return "nrrd"
    if suffix in (".mha", ".mhd"):
        _check_metaimage_reference(path, head, shown)
        return "metaimage"
    raise UploadError(415, f"{shown}: unsupported file type; send {ACCEPTED}")


def _check_metaimage_reference(path: Path, head: bytes, shown: str) -> None:
    """A MetaImage header's data must be in the file itself (``LOCAL``) or a plain file name beside it."""
    try:
        header = parse_metaimage_header(head, shown)
    except InputError:
        raise UploadError(415, f"{shown}: not a MetaImage header (no ElementDataFile line)") from None
    if header.local:
        return
    target = header.data_file
    if not header.plain_file_name:
        raise UploadError(400, f"{shown}: ElementDataFile = {target!r} must be LOCAL or the plain name of a data "
                               "file uploaded beside the header")
    data = path.parent / target
    if not data.is_file() or data.is_symlink():
        raise UploadError(400, f"{shown}: its data file {target!r} (ElementDataFile) is not in the upload; send the "
                               ".mhd and its .raw/.zraw together")


# --------------------------------------------------------------------------------------------------- zip


def zip_member_parts(name: str) -> list[str]:
    """The path components of a zip member, or :class:`UploadError` 400 if it could land outside the folder."""
    if _CONTROL.search(name):
        raise UploadError(400, f"zip member {name!r}: control characters in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UploadError(400, f"zip member {name!r} has an absolute path (refused: it would land outside the job "
                               "folder)")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UploadError(400, f"zip member {name!r} escapes the job folder ('..' in its path)")
    if not parts or any(len(p.encode()) > 255 for p in parts):
        raise UploadError(400, f"zip member {name!r}: empty or over-long path")
    return parts


def zip_entry_count(path: Path) -> int | None:
    """The number of entries the zip's end-of-central-directory record declares (zip64 too), read from the file's
    end, or None when it cannot be found. Read BEFORE zipfile loads the whole central directory into memory."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        count = int.from_bytes(tail[at + 10: at + 12], "little")
        if count != 0xFFFF:
            return count
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if locator < 0:
            return None
        f.seek(int.from_bytes(tail[locator + 8: locator + 16], "little"))
        record = f.read(56)
        if not record.startswith(b"PK\x06\x06") or len(record) < 40:
            return None
        return int.from_bytes(record[32:40], "little")


def check_zip(path: Path, limits: ZipLimits, shown: str) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Every regular-file member with its safe path parts, after checking the WHOLE archive (nothing unpacked)."""
    declared = zip_entry_count(path)
    # folders are entries too: allow as many of them as files before refusing to even list the archive
    if declared is not None and declared > 2 * limits.max_members:
        raise UploadError(413, f"{shown}: {declared} entries in the zip, more than the server's limit of "
                               f"{limits.max_members} files")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(400, f"{shown}: not a valid zip archive ({exc})") from None
    members: list[tuple[zipfile.ZipInfo, list[str]]] = []
    seen: set[tuple[str, ...]] = set()
    total = 0
    with archive:
        for info in archive.infolist():
            parts = zip_member_parts(info.filename)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if stat.S_ISLNK(mode):
                raise UploadError(400, f"{shown}: zip member {info.filename!r} is a symbolic link (refused)")
            if info.is_dir() or kind == stat.S_IFDIR:
                continue
            if kind not in (0, stat.S_IFREG):
                raise UploadError(400, f"{shown}: zip member {info.filename!r} is not a regular file (refused)")
            if info.flag_bits & 0x1:
                raise UploadError(400, f"{shown}: zip member {info.filename!r} is encrypted")
            key = tuple(parts)
            if key in seen:
                raise UploadError(400, f"{shown}: zip member {info.filename!r} appears twice")
            seen.add(key)
            members.append((info, parts))
            if len(members) > limits.max_members:
                raise UploadError(413, f"{shown}: more than {limits.max_members} files in the zip (the server's "
                                       "limit)")
            total += info.file_size
            if total > limits.max_unpacked_bytes:
                raise UploadError(413, f"{shown}: unpacks to more than the server's limit of "
                                       f"{_mb(limits.max_unpacked_bytes)}")
            if info.file_size > RATIO_CHECK_MIN_BYTES:
                ratio = info.file_size / max(info.compress_size, 1)
                if ratio > limits.max_ratio:
                    raise UploadError(413, f"{shown}: zip member {info.filename!r} expands {ratio:.0f}:1 "
                                           f"(limit {limits.max_ratio:g}:1; a zip bomb?)")
    return members


def extract_zip(path: Path, members: list[tuple[zipfile.ZipInfo, list[str]]], root: Path, limits: ZipLimits,
                shown: str) -> list[Path]:
    """Unpack the checked ``members`` under ``root`` (regular files only, created new); returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    base = os.path.realpath(root)
    written = 0
    out: list[Path] = []
    with zipfile.ZipFile(path) as archive:
        for info, parts in members:
            target = root.joinpath(*parts)
            if os.path.commonpath([base, os.path.realpath(target.parent)]) != base:
                raise UploadError(400, f"{shown}: zip member {info.filename!r} escapes the job folder")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise UploadError(400, f"{shown}: zip member {info.filename!r} cannot be unpacked "
                                       f"({exc.strerror})") from None
            with os.fdopen(fd, "wb") as dst, archive.open(info) as src:
                try:
                    while block := src.read(CHUNK):
                        written += len(block)
                        if written > limits.max_unpacked_bytes:
                            raise UploadError(413, f"{shown}: unpacks to more than the server's limit of "
                                                   f"{_mb(limits.max_unpacked_bytes)}")
                        dst.write(block)
                except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as exc:
                    raise UploadError(400, f"{shown}: zip member {info.filename!r} is damaged ({exc})") from None
            out.append(target)
    return out


def _is_dicom(path: Path) -> bool:
    head = _head(path, 132)
    return len(head) == 132 and head[128:132] == b"DICM"


# ------------------------------------------------------------------------------------------------ input


def prepare_input(upload: Upload, job_dir: Path, limits: ZipLimits) -> JobInput:
    """Check the uploaded files (in ``job_dir/upload``) and place the scan under ``job_dir/input``."""
    staging = job_dir / "upload"
    input_dir = job_dir / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    files = upload.files
    names = [f.name for f in files]
    total = sum(f.bytes for f in files)
    if len(files) == 2:
        headers = [f for f in files if f.name.lower().endswith(".mhd")]
        data = [f for f in files if _suffix(f.name, DATA_SUFFIXES)]
        if len(headers) != 1 or len(data) != 1:
            raise UploadError(400, f"two files ({', '.join(names)}): only a .mhd header and its .raw/.zraw data "
                                   f"file go together; send anything else as one file or a zip")
        for f in files:
            os.replace(f.path, input_dir / f.name)
        scan = input_dir / headers[0].name
        _check_image_content(scan, headers[0].name)
        return JobInput("metaimage", headers[0].name, _relative(scan, job_dir), total)
    upload_file = files[0]
    shown = upload_file.name
    if shown.lower().endswith(".zip"):
        if not _head(upload_file.path, 4).startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise UploadError(415, f"{shown}: not a zip archive")
        members = check_zip(upload_file.path, limits, shown)
        extracted = extract_zip(upload_file.path, members, input_dir, limits, shown)
        upload_file.path.unlink()
        return _scan_in_zip(extracted, input_dir, job_dir, upload, shown, total)
    if _suffix(shown, DATA_SUFFIXES) or shown.lower().endswith(".mhd"):
        raise UploadError(400, f"{shown}: a .mhd header and its .raw/.zraw data file must be sent together (two "
                               "'file' parts, or both in a zip)")
    if _suffix(shown, IMAGE_SUFFIXES) is None:
        raise UploadError(415, f"{shown}: unsupported file type; send {ACCEPTED}")
    scan = input_dir / shown
    os.replace(upload_file.path, scan)
    kind = _check_image_content(scan, shown)
    shutil.rmtree(staging, ignore_errors=True)
    return JobInput(kind, shown, _relative(scan, job_dir), total)


def _relative(path: Path, job_dir: Path) -> str:
    return path.relative_to(job_dir).as_posix()


def _scan_in_zip(extracted: list[Path], input_dir: Path, job_dir: Path, upload: Upload, shown: str,
                 total: int) -> JobInput:
    images = [p for p in extracted if _suffix(p.name, IMAGE_SUFFIXES)]
    if len(images) > 1:
        listed = ", ".join(p.relative_to(input_dir).as_posix() for p in images[:5])
        raise UploadError(400, f"{shown}: holds {len(images)} image files ({listed}); send one scan per job")
    if images:
        scan = images[0]
        _check_image_content(scan, f"{shown}:{scan.relative_to(input_dir).as_posix()}")
        return JobInput("image-zip", shown, _relative(scan, job_dir), total)
    dicom = [p for p in extracted if _is_dicom(p)]
    if not dicom:
        raise UploadError(415, f"{shown}: the zip holds neither DICOM files (with the DICM preamble) nor an image "
                               f"file; send {ACCEPTED}")
    member = upload.fields.get("scan_member")
    if member:
        wanted = input_dir.joinpath(*zip_member_parts(member))
        if wanted not in dicom:
            raise UploadError(400, f"{shown}: scan_member {member!r} is not a DICOM file in the zip")
        return JobInput("dicom-zip", shown, _relative(wanted, job_dir), total)
    return JobInput("dicom-zip", shown, _relative(input_dir, job_dir), total)
