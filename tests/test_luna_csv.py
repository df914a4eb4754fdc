"""LUNA16 CSV reading/writing: the official files, bad cells reported by line, atomic round trips.

Golden counts and the LIDC-IDRI-0001 row were read off the official files with ``wc``/``grep``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodulenet.errors import InputError
from nodulenet.io.luna_csv import (
    LunaAnnotation,
    LunaCandidate,
    index_by_seriesuid,
    read_luna_annotations,
    read_luna_candidates,
    read_luna_excluded,
    read_seriesuids,
    write_luna_annotations,
    write_luna_candidates,
)

HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def test_official_annotations(luna_root: Path) -> None:
    rows = read_luna_annotations(luna_root / "annotations.csv")
    assert len(rows) == 1186  # 1187 lines minus the header
    by_series = index_by_seriesuid(rows)
    assert len(by_series) == 601  # scans with at least one nodule (LUNA16 paper)
    (nodule,) = by_series[UID_0001]
    assert nodule.center_world_xyz_mm == (56.20840547, 86.34341278, -115.8675792)
    assert nodule.diameter_mm == 23.35064438


def test_official_excluded_and_series_list(luna_root: Path) -> None:
    excluded = read_luna_excluded(luna_root / "annotations_excluded.csv")
    assert len(excluded) == 35192
    assert excluded[0].diameter_mm is None  # first data row: diameter -1
    assert sum(e.diameter_mm is not None for e in excluded) == 35192 - 30513
    uids = read_seriesuids(luna_root / "seriesuids.csv")  # CRLF, no header
    assert len(uids) == 888 and len(set(uids)) == 888
    assert uids[0] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    assert all("\r" not in u for u in uids)
    assert UID_0001 in uids


def test_unknown_diameter_only_allowed_in_excluded(tmp_path: Path) -> None:
    path = tmp_path / "annotations.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1,2,3,4.5\n1.2.3,1,2,3,-1\n")
    with pytest.raises(InputError, match=r"line 3: diameter_mm '-1' must be > 0"):
        read_luna_annotations(path)
    assert [e.diameter_mm for e in read_luna_excluded(path)] == [4.5, None]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("seriesuid,x,y,z,diameter_mm\n", r"line 1: header is 'seriesuid,x,y,z,diameter_mm'"),
        ("", "empty file"),
        (HEADER + "1.2.3,1,2,3,4\n\n1.2.3,1,abc,3,4\n", r"line 4: coordY 'abc' is not a number"),
        (HEADER + "1.2.3,1,2,3\n", r"line 2: 4 columns, expected 5"),
        (HEADER + "1.2.3,nan,2,3,4\n", r"line 2: coordX 'nan' is not a finite"),
        (HEADER + "scan one,1,2,3,4\n", r"line 2: 'scan one' is not a DICOM series UID"),
    ],
)
def test_bad_annotation_files_name_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as err:
        read_luna_annotations(path)
    assert err.value.path == path


def test_missing_file_and_bad_series_list(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_seriesuids(tmp_path / "absent.csv")
    path = tmp_path / "seriesuids.csv"
    path.write_bytes(b"1.2.3\r\n1.2.4,extra\r\n")
    with pytest.raises(InputError, match="line 2: expected one series UID per line"):
        read_seriesuids(path)


def test_candidates_round_trip_exactly(tmp_path: Path) -> None:
    candidates = [
        LunaCandidate("1.2.3", (56.20840547, 86.34341278, -115.8675792), 0.1 + 0.2),
        LunaCandidate("1.2.4", (-1e-7, 0.0, 3.0), 1.0),
    ]
    path = write_luna_candidates(tmp_path / "out" / "candidates.csv", candidates)
    assert path.read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert read_luna_candidates(path) == candidates  # repr() floats read back bit-identical
    assert [p.name for p in path.parent.iterdir()] == ["candidates.csv"]  # no temp file left


def test_annotations_round_trip_with_unknown_diameter(tmp_path: Path) -> None:
    rows = [LunaAnnotation("1.2.3", (1.5, 2.5, -3.5), 6.25), LunaAnnotation("1.2.3", (0.0, 0.0, 0.0), None)]
    path = write_luna_annotations(tmp_path / "annotations_excluded.csv", rows)
    assert path.read_text().splitlines()[2] == "1.2.3,0.0,0.0,0.0,-1.0"
    assert read_luna_excluded(path) == rows


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "candidates.csv"
    write_luna_candidates(path, [LunaCandidate("1.2.3", (1.0, 2.0, 3.0), 0.5)])
    before = path.read_text()
    with pytest.raises(ValueError, match="non-finite"):
        bad = [LunaCandidate("1.2.3", (1.0, 2.0, 3.0), 0.5), LunaCandidate("1.2.3", (1.0, float("inf"), 3.0), 0.5)]
        write_luna_candidates(path, bad)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["candidates.csv"]
