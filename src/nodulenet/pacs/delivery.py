"""Sending each finished DICOM job's SEG + SR to ``--dicom-dest``, durably, until it is sent.

Table ``dicom_deliveries`` in the server's ``jobs.sqlite3`` (one row per job that had something to send):

==============  ==============================================================================================
``job_id``      the job (``jobs.id``)
``state``       ``pending`` (not sent yet; tried again at ``next_try``) -> ``sent`` | ``failed`` (gave up after
                ``max_delivery_attempts``; the files stay in the job's result folder)
``destination`` where it went or was tried (``AE@host:port`` or the DICOMweb URL)
``attempts``    how many sends were tried; ``error`` the last failure in one line
``sent``        the SOP Instance UIDs the destination took (JSON), ``updated`` / ``next_try`` UTC / epoch times
==============  ==============================================================================================

Which jobs are due is read from the job table itself (done jobs of kind ``dicom-store`` without a finished
delivery), so there is no window in which a job can exist without its delivery being known: a server that stops at
any moment sends, after its restart, whatever was not yet sent. The outcome is also written into the job's own
record (``stage``, and ``error`` while it is not sent), which is what ``GET /v1/jobs/{id}`` shows.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import NoduleNetError
from nodulenet.pacs.destination import SEND_ORDER, send_files
from nodulenet.pacs.listener import INPUT_KIND
from nodulenet.pacs.settings import RETRY_CAP_S, DicomSettings
from nodulenet.serve.store import JobStore, utc_now

logger = logging.getLogger("nodulenet.serve.dicom")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dicom_deliveries (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    destination TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    sent TEXT,
    updated TEXT NOT NULL,
    next_try REAL NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class Delivery:
    job_id: str
    state: str
    destination: str
    attempts: int
    error: str | None
    sent: list[str]
    updated: str
    next_try: float


class DeliveryStore:
    """The ``dicom_deliveries`` table, in the job store's file and with its connection settings."""

    def __init__(self, store: JobStore) -> None:
        self._connect = store.connect
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def due(self, now: float) -> list[dict[str, Any]]:
        """Done ``dicom-store`` jobs whose delivery is not finished and whose next try is due (oldest first)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT j.id, j.result FROM jobs j LEFT JOIN dicom_deliveries d ON d.job_id = j.id "
                "WHERE j.state = 'done' AND j.input_kind = ? AND (d.job_id IS NULL OR "
                "(d.state = 'pending' AND d.next_try <= ?)) ORDER BY j.seq", (INPUT_KIND, now)).fetchall()
        return [{"id": r["id"], "result": json.loads(r["result"]) if r["result"] else None} for r in rows]

    def get(self, job_id: str) -> Delivery | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM dicom_deliveries WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["sent"] = json.loads(d["sent"]) if d["sent"] else []
        return Delivery(**d)

    def record(self, job_id: str, *, state: str, destination: str, attempts: int, error: str | None = None,
               sent: list[str] | None = None, next_try: float = 0.0) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO dicom_deliveries (job_id, state, destination, attempts, error, sent, "
                       "updated, next_try) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, state, destination, attempts, error, json.dumps(sent) if sent is not None else None,
                        utc_now(), next_try))

    def forget_deleted_jobs(self) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM dicom_deliveries WHERE job_id NOT IN (SELECT id FROM jobs)")


def result_dicom_files(job_dir: Path, result: dict[str, Any] | None) -> list[Path]:
    """The DICOM files of a done job's result (SEG first, then SR, then any other DICOM output)."""
    if not result:
        return []
    scan_dir = job_dir / "result" / result["scan_dir"]
    dicom = [f for f in result.get("files", []) if str(f.get("kind", "")).startswith("dicom_")]
    rank = {kind: i for i, kind in enumerate(SEND_ORDER)}
    dicom.sort(key=lambda f: (rank.get(f["kind"], len(rank)), f["name"]))
    return [scan_dir / f["name"] for f in dicom]


class ResultSender:
    """The thread that sends due deliveries (see the module docstring); one per server process."""

    def __init__(self, data_dir: Path, store: JobStore, settings: DicomSettings) -> None:
        if settings.destination is None:
            raise ValueError("ResultSender needs a destination")
        self.data_dir = data_dir
        self.jobs = store
        self.settings = settings
        self.destination = settings.destination
        self.deliveries = DeliveryStore(store)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.deliveries.forget_deleted_jobs()
        self._thread = threading.Thread(target=self._loop, name="nodulenet-dicom-sender", daemon=True)
        self._thread.start()
        logger.info("results of DICOM jobs go to %s (%s)", self.destination,
                    "C-STORE" if self.destination.kind == "dimse" else "STOW-RS")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.send_due()
            except Exception:  # noqa: BLE001 - the sender must keep going; the log keeps the trace
                logger.error("sending results failed unexpectedly", exc_info=True)

    def send_due(self, now: float | None = None) -> int:
        """Try every due delivery once; returns how many were tried."""
        due = self.deliveries.due(time.time() if now is None else now)
        for job in due:
            if self._stop.is_set():
                break
            self.deliver(job["id"], job["result"])
        return len(due)

    def deliver(self, job_id: str, result: dict[str, Any] | None) -> None:
        previous = self.deliveries.get(job_id)
        attempts = (previous.attempts if previous else 0) + 1
        where = str(self.destination)
        files = result_dicom_files(self.data_dir / "jobs" / job_id, result)
        if not files:
            skipped = "; ".join(f"{k}: {v}" for k, v in ((result or {}).get("scan_result", {}).get("details", {})
                                                          .get("skipped_outputs", {}) or {}).items())
            note = f"done; nothing sent to {where}: no DICOM results ({skipped or 'none written'})"
            self.deliveries.record(job_id, state="sent", destination=where, attempts=attempts - 1, sent=[])
            self.jobs.annotate_done(job_id, stage=note, error=None)
            logger.info("job %s: %s", job_id, note)
            return
        names = " + ".join(p.name for p in files)
        t0 = time.perf_counter()
        try:
            sent = send_files(files, self.destination, calling_ae=self.settings.ae_title,
                              auth=self.settings.destination_auth)
        except NoduleNetError as exc:
            self._failed(job_id, attempts, names, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - recorded like any other failure; the trace goes to the log
            logger.error("job %s: sending %s failed", job_id, names, exc_info=True)
            self._failed(job_id, attempts, names, f"internal error: {type(exc).__name__}: {exc}")
            return
        self.deliveries.record(job_id, state="sent", destination=where, attempts=attempts, sent=sent)
        self.jobs.annotate_done(job_id, stage=f"done; {names} sent to {where}", error=None)
        logger.info("job %s: %s sent to %s in %.2f s (attempt %d)", job_id, names, where, time.perf_counter() - t0,
                    attempts)

    def _failed(self, job_id: str, attempts: int, names: str, error: str) -> None:
        where = str(self.destination)
        limit = self.settings.max_delivery_attempts
        if attempts >= limit:
            message = (f"{names} not sent to {where} after {attempts} attempts (kept in the job's result folder): "
                       f"{error}")
            self.deliveries.record(job_id, state="failed", destination=where, attempts=attempts, error=error)
            logger.error("job %s: %s", job_id, message)
        else:
            wait = min(RETRY_CAP_S, self.settings.retry_s * 2 ** (attempts - 1))
            message = f"{names} not sent to {where} yet (attempt {attempts} of {limit}, next in {wait:.0f} s): {error}"
            self.deliveries.record(job_id, state="pending", destination=where, attempts=attempts, error=error,
                                   next_try=time.time() + wait)
            logger.warning("job %s: %s", job_id, message)
        self.jobs.annotate_done(job_id, stage="done; results not sent", error=message)

    def retry_now(self) -> None:
        """Make every pending delivery due at once (tests; a future admin endpoint)."""
        with self.deliveries._connect() as db:
            db.execute("UPDATE dicom_deliveries SET next_try = 0 WHERE state = 'pending'")
