"""Tabular results: ``nodules.json`` (schema ``nodulenet.nodules/1``, see :mod:`nodulenet.io.findings`) and a
LUNA16-style ``candidates.csv`` (``seriesuid,coordX,coordY,coordZ,probability``; world LPS mm of each
finding's centre and its score), the file the LUNA16 evaluation script scores.

Both are written atomically.
"""

from __future__ import annotations

from pathlib import Path

from nodulenet.io.findings import ScanFindings
from nodulenet.io.image_files import image_format
from nodulenet.io.luna_csv import LunaCandidate, write_luna_candidates


def write_nodules_json(findings: ScanFindings, path: str | Path) -> Path:
    """Write ``nodules.json`` (masks are not included; the label map carries them)."""
    return findings.write_json(path)


def candidates_seriesuid(findings: ScanFindings) -> str:
    """The ``seriesuid`` column: the SeriesInstanceUID when known, else the input's file/folder name without
    its image suffix (LUNA16 names each ``.mhd`` after its SeriesInstanceUID, so that is the UID there too).

    Note: :func:`nodulenet.io.luna_csv.read_luna_candidates` accepts only UIDs, so a file written for a
    scan named e.g. ``patient7.nii.gz`` is for people and other tools, not for the LUNA16 reader.
    """
    uid = findings.source.series_instance_uid
    if uid:
        return uid
    source = Path(findings.source.path)
    found = image_format(source)
    name = source.name
    return name[: len(name) - len(found[0])] if found else source.stem or "unknown"


def write_candidates_csv(findings: ScanFindings, path: str | Path, *, seriesuid: str | None = None) -> Path:
    """Write one row per finding (ordered by descending score, then id), header included even when empty."""
    uid = seriesuid or candidates_seriesuid(findings)
    rows = [
        LunaCandidate(uid, f.center_world_xyz_mm, f.score)
        for f in sorted(findings.findings, key=lambda f: (-f.score, f.id))
    ]
    return write_luna_candidates(path, rows)
