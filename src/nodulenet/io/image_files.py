"""Read and write single-volume image files (MetaImage, NIfTI, NRRD) as :class:`Volume` via SimpleITK.

Conventions (see DESIGN.md): ``Volume.array`` is ``(z, y, x)``, which is what
``sitk.GetArrayFromImage`` returns; SimpleITK's spacing/origin are ``(x, y, z)``, so ``spacing_zyx`` is
its spacing reversed; SimpleITK's direction (row-major 3x3, column c = index axis c in ``(i, j, k)``
order, LPS world) is our direction unchanged. NIfTI stores RAS; ITK converts to/from LPS on its own, so
world points in LPS survive a NIfTI round trip (tested).

Precision: MetaImage and NRRD store geometry as decimal doubles (exact round trip). NIfTI stores spacing
and origin as float32 (qform/sform), so they come back rounded to float32 (about 1e-5 mm for origins of
a few hundred mm).

Reading checks what ITK does not: a NIfTI or MetaImage whose data is shorter than its header promises is
silently zero-filled (NIfTI) or fails with a misleading "No such file or directory" (MetaImage) in ITK,
so the expected byte count is verified first and a clear :class:`InputError` names the file.

Writing is atomic: single-file formats go through :func:`atomic_path`; a ``.mhd`` header and its data
file are written into a private temp folder beside the target and moved into place data first, header
last (removing an older header first), so a reader either finds no header or a complete pair.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nodulenet.errors import InputError
from nodulenet.io.atomic import atomic_path
from nodulenet.io.header_text import (metaimage_element_bytes, nrrd_element_bytes, parse_metaimage_header,
                                      parse_nrrd_header, read_head)
from nodulenet.io.volume import Volume

# suffix -> format name; longest suffixes first so ".nii.gz" wins over ".gz".
IMAGE_FILE_FORMATS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".mhd": "metaimage",
    ".mha": "metaimage",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
}
WRITABLE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mhd", ".mha")

# LUNA16 names each .mhd after its SeriesInstanceUID; recognise such names so annotations can be matched.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")

def image_format(path: str | Path) -> tuple[str, str] | None:
    """``(suffix, format)`` for a supported image file name (case-insensitive), else None."""
    name = Path(path).name.lower()
    for suffix, fmt in IMAGE_FILE_FORMATS.items():
        if name.endswith(suffix):
            return suffix, fmt
    return None


# ---------------------------------------------------------------------------------------------- checks


def _truncated(path: Path, expected: int, actual: int, what: str = "image data") -> InputError:
    return InputError(path, f"truncated or inconsistent file: the header describes {expected} bytes of "
                            f"{what} but only {actual} are there")


def _check_metaimage(path: Path) -> None:
    """Data file present and as long as DimSize x ElementType says (ITK's own error is misleading)."""
    header = parse_metaimage_header(read_head(path), path)
    fields, data_name = header.fields, header.data_file
    if not header.local and header.list_or_pattern:
        return  # slice lists / patterns: leave them to ITK
    data_path = path if header.local else path.parent / data_name
    if not data_path.is_file():
        raise InputError(path, f"its data file {data_path} (ElementDataFile = {data_name}) does not exist")
    available = data_path.stat().st_size - (header.header_end if header.local else 0)
    element = metaimage_element_bytes(fields.get("elementtype", ""))
    try:
        dims = [int(v) for v in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except ValueError:
        return
    if element is None:
        return
    if fields.get("compresseddata", "false").lower() == "true":
        size = fields.get("compresseddatasize")
        if size is not None and size.isdigit() and available < int(size):
            raise _truncated(data_path, int(size), available, "compressed data")
        return
    expected = int(np.prod(dims)) * channels * element + max(header_size, 0)
    if available < expected:
        raise _truncated(data_path, expected, available)


def _gzip_trailer_size(path: Path) -> int:
    """The ISIZE field of a gzip file's trailer: its uncompressed size mod 2**32 (-1 if too short)."""
    if path.stat().st_size < 18:  # 10-byte gzip header + 8-byte trailer
        return -1
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int(struct.unpack("<I", f.read(4))[0])


def _count_gzip_bytes(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"truncated or corrupt gzip data ({exc})") from None
    return total


def _check_nifti(path: Path, gz: bool) -> None:
    """ITK zero-fills a NIfTI whose data is short; compare the header's byte count with what is there."""
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"cannot read the NIfTI header ({exc})") from None
    for endian in "<>":
        if len(head) >= 4 and struct.unpack(f"{endian}i", head[:4])[0] in (348, 540):
            break
    else:
        raise InputError(path, "not a NIfTI file (bad header size field)")
    if struct.unpack(f"{endian}i", head[:4])[0] == 348:
        if len(head) < 348:
            raise _truncated(path, 348, len(head), "header")
        dims = struct.unpack(f"{endian}8h", head[40:56])
        bitpix = struct.unpack(f"{endian}h", head[72:74])[0]
        vox_offset = int(struct.unpack(f"{endian}f", head[108:112])[0])
    else:
        if len(head) < 540:
            raise _truncated(path, 540, len(head), "header")
        bitpix = struct.unpack(f"{endian}h", head[14:16])[0]
        dims = struct.unpack(f"{endian}8q", head[16:80])
        vox_offset = struct.unpack(f"{endian}q", head[168:176])[0]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        raise InputError(path, f"invalid NIfTI header (dim[0] = {ndim}, bitpix = {bitpix})")
    expected = max(vox_offset, 348) + int(np.prod([max(d, 1) for d in dims[1 : ndim + 1]])) * bitpix // 8
    if not gz:
        actual = path.stat().st_size
    else:
        # The gzip trailer holds the payload size mod 2**32: a cheap test that decompresses everything
        # only when it disagrees (truncated, or a multi-member file).
        actual = _gzip_trailer_size(path)
        if actual != expected % 2**32:
            actual = _count_gzip_bytes(path)
    if actual < expected:
        raise _truncated(path, expected, actual)


def _check_nrrd(path: Path) -> None:
    """For raw-encoded NRRD, the data (attached or in ``data file``) must be as long as the header says."""
    head = read_head(path)
    header = parse_nrrd_header(head, path)
    fields, data_name = header.fields, header.data_file
    if data_name is not None:
        if data_name.upper().startswith("LIST") or " " in data_name:
            return
        data_path = path.parent / data_name
        if not data_path.is_file():
            raise InputError(path, f"its data file {data_path} does not exist")
        available = data_path.stat().st_size
    else:
        header_end = header.data_offset if header.data_offset is not None else len(head)
        data_path, available = path, path.stat().st_size - header_end
    if fields.get("encoding", "").lower() != "raw":
        return  # compressed encodings: the decompressor reports truncation itself
    element = nrrd_element_bytes(fields.get("type", ""))
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except (KeyError, ValueError):
        return
    if element is None:
        return
    expected = int(np.prod(sizes)) * element + max(byte_skip, 0)
    if available < expected:
        raise _truncated(data_path, expected, available)


# ITK refuses these headers with messages about its own objects ("Image(0x55...): Bad direction"); say what is
# wrong with the file instead.
_ITK_GEOMETRY_PROBLEMS = (
    ("orthonormal direction cosines", "the direction matrix (NIfTI qform/sform) is singular or not orthonormal, so "
                                      "the voxel axes have no valid orientation in the patient"),
    ("determinant is 0", "the direction matrix is singular (determinant 0), so the voxel axes do not span 3D space"),
    ("Zero-valued spacing", "a voxel axis has zero length (zero spacing or an all-zero direction vector)"),
)


def _itk_message(exc: RuntimeError) -> str:
    """The useful line of an ITK exception (drops 'Exception thrown in ... .cxx:NNN:' boilerplate)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception thrown") and ".cxx:" not in ln]
    return " ".join(useful or lines)[:400]


# ---------------------------------------------------------------------------------------------- reading


def _to_3d(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"vector/colour image ({image.GetNumberOfComponentsPerPixel()} components per "
                               "voxel); a CT scan or label map has one")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        # NIfTI writers often store a 3D scan as 4D with one time point; that is still one volume.
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size=size, index=[0, 0, 0, 0])
    if dim != 3:
        raise InputError(path, f"{dim}D image of size {image.GetSize()}; a 3D volume is needed")
    return image


def read_image(path: str | Path) -> Volume:
    """Read a 3D ``.mhd``/``.mha``/``.nii``/``.nii.gz``/``.nrrd``/``.nhdr`` file as a Volume (dtype kept)."""
    path = Path(path)
    found = image_format(path)
    if found is None:
        raise InputError(path, f"unsupported image file type; supported: {', '.join(IMAGE_FILE_FORMATS)}")
    suffix, fmt = found
    if not path.is_file():
        raise InputError(path, "file does not exist" if not path.exists() else "is not a file")
    if fmt == "metaimage":
        _check_metaimage(path)
    elif fmt == "nifti":
        _check_nifti(path, gz=suffix == ".nii.gz")
    else:
        _check_nrrd(path)
    try:
        image = _to_3d(sitk.ReadImage(str(path)), path)
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:
        message = _itk_message(exc)
        for marker, problem in _ITK_GEOMETRY_PROBLEMS:
            if marker in message:
                raise InputError(path, f"invalid geometry in header: {problem}") from None
        raise InputError(path, f"cannot read as {fmt}: {message}") from None
    name = path.name[: -len(suffix)]
    meta: dict[str, Any] = {"source_path": str(path), "format": fmt, "name": name}
    if _UID_PATTERN.match(name):
        meta["series_instance_uid"] = name
    try:
        return Volume(
            array=array,
            spacing_zyx=tuple(reversed(image.GetSpacing())),
            origin_xyz_mm=image.GetOrigin(),
            direction=image.GetDirection(),
            meta=meta,
        )
    except ValueError as exc:  # e.g. zero spacing, non-orthonormal direction
        raise InputError(path, f"invalid geometry in header: {exc}") from None


# ---------------------------------------------------------------------------------------------- writing


def _sitk_image(volume: Volume, path: Path) -> sitk.Image:
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)  # no image format has a 1-bit type; uint8 0/1 is the convention
    if array.dtype.kind not in "iuf" or array.dtype == np.float16:
        raise InputError(path, f"cannot store a {array.dtype} array; use an integer, float32 or float64 array")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(volume.geometry.spacing_xyz)
    image.SetOrigin(volume.origin_xyz_mm)
    image.SetDirection(volume.direction)
    return image


def _resolve_compress(path: Path, suffix: str, compress: bool | None) -> bool:
    if suffix == ".nii.gz":
        if compress is False:
            raise InputError(path, "compress=False contradicts the .nii.gz suffix; use .nii")
        return True
    if suffix == ".nii":
        if compress:
            raise InputError(path, "compress=True contradicts the .nii suffix; use .nii.gz")
        return False
    if compress is not None:
        return compress
    # .mhd defaults to .raw data as LUNA16 ships it; single-file .nrrd/.mha default to compressed.
    return suffix != ".mhd"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_metaimage_pair(image: sitk.Image, target: Path, compress: bool) -> None:
    """Header + data file, both complete or neither visible (see module doc)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        staged_header = staging / target.name
        # ITK names the data file after the header (stem + .raw/.zraw) and records it relative to it, so
        # the pair written in the staging folder stays valid once both are moved beside the target.
        sitk.WriteImage(image, str(staged_header), useCompression=compress)
        data_files = [p for p in staging.iterdir() if p != staged_header]
        for p in (*data_files, staged_header):
            _fsync(p)
        target.unlink(missing_ok=True)  # no reader may pair an old header with the new data
        for p in data_files:
            os.replace(p, target.parent / p.name)
        os.replace(staged_header, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_image(volume: Volume, path: str | Path, *, compress: bool | None = None) -> Path:
    """Write ``volume`` (array dtype and geometry kept; ``meta`` is not stored) atomically; return the path.

    Formats by suffix: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd`` (+ ``.raw``, or ``.zraw``
    when compressed). ``compress=None`` means: ``.nii.gz``/``.nrrd``/``.mha`` compressed (gzip/zlib),
    ``.nii`` and ``.mhd`` not. Bool arrays are written as uint8.
    """
    path = Path(path)
    found = image_format(path)
    if found is None or found[0] not in WRITABLE_SUFFIXES:
        raise InputError(path, f"cannot write this file type; supported: {', '.join(WRITABLE_SUFFIXES)}")
    suffix, _ = found
    use_compression = _resolve_compress(path, suffix, compress)
    image = _sitk_image(volume, path)
    try:
        if suffix == ".mhd":
            _write_metaimage_pair(image, path, use_compression)
        else:
            with atomic_path(path) as tmp:
                sitk.WriteImage(image, str(tmp), useCompression=use_compression)
                _fsync(tmp)
    except RuntimeError as exc:
        raise InputError(path, f"cannot write: {_itk_message(exc)}") from None
    except OSError as exc:
        raise InputError(path, f"cannot write: {exc.strerror or exc}") from None
    return path
