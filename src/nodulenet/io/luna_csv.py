"""Read and write the LUNA16 CSV files: annotations, excluded findings, series lists, candidates.

Formats (as published with the LUNA16 evaluation script; world coordinates are DICOM LPS mm,
``(x, y, z)``, of the nodule centre):

- ``annotations.csv``: header ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (diameter > 0).
- ``annotations_excluded.csv``: same header; ``diameter_mm = -1`` means unknown (point findings), read
  as ``None``.
- ``seriesuids.csv``: one SeriesInstanceUID per line, no header (the official file has CRLF endings).
- candidates / submissions: header ``seriesuid,coordX,coordY,coordZ,probability``.

Every bad cell is reported as an :class:`~nodulenet.errors.InputError` naming the file and the 1-based
line number. Writers go through :func:`~nodulenet.io.atomic.atomic_path`, so a reader never sees half a
file, and write floats with ``repr`` (shortest text that reads back to the same float).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nodulenet.errors import InputError, text_file_errors
from nodulenet.io.atomic import atomic_path

ANNOTATION_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
# A DICOM UID: dot-separated numbers of digits, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class LunaAnnotation:
    """A reference finding: centre in world mm and diameter (``None`` = unknown, excluded findings)."""

    seriesuid: str
    center_world_xyz_mm: tuple[float, float, float]
    diameter_mm: float | None


@dataclass(frozen=True)
class LunaCandidate:
    """A detection to be scored: centre in world mm and a probability/score."""

    seriesuid: str
    center_world_xyz_mm: tuple[float, float, float]
    probability: float


_Row = TypeVar("_Row", LunaAnnotation, LunaCandidate)


def _open_rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Yield ``(line number, cells)`` of a CSV file; blank lines are skipped."""
    # utf-8-sig: a byte-order mark written by spreadsheet programs is not part of the first cell.
    with text_file_errors(path), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            for cells in reader:
                if cells and any(c.strip() for c in cells):
                    yield reader.line_num, [c.strip() for c in cells]
        except csv.Error as exc:
            raise InputError(path, f"line {reader.line_num}: not valid CSV ({exc})") from None


def _uid(path: Path, line: int, text: str) -> str:
    if not _UID.match(text) or len(text) > 64:
        raise InputError(path, f"line {line}: {text!r} is not a DICOM series UID")
    return text


def _float(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"line {line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(path, f"line {line}: {column} {text!r} is not a finite number")
    return value


def _read_table(path: str | Path, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    path = Path(path)
    rows = iter(_open_rows(path))
    first = next(rows, None)
    if first is None:
        raise InputError(path, f"empty file; expected the header {','.join(header)}")
    line, cells = first
    if tuple(cells) != header:
        raise InputError(path, f"line {line}: header is {','.join(cells)!r}, expected {','.join(header)!r}")
    table = []
    for line, cells in rows:
        if len(cells) != len(header):
            raise InputError(path, f"line {line}: {len(cells)} columns, expected {len(header)} ({','.join(header)})")
        table.append((line, cells))
    return table


def _xyz(path: Path, line: int, cells: list[str]) -> tuple[float, float, float]:
    return (
        _float(path, line, "coordX", cells[1]),
        _float(path, line, "coordY", cells[2]),
        _float(path, line, "coordZ", cells[3]),
    )


def read_luna_annotations(path: str | Path, *, allow_unknown_diameter: bool = False) -> list[LunaAnnotation]:
    """Read ``annotations.csv`` (every diameter > 0) or, with ``allow_unknown_diameter=True``,
    ``annotations_excluded.csv`` (diameter -1 read as ``None``)."""
    path = Path(path)
    result = []
    for line, cells in _read_table(path, ANNOTATION_HEADER):
        diameter: float | None = _float(path, line, "diameter_mm", cells[4])
        if allow_unknown_diameter and diameter == -1.0:
            diameter = None
        elif diameter is not None and diameter <= 0:
            unknown = " (-1 = unknown is only valid in annotations_excluded.csv)" if diameter == -1.0 else ""
            raise InputError(path, f"line {line}: diameter_mm {cells[4]!r} must be > 0{unknown}")
        result.append(LunaAnnotation(_uid(path, line, cells[0]), _xyz(path, line, cells), diameter))
    return result


def read_luna_excluded(path: str | Path) -> list[LunaAnnotation]:
    """Read ``annotations_excluded.csv`` (findings that count neither as hits nor as false positives)."""
    return read_luna_annotations(path, allow_unknown_diameter=True)


def read_luna_candidates(path: str | Path) -> list[LunaCandidate]:
    """Read a candidate/submission file ``seriesuid,coordX,coordY,coordZ,probability``."""
    path = Path(path)
    return [
        LunaCandidate(_uid(path, line, cells[0]), _xyz(path, line, cells), _float(path, line, "probability", cells[4]))
        for line, cells in _read_table(path, CANDIDATE_HEADER)
    ]


def read_seriesuids(path: str | Path) -> list[str]:
    """Read a ``seriesuids.csv`` list (no header; LF or CRLF line ends), keeping file order."""
    path = Path(path)
    uids = []
    for line, cells in _open_rows(path):
        if len(cells) != 1:
            raise InputError(path, f"line {line}: expected one series UID per line, got {len(cells)} columns")
        uids.append(_uid(path, line, cells[0]))
    return uids


def index_by_seriesuid(rows: Iterable[_Row]) -> dict[str, list[_Row]]:
    """Group rows by ``seriesuid``, keeping file order within each series."""
    index: dict[str, list[_Row]] = {}
    for row in rows:
        index.setdefault(row.seriesuid, []).append(row)
    return index


def _write_rows(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with atomic_path(path) as tmp:
        # LF line ends: the LUNA16 evaluation script and pandas read both.
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return Path(path)


def _check_finite(path: str | Path, what: str, values: Sequence[float]) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{path}: refusing to write non-finite {what} {list(values)!r}")


def write_luna_candidates(path: str | Path, candidates: Iterable[LunaCandidate]) -> Path:
    """Write candidates as ``seriesuid,coordX,coordY,coordZ,probability`` (atomically)."""
    rows = []
    for c in candidates:
        _check_finite(path, "candidate", (*c.center_world_xyz_mm, c.probability))
        rows.append((c.seriesuid, *map(repr, map(float, c.center_world_xyz_mm)), repr(float(c.probability))))
    return _write_rows(path, CANDIDATE_HEADER, rows)


def write_luna_annotations(path: str | Path, annotations: Iterable[LunaAnnotation]) -> Path:
    """Write annotations as ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (unknown diameter as -1)."""
    rows = []
    for a in annotations:
        diameter = -1.0 if a.diameter_mm is None else float(a.diameter_mm)
        _check_finite(path, "annotation", (*a.center_world_xyz_mm, diameter))
        rows.append((a.seriesuid, *map(repr, map(float, a.center_world_xyz_mm)), repr(diameter)))
    return _write_rows(path, ANNOTATION_HEADER, rows)
