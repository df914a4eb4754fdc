"""What every router of the HTTP API shares: :class:`AppContext` (settings, store, worker pool) with the job lookups
and file responses, and :func:`token_dependency` (the bearer check). The routers are in
:mod:`nodulenet.serve.routes_jobs`, :mod:`nodulenet.serve.routes_results` and :mod:`nodulenet.serve.web`;
:func:`nodulenet.serve.app.create_app` puts them together."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, HTTPException
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from nodulenet.serve.schemas import ErrorOut
from nodulenet.serve.settings import ServerSettings
from nodulenet.serve.store import Job, JobStore
from nodulenet.serve.uploads import ZipLimits

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MEDIA = {".json": "application/json", ".csv": "text/csv", ".html": "text/html; charset=utf-8",
         ".dcm": "application/dicom"}
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorOut, "description": "Missing or wrong bearer token"},
                                           404: {"model": ErrorOut, "description": "No such job (or output)"}}


def token_dependency(token: str) -> Callable[..., None]:
    """A FastAPI dependency that lets a request through only with ``Authorization: Bearer <token>`` (401 with
    ``WWW-Authenticate: Bearer`` otherwise). The token is never read from the query string: URLs end up in logs,
    browser histories and proxies."""
    bearer = HTTPBearer(auto_error=False, description="The server's token (<data>/token, --token or "
                                                      "NODULENET_TOKEN)")
    expected = token.encode("utf-8")

    def require_token(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    return require_token


@dataclass
class AppContext:
    """The server's state as the request handlers see it. ``pool`` (a :class:`~nodulenet.serve.worker.WorkerPool`)
    runs the jobs; None: the API only stores them."""

    settings: ServerSettings
    store: JobStore
    pool: Any = None

    @property
    def jobs_dir(self) -> Path:
        return self.settings.jobs_dir

    @property
    def zip_limits(self) -> ZipLimits:
        s = self.settings
        return ZipLimits(s.max_zip_members, s.max_unpacked_bytes, s.max_zip_ratio)

    def workers_count(self) -> dict[str, int]:
        ready = self.pool.ready_count() if self.pool is not None else 0
        return {"configured": self.settings.workers, "ready": ready}

    def job_json(self, job: Job, full: bool = False) -> dict[str, Any]:
        """A job as the API shows it; ``full`` adds a done job's result, files and run config."""
        base = f"/v1/jobs/{job.id}"
        d: dict[str, Any] = {
            "id": job.id, "state": job.state, "progress": round(job.progress, 3), "stage": job.stage,
            "error": job.error, "created": job.created, "started": job.started, "finished": job.finished,
            "attempts": job.attempts, "queue_position": self.store.queue_position(job),
            "input": {"kind": job.input_kind, "name": job.input_name, "bytes": job.input_bytes},
            "options": job.options, "links": {"self": base}}
        if job.state == "done" and job.result:
            scan_result = job.result["scan_result"]
            d["n_findings"] = scan_result["n_findings"]
            d["seconds"] = scan_result["seconds"]
            d["links"].update({k: f"{base}/{k}" for k in ("nodules", "mask", "report", "files", "volume")})
            if any(f["kind"] == "dicom_seg" for f in job.result["files"]):
                d["links"]["seg"] = f"{base}/seg"
            if full:
                d.update(result=scan_result, files=job.result["files"], predict_config=job.result["predict_config"])
        return d

    def get_job(self, job_id: str) -> Job:
        job = self.store.get(job_id) if JOB_ID.match(job_id) else None
        if job is None or job.state == "cancelled":
            raise HTTPException(404, f"no job {job_id} on this server")
        return job

    def done_job(self, job_id: str) -> Job:
        job = self.get_job(job_id)
        if job.state != "done" or not job.result:
            why = f": {job.error}" if job.state == "failed" and job.error else ""
            raise HTTPException(409, f"job {job_id} is {job.state}{why}; results exist once it is done")
        return job

    def result_path(self, job: Job, name: str) -> Path:
        assert job.result is not None
        return self.jobs_dir / job.id / "result" / job.result["scan_dir"] / name

    def send(self, job: Job, name: str) -> FileResponse:
        path = self.result_path(job, name)
        if not path.is_file():
            raise HTTPException(404, f"job {job.id}: {name} is missing on the server (deleted by hand?)")
        media = MEDIA.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media, filename=name)

    def file_of_kind(self, job_id: str, kind: str, what: str) -> tuple[Job, str]:
        """The done job and the name of its output file of ``kind`` (404 with the reason when it has none)."""
        job = self.done_job(job_id)
        assert job.result is not None
        entry = next((f for f in job.result["files"] if f["kind"] == kind), None)
        if entry is None:
            reason = job.result["scan_result"].get("details", {}).get("skipped_outputs", {}).get(kind)
            raise HTTPException(404, f"job {job_id} has no {what}" + (f": {reason}" if reason else ""))
        return job, entry["name"]

    def send_kind(self, job_id: str, kind: str, what: str) -> FileResponse:
        return self.send(*self.file_of_kind(job_id, kind, what))
