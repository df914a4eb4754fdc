"""``nodulenet predict --dicomweb URL --study UID [--series UID] -o OUT [--store-results]`` as a function.

1. QIDO-RS: the study's series; the CT series to read is ``--series`` or the largest CT series;
2. WADO-RS: its instances into ``OUT/.dicomweb-<random>/<PatientID>/<SeriesInstanceUID>/`` (removed at the end: the
   outputs never need the source slices again, and a CT series is hundreds of MB);
3. the local predict (:func:`nodulenet.predict_api.predict_scans`) into ``OUT/<PatientID>_<last 8 of the series
   UID>/``: nodules.json, the label map, report.html and, the input being DICOM, ``seg.dcm`` + ``sr.dcm``, which
   reference the fetched instances (same Study Instance UID and Frame of Reference, new Series Instance UIDs);
4. with ``store_results``: STOW-RS of ``seg.dcm`` and ``sr.dcm`` back to the same server (into the same study).

What was fetched and stored is recorded in ``OUT/<case>/dicomweb.json``.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodulenet.errors import NoduleNetError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.pacs.auth import DicomwebAuth
from nodulenet.pacs.destination import SEND_ORDER
from nodulenet.pacs.dicomweb import (
    choose_ct_series,
    connect,
    fetch_series,
    list_series,
    store_files,
)

logger = logging.getLogger(__name__)

RECORD_FILE = "dicomweb.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class DicomwebRun:
    """What :func:`predict_from_dicomweb` did."""

    run: Any  # PredictRun
    series_uid: str
    n_instances: int
    fetch_s: float
    stored: dict[str, str] = field(default_factory=dict)  # file name -> SOP Instance UID stored
    store_skipped: str | None = None  # why nothing was stored (no findings: no SEG)
    store_s: float = 0.0


def result_files(details: dict[str, Any]) -> list[Path]:
    """The SEG and SR a scan result wrote (SEG first), from ``ScanResult.details["files"]``."""
    files = details.get("files", {})
    return [Path(files[kind]) for kind in SEND_ORDER if kind in files]


def predict_from_dicomweb(url: str, study_uid: str, out_dir: str | Path, options: Any = None, *,
                          series_uid: str | None = None, auth: DicomwebAuth | None = None,
                          store_results: bool = False, say: Callable[[str], None] | None = None,
                          on_result: Callable[[Any], None] | None = None) -> DicomwebRun:
    """Fetch, predict, optionally store back (see the module docstring); errors are :class:`NoduleNetError`."""
    from nodulenet.predict_api import PredictOptions, predict_scans

    say = say or (lambda text: None)
    options = options or PredictOptions()
    if store_results and not options.dicom_outputs:
        raise NoduleNetError("--store-results sends the DICOM SEG + SR back: it cannot be used with --no-dicom")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = connect(url, auth)
    series = choose_ct_series(list_series(client, url, study_uid), url, study_uid, series_uid)
    say(f"fetching {series.summary()} from {url}")
    staging = Path(tempfile.mkdtemp(prefix=".dicomweb-", dir=out))
    try:
        t0 = time.perf_counter()
        folder = staging / "series" / series.series_uid
        paths = fetch_series(client, url, study_uid, series, folder)
        # Renamed <patient>/<series UID> like a TCIA download, so the output folder is <patient>_<uid tail>.
        patient = _patient_folder_name(paths[0])
        case_folder = staging / patient / series.series_uid
        case_folder.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(case_folder)
        fetch_s = time.perf_counter() - t0
        say(f"fetched {len(paths)} instance(s) in {fetch_s:.1f} s")
        run = predict_scans([case_folder], out, options, progress=True, on_result=on_result)
        result = DicomwebRun(run=run, series_uid=series.series_uid, n_instances=len(paths), fetch_s=fetch_s)
        scan = run.results[0]
        if store_results and scan.status == "done":
            files = result_files(scan.details)
            if not files:
                skipped = scan.details.get("skipped_outputs", {})
                result.store_skipped = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no DICOM outputs"
                say(f"nothing to store: {result.store_skipped}")
            else:
                t1 = time.perf_counter()
                uids = store_files(client, url, files)
                result.store_s = time.perf_counter() - t1
                result.stored = {p.name: uid for p, uid in zip(files, uids)}
                say(f"stored {', '.join(result.stored)} into study {study_uid} on {url} ({result.store_s:.1f} s)")
        if scan.status == "done":
            write_json_atomic(Path(scan.out_dir) / RECORD_FILE, {
                "url": url, "study_instance_uid": study_uid, "series_instance_uid": series.series_uid,
                "n_instances": len(paths), "fetch_s": round(fetch_s, 3), "stored": result.stored,
                "store_skipped": result.store_skipped, "auth": (auth or DicomwebAuth()).describe()})
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _patient_folder_name(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    return _UNSAFE.sub("_", str(ds.get("PatientID", "") or "")).strip("._") or "dicomweb"
