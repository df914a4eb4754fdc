"""Memory-map the voxels of an uncompressed (``encoding: raw``) NRRD file, as prepared cases store ``image.nrrd``,
and read the small gzip-compressed label volumes (``lung_mask.nrrd``, ``nodule_mask.nrrd``) whole.

Why not SimpleITK: ``sitk.ReadImage`` reads the whole volume into memory (a 300^3 uint8 case is 27 MB, and a data
loader worker touches hundreds of cases), while a training crop needs only a 128^3 block of it. Memory-mapping lets
the operating system's page cache hold each case once for every worker process, and a crop reads only the pages it
covers. The NRRD header is plain text ending at the first empty line; the raw voxels follow it, x fastest, so the
array is ``(z, y, x)`` with the header's ``sizes`` reversed.

The label volumes are read here too, with Python's zlib, rather than through SimpleITK: with that, the training
path (cases, loader, loop) imports no ITK at all, so it runs on a stock PyTorch GPU image as it is (SimpleITK's
wheel is 53 MB and is needed only to prepare cases, which is done once, anywhere). Decoding speed is the same.

Only what ``prepare_case`` writes is supported (3-D, attached data, raw encoding, little-endian or 1-byte types);
anything else raises :class:`~nodulenet.errors.InputError` naming the file, so a bad case is reported and skipped.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulenet.errors import InputError
from nodulenet.io.header_text import NRRD_DTYPES, parse_nrrd_header, read_head

_HEADER_LIMIT = 64 * 1024  # a header longer than this is not one prepare_case wrote

@dataclass(frozen=True)
class RawNrrdLayout:
    """Where the voxels of a raw NRRD file are: byte offset, dtype and array shape ``(z, y, x)``."""

    path: Path
    offset: int
    dtype: str
    shape_zyx: tuple[int, int, int]

    @property
    def n_bytes(self) -> int:
        return int(np.prod(self.shape_zyx)) * np.dtype(self.dtype).itemsize


def _read_header(path: Path) -> tuple[dict[str, str], int, int]:
    """(lower-cased header fields, byte offset of the data, file size) of the NRRD file ``path``."""
    header = parse_nrrd_header(read_head(path, _HEADER_LIMIT), path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    if header.data_offset is None:
        raise InputError(path, "NRRD header does not end (no empty line in the first 64 KiB): file truncated?")
    if header.data_file is not None:
        raise InputError(path, "detached NRRD data files are not supported here (prepare_case attaches the data)")
    return header.fields, header.data_offset, size


def _layout(path: Path, fields: dict[str, str], data_offset: int) -> RawNrrdLayout:
    """Voxel type and shape from the header; ``offset`` is where the (decoded) voxels start."""
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        dimension = int(fields.get("dimension", len(sizes)))
        type_name = fields["type"].lower()
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"NRRD header lacks a valid {exc} field") from None
    if dimension != 3 or len(sizes) != 3 or min(sizes) < 1:
        raise InputError(path, f"expected a 3-D image, header says dimension {dimension}, sizes {sizes}")
    if type_name not in NRRD_DTYPES:
        raise InputError(path, f"unsupported NRRD voxel type {type_name!r}")
    code = NRRD_DTYPES[type_name]
    if np.dtype(code).itemsize > 1:
        endian = fields.get("endian", "little").lower()
        code = ("<" if endian == "little" else ">") + code
    return RawNrrdLayout(path, data_offset, code, (sizes[2], sizes[1], sizes[0]))


def _describe(layout: RawNrrdLayout) -> str:
    return f"{'x'.join(map(str, layout.shape_zyx))} of {np.dtype(layout.dtype).name}"


def read_raw_nrrd_layout(path: str | Path) -> RawNrrdLayout:
    """Parse the header of ``path`` and check that the file holds all the voxels it announces."""
    path = Path(path)
    return _raw_layout(path, *_read_header(path))


def _raw_layout(path: Path, fields: dict[str, str], data_offset: int, size: int) -> RawNrrdLayout:
    encoding = fields.get("encoding", "").lower()
    if encoding != "raw":
        raise InputError(path, f"NRRD encoding is {encoding or 'missing'!r}, expected 'raw' (uncompressed, "
                               "memory-mappable); re-run the preparation")
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    if byte_skip < 0:
        raise InputError(path, "'byte skip: -1' (data at the end of the file) is not supported")
    layout = _layout(path, fields, data_offset + byte_skip)
    if size - layout.offset < layout.n_bytes:
        raise InputError(path, f"truncated: holds {max(size - layout.offset, 0)} bytes of voxels, header announces "
                               f"{layout.n_bytes} ({_describe(layout)})")
    return layout


def read_nrrd_array(path: str | Path) -> np.ndarray:
    """The whole ``(z, y, x)`` array of a raw or gzip-encoded NRRD file as ``prepare_case`` writes them."""
    path = Path(path)
    fields, data_offset, size = _read_header(path)
    encoding = fields.get("encoding", "").lower()
    if encoding == "raw":
        return np.array(memmap_raw_nrrd(_raw_layout(path, fields, data_offset, size)))
    if encoding not in ("gzip", "gz"):
        raise InputError(path, f"NRRD encoding {encoding or 'missing'!r} is not supported (raw or gzip)")
    layout = _layout(path, fields, 0)
    try:
        with open(path, "rb") as f:
            f.seek(data_offset)
            compressed = f.read()
        inflate = zlib.decompressobj(wbits=31)  # 31: a gzip stream (header and CRC-32 checked)
        data = inflate.decompress(compressed)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    except zlib.error as exc:
        raise InputError(path, f"corrupt gzip data ({exc})") from None
    if not inflate.eof:
        raise InputError(path, f"truncated: the gzip stream ends early ({len(data)} of {layout.n_bytes} bytes of "
                               f"voxels, {_describe(layout)})")
    if len(data) != layout.n_bytes:
        raise InputError(path, f"holds {len(data)} bytes of voxels, header announces {layout.n_bytes} "
                               f"({_describe(layout)})")
    return np.frombuffer(data, dtype=np.dtype(layout.dtype)).reshape(layout.shape_zyx).copy()


def memmap_raw_nrrd(layout: RawNrrdLayout) -> np.memmap:
    """Read-only ``(z, y, x)`` memory map of the voxels described by ``layout``."""
    try:
        return np.memmap(layout.path, dtype=np.dtype(layout.dtype), mode="r", offset=layout.offset,
                         shape=layout.shape_zyx, order="C")
    except (OSError, ValueError) as exc:
        raise InputError(layout.path, f"cannot memory-map the voxels: {exc}") from None
