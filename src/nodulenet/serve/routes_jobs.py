"""The job endpoints of the HTTP API: upload (``POST /v1/jobs``), list, status, delete. See
:mod:`nodulenet.serve.app` for the whole API."""

from __future__ import annotations

import logging
import shutil
import uuid
from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from nodulenet.serve.context import JOB_ID, AppContext
from nodulenet.serve.schemas import DeletedOut, ErrorOut, JobListOut, JobOut
from nodulenet.serve.store import STATES, Job, NewJob
from nodulenet.serve.uploads import ACCEPTED, MultipartReceiver, UploadError, parse_job_options, prepare_input

logger = logging.getLogger("nodulenet.serve")

RETRY_AFTER_S = 5
UPLOAD_OPENAPI: dict[str, Any] = {
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


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def receive_job(ctx: AppContext, request: Request) -> JSONResponse:
    """Stream one multipart upload into a new job folder, check and unpack it, and queue the job; a refused upload
    leaves nothing behind (see :mod:`nodulenet.serve.uploads`)."""
    settings = ctx.settings
    busy = error_response(503, f"the queue is full ({settings.queue_size} jobs waiting); retry later",
                          {"Retry-After": str(RETRY_AFTER_S)})
    counts = await run_in_threadpool(ctx.store.counts)
    if counts["queued"] >= settings.queue_size:
        return busy
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
        return error_response(413, f"the upload ({int(length) / 1e6:.1f} MB) is larger than the server's limit of "
                                   f"{settings.max_upload_mb:g} MB")
    job_id = uuid.uuid4().hex
    job_dir = ctx.jobs_dir / job_id
    (job_dir / "upload").mkdir(parents=True)
    receiver: MultipartReceiver | None = None

    def discard() -> None:
        if receiver is not None:
            receiver.close()
        shutil.rmtree(job_dir, ignore_errors=True)

    try:
        receiver = MultipartReceiver(job_dir / "upload", request.headers.get("content-type"),
                                     settings.max_upload_bytes)
        async for chunk in request.stream():
            receiver.feed(chunk)
        upload = receiver.finish()
        options = parse_job_options(upload.fields, settings.threshold)
        job_input = await run_in_threadpool(prepare_input, upload, job_dir, ctx.zip_limits)
        shutil.rmtree(job_dir / "upload", ignore_errors=True)
        new = NewJob(id=job_id, input_kind=job_input.kind, input_name=job_input.name,
                     input_bytes=job_input.bytes, scan_path=job_input.scan_path, options=options)
        job: Job | None = await run_in_threadpool(ctx.store.create, new, settings.queue_size)
    except UploadError as exc:
        discard()
        logger.info("upload refused (%d): %s", exc.status, exc.detail)
        return error_response(exc.status, exc.detail)
    except ClientDisconnect:
        discard()
        logger.info("upload abandoned by the client; nothing kept")
        return error_response(400, "the client disconnected during the upload")
    except BaseException:
        discard()
        raise
    if job is None:
        shutil.rmtree(job_dir, ignore_errors=True)
        return busy
    logger.info("job %s: queued (%s %s, %d bytes, threshold %s)", job.id, job.input_kind, job.input_name,
                job.input_bytes, options["threshold"])
    return JSONResponse(ctx.job_json(job), status_code=201, headers={"Location": f"/v1/jobs/{job.id}"})


def delete_job(ctx: AppContext, job_id: str) -> dict[str, Any]:
    """Stop the job if it is queued or running (a running one: its worker is killed), then delete its files and
    record."""
    if not JOB_ID.match(job_id):
        raise HTTPException(404, f"no job {job_id} on this server")
    before = ctx.store.cancel(job_id)
    if before is None or before.state == "cancelled":
        raise HTTPException(404, f"no job {job_id} on this server")
    if before.state == "running" and ctx.pool is not None:
        ctx.pool.stop_job(before.worker_pid)
    shutil.rmtree(ctx.jobs_dir / job_id, ignore_errors=True)
    ctx.store.delete(job_id)
    logger.info("job %s: deleted (was %s)", job_id, before.state)
    return {"id": job_id, "deleted": True, "state": before.state}


def jobs_router(ctx: AppContext) -> APIRouter:
    """``/jobs`` endpoints (mounted under ``/v1`` behind the token)."""
    router = APIRouter(tags=["jobs"])

    @router.post("/jobs", status_code=201, response_model=JobOut, openapi_extra=UPLOAD_OPENAPI,
                 responses={400: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut},
                            503: {"model": ErrorOut, "description": "Queue full; retry after Retry-After seconds"}})
    async def submit(request: Request) -> JSONResponse:
        """Upload one scan; it is checked, unpacked and queued (form fields: file, threshold, label_format,
        dicom_outputs, scan_member)."""
        return await receive_job(ctx, request)

    @router.get("/jobs", response_model=JobListOut, response_model_exclude_unset=True)
    def list_jobs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                  state: Optional[str] = Query(None, description="queued | running | done | failed")) -> dict:
        """Jobs, newest first, one page at a time."""
        if state is not None and (state not in STATES or state == "cancelled"):
            raise HTTPException(400, f"state must be one of queued, running, done, failed; got {state!r}")
        total, jobs = ctx.store.list(limit, offset, state)
        more = offset + len(jobs) < total
        return {"total": total, "limit": limit, "offset": offset, "next_offset": offset + len(jobs) if more else None,
                "jobs": [ctx.job_json(j) for j in jobs]}

    @router.get("/jobs/{job_id}", response_model=JobOut, response_model_exclude_unset=True)
    def job_status(job_id: str) -> dict[str, Any]:
        """State, progress and error; a done job adds its result, files and run config."""
        return ctx.job_json(ctx.get_job(job_id), full=True)

    @router.delete("/jobs/{job_id}", response_model=DeletedOut)
    def delete(job_id: str) -> dict[str, Any]:
        """Stop the job if it is queued or running, then delete its files and record."""
        return delete_job(ctx, job_id)

    return router
