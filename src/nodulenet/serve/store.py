"""The server's job store: one SQLite file (WAL) shared by the web process and its worker processes.

One row per job (table ``jobs``):

=================  =========================================================================================
``seq``            insertion order (INTEGER PRIMARY KEY): the queue is first in, first out
``id``             uuid4 hex, the job's public id and its folder name under ``<data>/jobs/``
``state``          ``queued`` -> ``running`` -> ``done`` | ``failed``; ``cancelled`` while a DELETE removes it
``created``,       UTC ISO 8601 times (``2025-01-31T12:00:00.123+00:00``); started/finished are None until then
``started``,
``finished``
``progress``       0..1, with ``stage`` in words ("predicting", "re-queued: ...")
``error``          one line for a failed job
``attempts``       how many times a worker started it (a crash re-queues it while attempts < max_attempts)
``input_kind``     ``nifti`` | ``nrrd`` | ``metaimage`` | ``dicom-zip`` | ``image-zip``; ``input_name`` the upload's
``input_name``,    file name, ``input_bytes`` its size
``input_bytes``
``scan_path``      the scan to read, relative to the job folder (always inside ``input/``)
``options``        JSON: threshold, label_format, dicom_outputs
``worker_pid``     the worker process running it, and that process's start time (psutil ``create_time``),
``worker_started`` so that a recycled pid is never taken for the worker
``result``         JSON written by the worker when done (``job_result.json``: scan result, files, config)
=================  =========================================================================================

Table ``workers`` holds what each live worker reported (loading / ready / failed, its model description).

Every state change is one short ``BEGIN IMMEDIATE`` transaction, so the web process and N workers never see a
half-made change; a worker claims the oldest queued job atomically. ``synchronous=FULL``: a committed change
survives a crash of any process (and of the machine).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    input_kind TEXT NOT NULL,
    input_name TEXT NOT NULL,
    input_bytes INTEGER NOT NULL DEFAULT 0,
    scan_path TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    worker_pid INTEGER,
    worker_started REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS workers (
    pid INTEGER PRIMARY KEY,
    slot INTEGER NOT NULL,
    started TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('loading', 'ready', 'failed')),
    model TEXT,
    error TEXT
);
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Job:
    """One row of ``jobs`` (JSON columns decoded)."""

    seq: int
    id: str
    state: str
    created: str
    input_kind: str
    input_name: str
    scan_path: str
    started: str | None = None
    finished: str | None = None
    progress: float = 0.0
    stage: str = ""
    error: str | None = None
    attempts: int = 0
    input_bytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    worker_pid: int | None = None
    worker_started: float | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["options"] = json.loads(d["options"] or "{}")
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return cls(**d)


@dataclass(frozen=True)
class NewJob:
    """What the web process knows when an upload has been checked and unpacked."""

    id: str
    input_kind: str
    input_name: str
    input_bytes: int
    scan_path: str
    options: dict[str, Any]


class JobStore:
    """The job table; every method opens its own short-lived connection (safe across threads and processes)."""

    def __init__(self, path: str | Path) -> None:
        from nodulenet.errors import InputError

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise InputError(self.path, f"job store schema {version} is newer than this nodulenet "
                                                f"understands ({SCHEMA_VERSION}); upgrade nodulenet")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise InputError(self.path, f"not a usable job store ({exc}); move it away to start with an empty "
                                        "one") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def connect(self) -> Any:
        """A short-lived connection with the store's settings (a context manager), for the tables other modules
        keep in the same file (:mod:`nodulenet.pacs.delivery`)."""
        return self._connect()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- the web process ---------------------------------------------------------------------------------

    def create(self, job: NewJob, queue_limit: int) -> Job | None:
        """Queue ``job``; None when ``queue_limit`` jobs are already queued (checked in the same transaction)."""
        with self._transaction() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if queued >= queue_limit:
                return None
            db.execute(
                "INSERT INTO jobs (id, state, created, stage, input_kind, input_name, input_bytes, scan_path, options)"
                " VALUES (?, 'queued', ?, 'queued', ?, ?, ?, ?, ?)",
                (job.id, utc_now(), job.input_kind, job.input_name, job.input_bytes, job.scan_path,
                 json.dumps(job.options)))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_row(row)

    def list(self, limit: int, offset: int, state: str | None = None) -> tuple[int, list[Job]]:
        """Newest first, without jobs being deleted; ``(total matching, one page)``."""
        where, args = ("WHERE state = ?", (state,)) if state else ("WHERE state != 'cancelled'", ())
        with self._connect() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                              (*args, limit, offset)).fetchall()
        return total, [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {r[0]: r[1] for r in rows}
        return {s: found.get(s, 0) for s in STATES}

    def queue_position(self, job: Job) -> int | None:
        """How many queued jobs run before this one (0: next), None when it is not queued."""
        if job.state != "queued":
            return None
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?",
                                  (job.seq,)).fetchone()[0])

    def cancel(self, job_id: str) -> Job | None:
        """Mark a queued or running job ``cancelled`` (no worker may claim or finish it after this); returns the
        job as it was before, or None when there is no such job."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] in ACTIVE_STATES:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, stage = 'cancelled' WHERE id = ?",
                           (utc_now(), job_id))
        return Job.from_row(row)

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def all_ids(self) -> set[str]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT id FROM jobs")}

    # -- workers -----------------------------------------------------------------------------------------

    def claim(self, worker_pid: int, worker_started: float) -> Job | None:
        """Atomically take the oldest queued job for this worker (None when the queue is empty)."""
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, finished = NULL, attempts = attempts + 1, "
                       "worker_pid = ?, worker_started = ?, progress = 0, stage = 'starting', error = NULL "
                       "WHERE id = ?", (utc_now(), worker_pid, worker_started, row["id"]))
            claimed = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return Job.from_row(claimed)

    def set_progress(self, job_id: str, worker_pid: int, progress: float, stage: str) -> bool:
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET progress = ?, stage = ? WHERE id = ? AND state = 'running' "
                             "AND worker_pid = ?", (float(progress), stage, job_id, worker_pid))
        return cur.rowcount == 1

    def finish(self, job_id: str, worker_pid: int | None, state: str, *, error: str | None = None,
               result: dict[str, Any] | None = None) -> bool:
        """``running`` -> ``done``/``failed``, only if still running for this worker (None: any worker).
        False when the job was cancelled or re-assigned meanwhile."""
        assert state in ("done", "failed")
        pid_clause, args = ("AND worker_pid = ?", (worker_pid,)) if worker_pid is not None else ("", ())
        with self._transaction() as db:
            cur = db.execute(
                f"UPDATE jobs SET state = ?, finished = ?, progress = ?, stage = ?, error = ?, result = ? "
                f"WHERE id = ? AND state = 'running' {pid_clause}",
                (state, utc_now(), 1.0 if state == "done" else 0.0, state, error,
                 None if result is None else json.dumps(result), job_id, *args))
        return cur.rowcount == 1

    def annotate_done(self, job_id: str, *, stage: str, error: str | None) -> bool:
        """Say what happened after a job was done (its results sent on to a PACS, or not yet): ``stage`` and
        ``error`` of a ``done`` job; False when the job is not done (deleted meanwhile)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET stage = ?, error = ? WHERE id = ? AND state = 'done'",
                             (stage, error, job_id))
        return cur.rowcount == 1

    def recover_running(self, job_ids: list[str] | None, *, max_attempts: int, reason: str,
                        count_attempt: bool = True) -> dict[str, str]:
        """Jobs left ``running`` by a process that is gone: re-queued while ``attempts < max_attempts``, else
        ``failed`` with ``reason``. ``job_ids`` None: every running job (server start). ``count_attempt`` False:
        the interruption was ours (clean shutdown, a cancel that hit the wrong job): the attempt is given back.
        Returns ``{job id: "queued" | "failed"}``."""
        actions: dict[str, str] = {}
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                if job_ids is not None and row["id"] not in job_ids:
                    continue
                attempts = row["attempts"] - (0 if count_attempt else 1)
                if attempts < max_attempts:
                    db.execute("UPDATE jobs SET state = 'queued', attempts = ?, progress = 0, stage = ?, "
                               "worker_pid = NULL, worker_started = NULL, started = NULL WHERE id = ?",
                               (max(attempts, 0), f"re-queued: {reason}", row["id"]))
                    actions[row["id"]] = "queued"
                else:
                    db.execute("UPDATE jobs SET state = 'failed', finished = ?, progress = 0, stage = 'failed', "
                               "error = ? WHERE id = ?",
                               (utc_now(), f"{reason} (attempt {row['attempts']} of {max_attempts})", row["id"]))
                    actions[row["id"]] = "failed"
        return actions

    def running_of(self, worker_pid: int) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'running' AND worker_pid = ?",
                              (worker_pid,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def running(self) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()
        return [Job.from_row(r) for r in rows]

    # -- worker registry -----------------------------------------------------------------------------------

    def clear_workers(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM workers")

    def worker_state(self, pid: int, slot: int, state: str, *, model: dict[str, Any] | None = None,
                     error: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO workers (pid, slot, started, state, model, error) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (pid, slot, utc_now(), state, None if model is None else json.dumps(model), error))

    def forget_worker(self, pid: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE pid = ?", (pid,))

    def workers(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM workers ORDER BY slot").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["model"] = json.loads(d["model"]) if d["model"] else None
            out.append(d)
        return out


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout_s`` passes; returns its last value (as bool)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
