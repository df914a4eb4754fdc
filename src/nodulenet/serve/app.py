"""The HTTP API of ``nodulenet serve`` (FastAPI): :func:`create_app`.

Endpoints (JSON unless said; every one but ``/health`` needs ``Authorization: Bearer <token>``)::

    GET    /health                       liveness, no token
    GET    /openapi.json                 the OpenAPI schema of this API
    GET    /v1/info                      version, model (name, weights SHA-256), device, workers, limits, disclaimer
    POST   /v1/jobs                      multipart upload (see nodulenet.serve.uploads) -> 201 + the job
    GET    /v1/jobs?limit=&offset=&state=   jobs, newest first, with the total
    GET    /v1/jobs/{id}                 state, progress, stage, error; a done job adds result, files, predict_config
    GET    /v1/jobs/{id}/nodules         nodules.json of the scan (as local predict writes it)
    GET    /v1/jobs/{id}/mask            the label map (labels.nii.gz / .nii / .nrrd; value = finding id)
    GET    /v1/jobs/{id}/seg             DICOM SEG (DICOM input only; 404 with the reason otherwise)
    GET    /v1/jobs/{id}/report          report.html
    GET    /v1/jobs/{id}/files           every output file with its size and SHA-256
    GET    /v1/jobs/{id}/files/{name}    one of them
    DELETE /v1/jobs/{id}                 stop it if queued/running, delete its files and record

Status codes: 401 (+ ``WWW-Authenticate: Bearer``) without the right token; 404 for an unknown job or an output the
job does not have (with the reason); 409 for results of a job that is not done; 400/413/415 for uploads that are
refused (:mod:`nodulenet.serve.uploads`); 503 + ``Retry-After`` when ``queue_size`` jobs are already queued.
Errors are ``{"detail": "one line"}``.
"""

from __future__ import annotations

import hmac
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect

import nodulenet
from nodulenet.serve.schemas import DeletedOut, ErrorOut, FileListOut, HealthOut, InfoOut, JobListOut, JobOut
from nodulenet.serve.settings import API_VERSION, DISCLAIMER, ServerSettings
from nodulenet.serve.store import STATES, Job, JobStore, NewJob
from nodulenet.serve.uploads import (ACCEPTED, MultipartReceiver, UploadError, ZipLimits, parse_job_options,
                                     prepare_input)

logger = logging.getLogger("nodulenet.serve")

RETRY_AFTER_S = 5
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_MEDIA = {".json": "application/json", ".csv": "text/csv", ".html": "text/html; charset=utf-8",
          ".dcm": "application/dicom"}
_UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": f"The scan: {ACCEPTED} (1 part, or 2 for .mhd + .raw/.zraw)"},
                "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                              "description": "Report detections scoring at least this (default: the server's)"},
                "label_format": {"type": "string", "enum": ["nii.gz", "nii", "nrrd"]},
                "dicom_outputs": {"type": "boolean", "description": "DICOM SEG + SR for DICOM input (default true)"},
                "scan_member": {"type": "string", "description": "DICOM zip: path in the zip of a slice whose "
                                                                 "series to read (default: the largest CT series)"},
            }}}},
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorOut, "description": "Missing or wrong bearer token"},
                                            404: {"model": ErrorOut, "description": "No such job (or output)"}}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(settings: ServerSettings, *, store: JobStore | None = None, pool: Any = None) -> FastAPI:
    """The FastAPI application over ``settings.data_dir``. ``pool`` (a :class:`~nodulenet.serve.worker.WorkerPool`)
    runs the jobs; without one the API only stores them (they run when a server with workers starts)."""
    store = store or JobStore(settings.db_path)
    jobs_dir = settings.jobs_dir
    jobs_dir.mkdir(parents=True, exist_ok=True)
    limits = ZipLimits(settings.max_zip_members, settings.max_unpacked_bytes, settings.max_zip_ratio)
    bearer = HTTPBearer(auto_error=False, description="The server's token (<data>/token, --token or "
                                                      "NODULENET_TOKEN)")
    expected = settings.token.encode("utf-8")

    def require_token(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    app = FastAPI(title="NoduleNet server", version=nodulenet.__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, description=f"Find, measure and outline lung nodules in chest CT. {DISCLAIMER}")
    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=_ERRORS)

    def workers_count() -> dict[str, int]:
        ready = pool.ready_count() if pool is not None else 0
        return {"configured": settings.workers, "ready": ready}

    @app.get("/health", response_model=HealthOut, tags=["server"])
    def health() -> dict[str, Any]:
        """Liveness (no token needed)."""
        workers = workers_count()
        return {"status": "ok", "ready": workers["ready"] >= workers["configured"], "workers": workers}

    @app.get("/openapi.json", dependencies=[Depends(require_token)], include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @api.get("/info", response_model=InfoOut, tags=["server"])
    def info() -> dict[str, Any]:
        """What this server runs and its limits."""
        described = pool.model_description() if pool is not None else None
        model = prediction = None
        if described:
            m = described["model"]
            model = {k: m.get(k) for k in ("name", "version", "weights_sha256", "config_sha256", "shipped")}
            model["weights_file"] = Path(m.get("weights_path") or "").name
            prediction = {k: described.get(k) for k in ("precision", "channels_last", "network_config",
                                                         "prepare_config", "prepare_config_source")}
        return {"name": "nodulenet", "version": nodulenet.__version__, "api_version": API_VERSION,
                "disclaimer": DISCLAIMER, "model": model, "prediction": prediction, "device": settings.device,
                "default_threshold": settings.threshold, "workers": workers_count(),
                "queue": {k: v for k, v in store.counts().items() if k != "cancelled"},
                "limits": settings.limits(), "accepted_inputs": ACCEPTED, "tls": settings.tls}

    def job_json(job: Job, full: bool = False) -> dict[str, Any]:
        base = f"/v1/jobs/{job.id}"
        d: dict[str, Any] = {
            "id": job.id, "state": job.state, "progress": round(job.progress, 3), "stage": job.stage,
            "error": job.error, "created": job.created, "started": job.started, "finished": job.finished,
            "attempts": job.attempts, "queue_position": store.queue_position(job),
            "input": {"kind": job.input_kind, "name": job.input_name, "bytes": job.input_bytes},
            "options": job.options, "links": {"self": base}}
        if job.state == "done" and job.result:
            scan_result = job.result["scan_result"]
            d["n_findings"] = scan_result["n_findings"]
            d["seconds"] = scan_result["seconds"]
            d["links"].update({k: f"{base}/{k}" for k in ("nodules", "mask", "report", "files")})
            if any(f["kind"] == "dicom_seg" for f in job.result["files"]):
                d["links"]["seg"] = f"{base}/seg"
            if full:
                d.update(result=scan_result, files=job.result["files"], predict_config=job.result["predict_config"])
        return d

    def get_job(job_id: str) -> Job:
        job = store.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None or job.state == "cancelled":
            raise HTTPException(404, f"no job {job_id} on this server")
        return job

    def done_job(job_id: str) -> Job:
        job = get_job(job_id)
        if job.state != "done" or not job.result:
            why = f": {job.error}" if job.state == "failed" and job.error else ""
            raise HTTPException(409, f"job {job_id} is {job.state}{why}; results exist once it is done")
        return job

    def send(job: Job, name: str) -> FileResponse:
        assert job.result is not None
        path = jobs_dir / job.id / "result" / job.result["scan_dir"] / name
        if not path.is_file():
            raise HTTPException(404, f"job {job.id}: {name} is missing on the server (deleted by hand?)")
        media = _MEDIA.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media, filename=name)

    def send_kind(job_id: str, kind: str, what: str) -> FileResponse:
        job = done_job(job_id)
        assert job.result is not None
        entry = next((f for f in job.result["files"] if f["kind"] == kind), None)
        if entry is None:
            reason = job.result["scan_result"].get("details", {}).get("skipped_outputs", {}).get(kind)
            raise HTTPException(404, f"job {job_id} has no {what}" + (f": {reason}" if reason else ""))
        return send(job, entry["name"])

    @api.post("/jobs", status_code=201, response_model=JobOut, tags=["jobs"], openapi_extra=_UPLOAD_OPENAPI,
              responses={400: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut},
                         503: {"model": ErrorOut, "description": "Queue full; retry after Retry-After seconds"}})
    async def submit(request: Request) -> JSONResponse:
        """Upload one scan; it is checked, unpacked and queued (form fields: file, threshold, label_format,
        dicom_outputs, scan_member)."""
        busy = _error(503, f"the queue is full ({settings.queue_size} jobs waiting); retry later",
                      {"Retry-After": str(RETRY_AFTER_S)})
        counts = await run_in_threadpool(store.counts)
        if counts["queued"] >= settings.queue_size:
            return busy
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            return _error(413, f"the upload ({int(length) / 1e6:.1f} MB) is larger than the server's limit of "
                               f"{settings.max_upload_mb:g} MB")
        job_id = uuid.uuid4().hex
        job_dir = jobs_dir / job_id
        (job_dir / "upload").mkdir(parents=True)
        receiver: MultipartReceiver | None = None
        try:
            receiver = MultipartReceiver(job_dir / "upload", request.headers.get("content-type"),
                                         settings.max_upload_bytes)
            async for chunk in request.stream():
                receiver.feed(chunk)
            upload = receiver.finish()
            options = parse_job_options(upload.fields, settings.threshold)
            job_input = await run_in_threadpool(prepare_input, upload, job_dir, limits)
            shutil.rmtree(job_dir / "upload", ignore_errors=True)
            new = NewJob(id=job_id, input_kind=job_input.kind, input_name=job_input.name,
                         input_bytes=job_input.bytes, scan_path=job_input.scan_path, options=options)
            job = await run_in_threadpool(store.create, new, settings.queue_size)
        except UploadError as exc:
            if receiver is not None:
                receiver.close()
            shutil.rmtree(job_dir, ignore_errors=True)
            logger.info("upload refused (%d): %s", exc.status, exc.detail)
            return _error(exc.status, exc.detail)
        except ClientDisconnect:
            if receiver is not None:
                receiver.close()
            shutil.rmtree(job_dir, ignore_errors=True)
            logger.info("upload abandoned by the client; nothing kept")
            return _error(400, "the client disconnected during the upload")
        except BaseException:
            if receiver is not None:
                receiver.close()
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        if job is None:
            shutil.rmtree(job_dir, ignore_errors=True)
            return busy
        logger.info("job %s: queued (%s %s, %d bytes, threshold %s)", job.id, job.input_kind, job.input_name,
                    job.input_bytes, options["threshold"])
        return JSONResponse(job_json(job), status_code=201, headers={"Location": f"/v1/jobs/{job.id}"})

    @api.get("/jobs", response_model=JobListOut, response_model_exclude_unset=True, tags=["jobs"])
    def list_jobs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                  state: Optional[str] = Query(None, description="queued | running | done | failed")) -> dict:
        """Jobs, newest first, one page at a time."""
        if state is not None and (state not in STATES or state == "cancelled"):
            raise HTTPException(400, f"state must be one of queued, running, done, failed; got {state!r}")
        total, jobs = store.list(limit, offset, state)
        more = offset + len(jobs) < total
        return {"total": total, "limit": limit, "offset": offset, "next_offset": offset + len(jobs) if more else None,
                "jobs": [job_json(j) for j in jobs]}

    @api.get("/jobs/{job_id}", response_model=JobOut, response_model_exclude_unset=True, tags=["jobs"])
    def job_status(job_id: str) -> dict[str, Any]:
        """State, progress and error; a done job adds its result, files and run config."""
        return job_json(get_job(job_id), full=True)

    @api.get("/jobs/{job_id}/nodules", tags=["results"], responses={409: {"model": ErrorOut}})
    def nodules(job_id: str) -> FileResponse:
        """nodules.json (schema nodulenet.nodules/1), exactly as local predict writes it."""
        return send_kind(job_id, "nodules_json", "nodules.json")

    @api.get("/jobs/{job_id}/mask", tags=["results"], responses={409: {"model": ErrorOut}})
    def mask(job_id: str) -> FileResponse:
        """The label map on the input's grid (value = finding id)."""
        return send_kind(job_id, "label_map", "label map")

    @api.get("/jobs/{job_id}/seg", tags=["results"], responses={409: {"model": ErrorOut}})
    def seg(job_id: str) -> FileResponse:
        """DICOM SEG of the findings (DICOM input only)."""
        return send_kind(job_id, "dicom_seg", "DICOM SEG")

    @api.get("/jobs/{job_id}/report", tags=["results"], responses={409: {"model": ErrorOut}})
    def report(job_id: str) -> FileResponse:
        """report.html."""
        return send_kind(job_id, "report_html", "report")

    @api.get("/jobs/{job_id}/files", response_model=FileListOut, tags=["results"], responses={409: {"model": ErrorOut}})
    def files(job_id: str) -> dict[str, Any]:
        """Every output file of the scan with its size and SHA-256 (to rebuild the local predict folder)."""
        job = done_job(job_id)
        assert job.result is not None
        return {"job": job.id, "scan_dir": job.result["scan_dir"], "files": job.result["files"]}

    @api.get("/jobs/{job_id}/files/{name}", tags=["results"], responses={409: {"model": ErrorOut}})
    def one_file(job_id: str, name: str) -> FileResponse:
        """One output file (a name from /files)."""
        job = done_job(job_id)
        assert job.result is not None
        if name not in {f["name"] for f in job.result["files"]}:
            raise HTTPException(404, f"job {job_id} has no output file {name!r}")
        return send(job, name)

    @api.delete("/jobs/{job_id}", response_model=DeletedOut, tags=["jobs"])
    def delete(job_id: str) -> dict[str, Any]:
        """Stop the job if it is queued or running, then delete its files and record."""
        if not _JOB_ID.match(job_id):
            raise HTTPException(404, f"no job {job_id} on this server")
        before = store.cancel(job_id)
        if before is None or before.state == "cancelled":
            raise HTTPException(404, f"no job {job_id} on this server")
        if before.state == "running" and pool is not None:
            pool.stop_job(before.worker_pid)
        shutil.rmtree(jobs_dir / job_id, ignore_errors=True)
        store.delete(job_id)
        logger.info("job %s: deleted (was %s)", job_id, before.state)
        return {"id": job_id, "deleted": True, "state": before.state}

    app.include_router(api)
    return app
