"""Write every result file of one scan: :func:`export_all`.

Files (names fixed, in ``out_dir``): ``nodules.json``, ``candidates.csv``, ``labels.nii.gz`` (or
``labels.nii`` / ``labels.nrrd``), ``seg.dcm`` + ``sr.dcm`` (DICOM input only) and ``report.html``.

The all-or-nothing rule, so that no partial output ever looks complete:

1. Every file is first written into a private staging folder inside ``out_dir``
   (``.nodulenet-export-*``, each file itself atomically). If anything fails here, the staging folder is
   deleted and ``out_dir`` is exactly as before, including a complete earlier export.
2. Commit: the old ``nodules.json`` is removed first, because ``nodules.json`` is the completion marker;
   then the other new files are renamed into place (``os.replace``, atomic per file), result files of a
   previous export that this one does not produce (e.g. an old ``seg.dcm``, a label map in another format)
   are deleted, and ``nodules.json`` is renamed in LAST.

So a folder with a ``nodules.json`` holds one complete, consistent export; a folder without one does not
(readers must treat it as incomplete). A crash in the middle of step 2 can only leave a folder without
``nodules.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet.export.dicom_source import (
    ExportSkipped,
    labels_on_source_slices,
    read_source_headers,
    require_dicom_source,
    save_dataset,
    source_frame_order,
)
from nodulenet.export.labelmap import label_array_from_findings, write_label_map
from nodulenet.export.report import write_report
from nodulenet.export.tables import write_candidates_csv, write_nodules_json
from nodulenet.io.findings import ScanFindings
from nodulenet.io.volume import Volume

NODULES_JSON = "nodules.json"
CANDIDATES_CSV = "candidates.csv"
SEG_DCM = "seg.dcm"
SR_DCM = "sr.dcm"
REPORT_HTML = "report.html"
LABEL_FORMATS = ("nii.gz", "nii", "nrrd")
# Every name an export may write; the ones a new export does not produce are removed at commit.
ALL_OUTPUT_NAMES = (NODULES_JSON, CANDIDATES_CSV, SEG_DCM, SR_DCM, REPORT_HTML,
                    *(f"labels.{fmt}" for fmt in LABEL_FORMATS))


@dataclass
class ExportResult:
    """What :func:`export_all` wrote (kind -> final path), what it skipped (kind -> reason) and how long
    each writer took (kind -> seconds). Kinds: ``nodules_json``, ``candidates_csv``, ``label_map``,
    ``dicom_seg``, ``dicom_sr``, ``report_html``."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "files": {k: str(v) for k, v in self.files.items()},
            "skipped": dict(self.skipped),
            "seconds": dict(self.seconds),
        }


def _timed(result: ExportResult, kind: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    result.seconds[kind] = time.perf_counter() - start
    return value


def _commit(staging: Path, out_dir: Path, staged: dict[str, Path]) -> dict[str, Path]:
    """Move staged files into ``out_dir`` by the rule in the module doc; return kind -> final path."""
    (out_dir / NODULES_JSON).unlink(missing_ok=True)
    final: dict[str, Path] = {}
    for kind, path in staged.items():
        if path.name != NODULES_JSON:
            final[kind] = out_dir / path.name
            os.replace(path, final[kind])
    produced = {p.name for p in staged.values()}
    for name in ALL_OUTPUT_NAMES:
        if name not in produced:
            (out_dir / name).unlink(missing_ok=True)
    for kind, path in staged.items():
        if path.name == NODULES_JSON:
            final[kind] = out_dir / NODULES_JSON
            os.replace(path, final[kind])
    # An fsync of the folder makes the renames durable, in order, on a crash (POSIX).
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def export_all(findings: ScanFindings, hu_volume: Volume, out_dir: str | Path, *, label_format: str = "nii.gz",
               dicom: bool = True, lidc: bool | None = None) -> ExportResult:
    """Write all result files of one scan into ``out_dir`` (all or nothing, see the module doc).

    ``hu_volume`` is the scan as read (original grid; its ``meta`` names the DICOM source slices).
    ``dicom=False`` skips SEG/SR; for non-DICOM input they are skipped with the reason in
    :attr:`ExportResult.skipped`; without findings the SEG is skipped and the SR says "no findings". ``lidc`` forces
    the report's LIDC-IDRI credit line (default: detected).
    ``nodules.json`` records the writers' times in ``timings`` as ``export_<kind>_s``.
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    if hu_volume.shape_zyx != findings.geometry.shape_zyx:
        raise ValueError(f"the HU volume {hu_volume.shape_zyx} is not the findings' scan grid "
                         f"{findings.geometry.shape_zyx}")
    findings = findings.with_centre_slices(hu_volume.meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out_dir=out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".nodulenet-export-", dir=out_dir))
    try:
        staged: dict[str, Path] = {}
        labels: np.ndarray = _timed(result, "label_array",
                                    lambda: label_array_from_findings(findings.findings, findings.geometry.shape_zyx))
        staged["label_map"] = _timed(result, "label_map", lambda: write_label_map(
            findings, None, staging / f"labels.{label_format}", label_array=labels))
        staged["candidates_csv"] = _timed(result, "candidates_csv",
                                          lambda: write_candidates_csv(findings, staging / CANDIDATES_CSV))
        _export_dicom(findings, hu_volume, labels, staging, staged, result, dicom)
        staged["report_html"] = _timed(result, "report_html", lambda: write_report(
            findings, hu_volume, labels, staging / REPORT_HTML, lidc=lidc))
        timings = {**findings.timings, **{f"export_{k}_s": round(v, 4) for k, v in result.seconds.items()}}
        staged["nodules_json"] = write_nodules_json(replace(findings, timings=timings), staging / NODULES_JSON)
        result.files = _commit(staging, out_dir, staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _export_dicom(findings: ScanFindings, hu: Volume, labels: np.ndarray, staging: Path, staged: dict[str, Path],
                  result: ExportResult, dicom: bool) -> None:
    """SEG then SR (the SR references the SEG); a skip reason is recorded for both."""
    try:
        if not dicom:
            raise ExportSkipped("DICOM SEG/SR", "not requested")
        require_dicom_source(hu, "DICOM SEG")
        try:  # highdicom is needed only here; without it the other files are still written
            from nodulenet.export.dicom_seg import build_dicom_seg
            from nodulenet.export.dicom_sr import build_dicom_sr, build_no_findings_sr
        except ImportError as exc:
            raise ExportSkipped("DICOM SEG/SR", f"highdicom is not installed ({exc})") from None
        headers = _timed(result, "dicom_headers", lambda: read_source_headers(hu, "DICOM SEG"))
        if not findings.findings:  # no SEG (it needs a segment), but an SR that says nothing was found
            result.skipped["dicom_seg"] = "no findings (a DICOM SEG needs at least one segment)"
            sr = _timed(result, "dicom_sr_build", lambda: build_no_findings_sr(findings, headers))
            staged["dicom_sr"] = _timed(result, "dicom_sr", lambda: save_dataset(sr, staging / SR_DCM))
            return
        order = source_frame_order(hu)
        source_labels = labels_on_source_slices(hu, labels, headers)  # a gantry-tilt-corrected grid: back to the slices
        seg = _timed(result, "dicom_seg_build", lambda: build_dicom_seg(findings, source_labels, headers, order))
        staged["dicom_seg"] = _timed(result, "dicom_seg", lambda: save_dataset(seg, staging / SEG_DCM))
        sr = _timed(result, "dicom_sr_build", lambda: build_dicom_sr(findings, seg, headers))
        staged["dicom_sr"] = _timed(result, "dicom_sr", lambda: save_dataset(sr, staging / SR_DCM))
    except ExportSkipped as skip:
        result.skipped["dicom_seg"] = skip.reason
        result.skipped["dicom_sr"] = skip.reason
