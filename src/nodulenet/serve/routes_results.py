"""The result endpoints of the HTTP API (``/v1/jobs/{id}/...`` of a done job), including the scan as NIfTI for the
web viewer (``/volume``). See :mod:`nodulenet.serve.app` for the whole API."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from nodulenet.errors import NoduleNetError
from nodulenet.serve.context import AppContext
from nodulenet.serve.schemas import ErrorOut, FileListOut
from nodulenet.serve.store import Job

logger = logging.getLogger("nodulenet.serve")

VIEWER_SCAN = Path("viewer") / "scan.nii.gz"  # under the job folder, beside result/ (not one of predict's outputs)
# /jobs/{id}/<name>: the job's output file of <kind> (404 naming <what> when it has none)
KIND_ROUTES = (("nodules", "nodules_json", "nodules.json",
                "nodules.json (schema nodulenet.nodules/1), exactly as local predict writes it."),
               ("mask", "label_map", "label map", "The label map on the input's grid (value = finding id)."),
               ("seg", "dicom_seg", "DICOM SEG", "DICOM SEG of the findings (DICOM input only)."),
               ("report", "report_html", "report", "report.html."))
_CONVERTING: dict[str, threading.Lock] = {}
_CONVERTING_GUARD = threading.Lock()


def viewer_scan(ctx: AppContext, job: Job) -> Path:
    """The job's scan as ``.nii.gz`` for the browser, written once (atomic) on first request.

    The scan is read with the same reader the worker used (:func:`nodulenet.io.scan.read_scan` on the job's input)
    and written by the same writer as the label map (:func:`nodulenet.io.image_files.write_image`), so the two
    files carry one geometry whatever the upload was (DICOM zip, .mhd, .nrrd, or a NIfTI whose qform and sform
    disagree): the overlay lies on the scan voxel for voxel.
    """
    from nodulenet.io.image_files import write_image
    from nodulenet.io.scan import read_scan

    job_dir = ctx.jobs_dir / job.id
    target = job_dir / VIEWER_SCAN
    if target.is_file():
        return target
    with _CONVERTING_GUARD:
        lock = _CONVERTING.setdefault(job.id, threading.Lock())
    with lock:  # two browser tabs opening the same job convert it once
        if not target.is_file():
            t0 = time.perf_counter()
            try:
                volume = read_scan(job_dir / job.scan_path)
                target.parent.mkdir(exist_ok=True)
                write_image(volume, target)
            except NoduleNetError as exc:
                raise HTTPException(500, f"job {job.id}: cannot make the viewer's copy of the scan: {exc}") from None
            logger.info("job %s: viewer scan written (%s, %.1f s)", job.id, "x".join(map(str, volume.array.shape)),
                        time.perf_counter() - t0)
    with _CONVERTING_GUARD:
        _CONVERTING.pop(job.id, None)
    return target


def results_router(ctx: AppContext) -> APIRouter:
    """``/jobs/{id}/...`` result endpoints (mounted under ``/v1`` behind the token); 409 before the job is done."""
    router = APIRouter(tags=["results"], responses={409: {"model": ErrorOut}})

    def sender(kind: str, what: str, doc: str) -> Callable[[str], FileResponse]:
        def send(job_id: str) -> FileResponse:
            return ctx.send_kind(job_id, kind, what)

        send.__doc__ = doc
        return send

    for name, kind, what, doc in KIND_ROUTES:
        router.add_api_route(f"/jobs/{{job_id}}/{name}", sender(kind, what, doc), methods=["GET"], name=name)

    @router.get("/jobs/{job_id}/volume")
    def volume(job_id: str) -> FileResponse:
        """The scan as NIfTI (.nii.gz) on the label map's grid, for the web viewer (made on first request)."""
        job = ctx.done_job(job_id)  # 409 before done, like every result
        return FileResponse(viewer_scan(ctx, job), media_type="application/gzip", filename="scan.nii.gz")

    @router.get("/jobs/{job_id}/files", response_model=FileListOut)
    def files(job_id: str) -> dict[str, Any]:
        """Every output file of the scan with its size and SHA-256 (to rebuild the local predict folder)."""
        job = ctx.done_job(job_id)
        assert job.result is not None
        return {"job": job.id, "scan_dir": job.result["scan_dir"], "files": job.result["files"]}

    @router.get("/jobs/{job_id}/files/{name}")
    def one_file(job_id: str, name: str) -> FileResponse:
        """One output file (a name from /files)."""
        job = ctx.done_job(job_id)
        assert job.result is not None
        if name not in {f["name"] for f in job.result["files"]}:
            raise HTTPException(404, f"job {job_id} has no output file {name!r}")
        return ctx.send(job, name)

    return router
