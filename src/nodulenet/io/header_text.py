"""The plain-text headers of NRRD and MetaImage files, parsed in one place.

Several parts of the package look into these headers before (or instead of) handing the file to SimpleITK: the
reader checks that the data is as long as the header promises (ITK zero-fills or fails misleadingly), the training
loader memory-maps raw NRRD voxels, and the HTTP client and server check that a MetaImage names no file outside
the upload. They all read the header text through these functions, so one table of voxel types and one rule for
``ElementDataFile`` apply everywhere.

NRRD: a ``NRRD000X`` magic line, ``field: value`` lines (``key:=value`` pairs and ``#`` comments carry no layout),
an empty line, then the data. MetaImage: ``Key = Value`` lines; ``ElementDataFile`` is the last one and the data
follow it when it says ``LOCAL``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulenet.errors import InputError

# NRRD voxel type names (the spec's synonyms) -> numpy type code (byte order added from the header's ``endian``).
NRRD_DTYPES: dict[str, str] = {
    **dict.fromkeys(["uchar", "unsigned char", "uint8", "uint8_t"], "u1"),
    **dict.fromkeys(["signed char", "int8", "int8_t"], "i1"),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16", "int16_t"], "i2"),
    **dict.fromkeys(["ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"], "u2"),
    **dict.fromkeys(["int", "signed int", "int32", "int32_t"], "i4"),
    **dict.fromkeys(["uint", "unsigned int", "uint32", "uint32_t"], "u4"),
    **dict.fromkeys(["longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t"], "i8"),
    **dict.fromkeys(["ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"], "u8"),
    "float": "f4",
    "double": "f8",
}

# MetaImage ElementType -> numpy type code.
METAIMAGE_DTYPES: dict[str, str] = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4", "MET_UINT": "u4",
    "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}

_NRRD_HEADER_END = re.compile(rb"\r?\n\r?\n")
_ELEMENT_DATA_FILE = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=[ \t]*([^\r\n]*)\r?\n?", re.M)


def nrrd_element_bytes(type_name: str) -> int | None:
    """Bytes per voxel of an NRRD ``type`` (None for a name the spec does not define)."""
    code = NRRD_DTYPES.get(type_name.strip().lower())
    return None if code is None else np.dtype(code).itemsize


def metaimage_element_bytes(element_type: str) -> int | None:
    """Bytes per voxel of a MetaImage ``ElementType`` (None when unknown)."""
    code = METAIMAGE_DTYPES.get(element_type.strip().upper())
    return None if code is None else np.dtype(code).itemsize


@dataclass(frozen=True)
class NrrdHeader:
    """The fields of an NRRD header (keys lower-cased) and where its attached data start.

    ``data_offset`` is None when the empty line that ends the header is not within the bytes parsed.
    """

    fields: dict[str, str]
    data_offset: int | None

    @property
    def data_file(self) -> str | None:
        """The ``data file`` field (detached data), or None when the data are attached."""
        return self.fields.get("data file", self.fields.get("datafile"))


def parse_nrrd_header(head: bytes, path: str | Path) -> NrrdHeader:
    """Parse the first bytes of an NRRD file; :class:`InputError` naming ``path`` when it is not NRRD."""
    if not head.startswith(b"NRRD"):
        raise InputError(path, "not a NRRD file (no NRRD magic at the start)")
    end = _NRRD_HEADER_END.search(head)
    text = head[: end.start() if end else len(head)].decode("latin-1")
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line or line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return NrrdHeader(fields, end.end() if end else None)


@dataclass(frozen=True)
class MetaImageHeader:
    """The ``Key = Value`` fields of a MetaImage header up to ``ElementDataFile`` (keys lower-cased)."""

    fields: dict[str, str]
    data_file: str  # the ElementDataFile value as written: LOCAL, a file name, LIST or a pattern
    header_end: int  # byte offset just past the ElementDataFile line (where LOCAL data begin)

    @property
    def local(self) -> bool:
        return self.data_file.upper() == "LOCAL"

    @property
    def list_or_pattern(self) -> bool:
        """The data are split over several files (``LIST`` or a printf-style pattern such as ``slice%03d.raw``)."""
        name = self.data_file
        return name.upper().startswith("LIST") or "%" in name or " " in name

    @property
    def plain_file_name(self) -> bool:
        """The data are in one file named plainly beside the header (not LOCAL, a list, a pattern or a path)."""
        name = self.data_file
        return bool(name) and not self.local and not self.list_or_pattern and not (
            "/" in name or "\\" in name or name in (".", ".."))


def parse_metaimage_header(head: bytes, path: str | Path) -> MetaImageHeader:
    """Parse the first bytes of a ``.mhd``/``.mha``; :class:`InputError` when there is no ElementDataFile line."""
    marker = _ELEMENT_DATA_FILE.search(head)
    if marker is None:
        raise InputError(path, "not a MetaImage header: no ElementDataFile line")
    fields: dict[str, str] = {}
    for line in head[: marker.start()].decode("latin-1").splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    return MetaImageHeader(fields, marker.group(1).decode("latin-1").strip(), marker.end())


def read_head(path: Path, limit: int = 64 * 1024) -> bytes:
    """The first ``limit`` bytes of ``path`` (headers longer than 64 KiB are not written by any tool we meet)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
