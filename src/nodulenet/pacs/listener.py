"""The DICOM listener of ``nodulenet serve --dicom-port``: a pynetdicom C-ECHO + C-STORE SCP that turns received
series into jobs of the server's durable queue (:class:`~nodulenet.serve.store.JobStore`).

- **Who may send**: only the calling AE titles of ``--dicom-allow-ae``; any other association is rejected at once
  (A-ASSOCIATE-RJ, "calling AE title not recognised") and logged with the caller's address. C-ECHO answers every
  accepted association, so a PACS administrator can test the link.
- **Receiving**: each instance is written at once (atomically) to ``<data>/dicom-incoming/<SeriesInstanceUID>/
  <SOPInstanceUID>.dcm``, so an instance that got "success" is on disk. Instances NoduleNet wrote itself (its SEG
  and SR coming back, e.g. when a whole study is forwarded) are answered with success and dropped.
- **Series complete**: when no instance of a series has arrived for ``--dicom-idle-s`` seconds, its folder is
  moved into a new job folder ``<data>/jobs/<id>/input/<SeriesInstanceUID>/`` (same file system: a rename) with
  ``dicom-series.json`` beside it, and the job is queued (``input_kind`` ``dicom-store``). From there it is an
  ordinary job: the workers predict it, it survives a restart, ``GET /v1/jobs`` lists it. Whether the series is a
  usable CT (modality, missing slices) is the reader's decision, so a bad series becomes a failed job whose error
  says why, with its instances kept in its input folder.
- **Restart**: series still in ``dicom-incoming/`` are picked up again (complete after another idle period); a
  series moved into a job folder whose job was not yet recorded (a crash in between) is moved back first
  (:func:`reclaim_unqueued_series`, called before the server's own recovery removes unknown job folders).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodulenet.errors import NoduleNetError
from nodulenet.export.dicom_source import MANUFACTURER
from nodulenet.io.atomic import write_bytes_atomic, write_json_atomic
from nodulenet.pacs.settings import DicomSettings
from nodulenet.serve.store import JobStore, NewJob, utc_now

logger = logging.getLogger("nodulenet.serve.dicom")

SERIES_RECORD = "dicom-series.json"
INPUT_KIND = "dicom-store"
# C-STORE failure statuses (PS3.4 GG.4): out of resources, cannot understand.
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass
class PendingSeries:
    """A series being received: where its files are and when the last one came."""

    series_uid: str
    folder: Path
    last_received: float  # time.monotonic()
    last_received_utc: str
    calling_ae: str = ""
    peer: str = ""
    study_uid: str = ""
    modality: str = ""
    patient_id: str = ""
    n_instances: int = 0
    sop_uids: set[str] = field(default_factory=set)


def _safe_uid(value: Any) -> str | None:
    """A UID usable as a folder/file name (digits and dots only), else None."""
    text = str(value or "").strip()
    return text if text and len(text) <= 64 and all(c.isdigit() or c == "." for c in text) else None


def reclaim_unqueued_series(data_dir: Path, store: JobStore, settings: DicomSettings) -> list[str]:
    """Job folders holding a received series but no job record (the server stopped between the move and the
    insert): move their series back to ``dicom-incoming/`` so nothing is lost. Returns the series moved back."""
    jobs_dir = data_dir / "jobs"
    if not jobs_dir.is_dir():
        return []
    known = store.all_ids()
    incoming = settings.incoming_dir(data_dir)
    moved = []
    for folder in jobs_dir.iterdir():
        record = folder / SERIES_RECORD
        if folder.name in known or not record.is_file():
            continue
        for series in (folder / "input").iterdir() if (folder / "input").is_dir() else []:
            target = incoming / series.name
            if target.exists():  # more of the same series arrived meanwhile: merge the files
                for f in series.iterdir():
                    os.replace(f, target / f.name)
            else:
                incoming.mkdir(parents=True, exist_ok=True)
                os.replace(series, target)
            moved.append(series.name)
        shutil.rmtree(folder, ignore_errors=True)
    for uid in moved:
        logger.warning("recovery: series %s was being queued when the server stopped; received again", uid)
    return moved


class SeriesAssembler:
    """Received instances grouped by series; a series idle for ``idle_s`` becomes a job (see the module doc)."""

    def __init__(self, data_dir: Path, store: JobStore, settings: DicomSettings, *, threshold: float,
                 queue_size: int) -> None:
        self.data_dir = data_dir
        self.store = store
        self.settings = settings
        self.threshold = threshold
        self.queue_size = queue_size
        self.incoming = settings.incoming_dir(data_dir)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, PendingSeries] = {}
        self._lock = threading.Lock()
        self.queued_jobs: list[str] = []
        self._resume()

    def _resume(self) -> None:
        """Series left in ``dicom-incoming/`` by a previous run: pending again, complete after one idle period."""
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            files = [f for f in folder.iterdir() if f.suffix == ".dcm"]
            info = self._read_info(folder)
            pending = PendingSeries(series_uid=folder.name, folder=folder, last_received=time.monotonic(),
                                    last_received_utc=utc_now(), n_instances=len(files),
                                    sop_uids={f.stem for f in files}, **info)
            self._pending[folder.name] = pending
            logger.info("series %s: %d instance(s) received before the restart; waiting %.0f s for more",
                        folder.name, len(files), self.settings.idle_s)

    @staticmethod
    def _read_info(folder: Path) -> dict[str, str]:
        try:
            d = json.loads((folder / ".series.json").read_text(encoding="utf-8"))
            return {k: str(d.get(k, "")) for k in ("calling_ae", "peer", "study_uid", "modality", "patient_id")}
        except (OSError, ValueError):
            return {}

    # -- C-STORE ---------------------------------------------------------------------------------------

    def receive(self, ds: Any, encoded: bytes, calling_ae: str, peer: str) -> tuple[int, str]:
        """Keep one received instance; returns (C-STORE status, comment)."""
        series_uid, sop_uid = _safe_uid(ds.get("SeriesInstanceUID")), _safe_uid(ds.get("SOPInstanceUID"))
        if series_uid is None or sop_uid is None:
            logger.warning("C-STORE from %s (%s): refused an instance without a valid SeriesInstanceUID/"
                           "SOPInstanceUID", calling_ae, peer)
            return STATUS_CANNOT_UNDERSTAND, "missing or invalid SeriesInstanceUID/SOPInstanceUID"
        modality = str(ds.get("Modality", ""))
        if modality in ("SEG", "SR") and str(ds.get("Manufacturer", "")) == MANUFACTURER:
            logger.info("C-STORE from %s: %s %s is NoduleNet's own result; not predicted", calling_ae, modality,
                        sop_uid)
            return 0x0000, ""
        with self._lock:
            pending = self._pending.get(series_uid)
            if pending is None:
                folder = self.incoming / series_uid
                folder.mkdir(parents=True, exist_ok=True)
                pending = PendingSeries(series_uid=series_uid, folder=folder, last_received=time.monotonic(),
                                        last_received_utc=utc_now(), calling_ae=calling_ae, peer=peer,
                                        study_uid=str(ds.get("StudyInstanceUID", "")), modality=modality,
                                        patient_id=str(ds.get("PatientID", "")))
                write_json_atomic(folder / ".series.json", {
                    "calling_ae": calling_ae, "peer": peer, "study_uid": pending.study_uid, "modality": modality,
                    "patient_id": pending.patient_id, "first_received": pending.last_received_utc})
                self._pending[series_uid] = pending
                logger.info("series %s: receiving from %s (%s), %s, study %s", series_uid, calling_ae, peer,
                            modality or "no modality", pending.study_uid)
            try:
                write_bytes_atomic(pending.folder / f"{sop_uid}.dcm", encoded)
            except OSError as exc:
                logger.error("series %s: cannot keep instance %s (%s)", series_uid, sop_uid, exc)
                return STATUS_OUT_OF_RESOURCES, f"cannot store the instance ({exc.strerror or exc})"
            if sop_uid not in pending.sop_uids:
                pending.sop_uids.add(sop_uid)
                pending.n_instances += 1
            pending.last_received = time.monotonic()
            pending.last_received_utc = utc_now()
        return 0x0000, ""

    # -- series complete -> job -----------------------------------------------------------------------

    def complete_idle(self, now: float | None = None) -> list[str]:
        """Queue every series idle for ``idle_s``; returns the new job ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [p for p in self._pending.values() if now - p.last_received >= self.settings.idle_s]
            created = []
            for pending in due:
                job_id = self._queue(pending)
                if job_id is not None:
                    del self._pending[pending.series_uid]
                    created.append(job_id)
                else:  # queue full: try again after another idle period
                    pending.last_received = now
        self.queued_jobs.extend(created)
        return created

    def _queue(self, pending: PendingSeries) -> str | None:
        job_id = uuid.uuid4().hex
        job_dir = self.data_dir / "jobs" / job_id
        (job_dir / "input").mkdir(parents=True)
        record = {"series_instance_uid": pending.series_uid, "study_instance_uid": pending.study_uid,
                  "modality": pending.modality, "patient_id": pending.patient_id, "calling_ae": pending.calling_ae,
                  "peer": pending.peer, "n_instances": pending.n_instances,
                  "last_received": pending.last_received_utc, "queued": utc_now()}
        write_json_atomic(job_dir / SERIES_RECORD, record)
        target = job_dir / "input" / pending.series_uid
        os.replace(pending.folder, target)
        size = sum(f.stat().st_size for f in target.iterdir() if f.suffix == ".dcm")
        name = f"{pending.modality or 'DICOM'} series {pending.series_uid} from {pending.calling_ae or 'unknown AE'}"
        options = {"threshold": self.threshold, "label_format": "nii.gz", "dicom_outputs": True, "dicom": record}
        try:
            job = self.store.create(NewJob(id=job_id, input_kind=INPUT_KIND, input_name=name, input_bytes=size,
                                           scan_path=f"input/{pending.series_uid}", options=options),
                                    self.queue_size)
        except Exception:  # noqa: BLE001 - the store is unusable: keep the series where it was and say so
            logger.error("series %s: cannot queue the job", pending.series_uid, exc_info=True)
            job = None
        if job is None:
            os.replace(target, pending.folder)
            shutil.rmtree(job_dir, ignore_errors=True)
            logger.warning("series %s: the job queue is full (%d queued); trying again in %.0f s",
                           pending.series_uid, self.queue_size, self.settings.idle_s)
            return None
        (target / ".series.json").unlink(missing_ok=True)  # dicom-series.json beside input/ says it all now
        logger.info("job %s: queued (series %s, %d instance(s) from %s, complete after %.0f s without new "
                    "instances)", job_id, pending.series_uid, pending.n_instances, pending.calling_ae,
                    self.settings.idle_s)
        return job_id

    def pending_series(self) -> list[str]:
        with self._lock:
            return list(self._pending)


class DicomListener:
    """The pynetdicom SCP + the thread that completes idle series (started and stopped by the server)."""

    def __init__(self, assembler: SeriesAssembler, settings: DicomSettings) -> None:
        self.assembler = assembler
        self.settings = settings
        self._server: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> None:
        try:
            from pynetdicom import (
                AE,
                ALL_TRANSFER_SYNTAXES,
                AllStoragePresentationContexts,
                evt,
            )
            from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
        except ImportError as exc:
            raise NoduleNetError(f"--dicom-port needs the pacs extra ({exc.name} is missing): "
                                 "pip install 'nodulenet[pacs]'") from None
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one INFO line per PDU otherwise
        ae = AE(ae_title=self.settings.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.settings.allowed_aes)
        ae.maximum_pdu_size = 0  # no limit: whole slices in one PDU
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ACCEPTED, self._on_accepted)]
        try:
            self._server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                           evt_handlers=handlers)
        except OSError as exc:
            raise NoduleNetError(f"cannot listen for DICOM on {self.settings.host}:{self.settings.port} "
                                 f"({exc.strerror or exc}); choose another --dicom-port") from None
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._complete_loop, name="nodulenet-dicom-series", daemon=True)
        self._thread.start()
        logger.info("DICOM listener %s on %s:%d; accepts calling AE title(s) %s; a series is complete after %.0f s "
                    "without new instances", self.settings.ae_title, self.settings.host, self.port,
                    ", ".join(self.settings.allowed_aes), self.settings.idle_s)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)

    def _complete_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.assembler.complete_idle()
            except Exception:  # noqa: BLE001 - the listener must stay up; the log keeps the trace
                logger.error("completing received series failed", exc_info=True)

    # -- pynetdicom event handlers (run in the association's thread) ----------------------------------

    @staticmethod
    def _requestor(event: Any) -> tuple[str, str]:
        req = event.assoc.requestor
        return str(req.ae_title).strip(), f"{req.address}:{req.port}"

    def _on_accepted(self, event: Any) -> None:
        ae, peer = self._requestor(event)
        logger.info("association from %s (%s) accepted", ae, peer)

    def _on_rejected(self, event: Any) -> None:
        ae, peer = self._requestor(event)
        logger.warning("association from %s (%s) refused: calling AE title not in --dicom-allow-ae (%s)", ae, peer,
                       ", ".join(self.settings.allowed_aes))

    def _on_echo(self, event: Any) -> int:
        ae, peer = self._requestor(event)
        logger.info("C-ECHO from %s (%s)", ae, peer)
        return 0x0000

    def _on_store(self, event: Any) -> Any:
        from pydicom.dataset import Dataset

        ae, peer = self._requestor(event)
        try:
            ds = event.dataset
            status, comment = self.assembler.receive(ds, event.encoded_dataset(), ae, peer)
        except Exception as exc:  # noqa: BLE001 - a bad instance is refused; the listener stays up
            logger.error("C-STORE from %s (%s): cannot read the instance (%s)", ae, peer, exc)
            status, comment = STATUS_CANNOT_UNDERSTAND, f"cannot read the instance ({type(exc).__name__})"
        if not comment:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = comment[:64]
        return answer
