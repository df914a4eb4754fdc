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
    GET    /v1/jobs/{id}/volume          the scan as .nii.gz on the label map's grid (for the web viewer)
    GET    /v1/jobs/{id}/files           every output file with its size and SHA-256
    GET    /v1/jobs/{id}/files/{name}    one of them
    DELETE /v1/jobs/{id}                 stop it if queued/running, delete its files and record
    GET    /                             the web viewer's login page (no token; see nodulenet.serve.web)
    GET    /static/{name}, /app/{path}   the login page's files (no token) and the viewer's (token)

Status codes: 401 (+ ``WWW-Authenticate: Bearer``) without the right token; 404 for an unknown job or an output the
job does not have (with the reason); 409 for results of a job that is not done; 400/413/415 for uploads that are
refused (:mod:`nodulenet.serve.uploads`); 503 + ``Retry-After`` when ``queue_size`` jobs are already queued.
Errors are ``{"detail": "one line"}``.

The endpoints are in routers by topic (:mod:`~nodulenet.serve.routes_jobs`, :mod:`~nodulenet.serve.routes_results`,
:mod:`~nodulenet.serve.web`) over one :class:`~nodulenet.serve.context.AppContext`; this module puts them together
with the server endpoints (health, info, schema).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse

import nodulenet
from nodulenet.serve.context import ERRORS, AppContext, token_dependency
from nodulenet.serve.routes_jobs import jobs_router
from nodulenet.serve.routes_results import results_router
from nodulenet.serve.schemas import HealthOut, InfoOut
from nodulenet.serve.settings import API_VERSION, DISCLAIMER, ServerSettings
from nodulenet.serve.store import JobStore
from nodulenet.serve.uploads import ACCEPTED
from nodulenet.serve.web import web_router


def server_info(ctx: AppContext) -> dict[str, Any]:
    """``GET /v1/info``: what this server runs (model, prediction settings) and its limits."""
    described = ctx.pool.model_description() if ctx.pool is not None else None
    model = prediction = None
    if described:
        m = described["model"]
        model = {k: m.get(k) for k in ("name", "version", "weights_sha256", "config_sha256", "shipped")}
        model["weights_file"] = Path(m.get("weights_path") or "").name
        prediction = {k: described.get(k) for k in ("precision", "channels_last", "network_config",
                                                     "prepare_config", "prepare_config_source")}
    settings = ctx.settings
    return {"name": "nodulenet", "version": nodulenet.__version__, "api_version": API_VERSION,
            "disclaimer": DISCLAIMER, "model": model, "prediction": prediction, "device": settings.device,
            "default_threshold": settings.threshold, "workers": ctx.workers_count(),
            "queue": {k: v for k, v in ctx.store.counts().items() if k != "cancelled"},
            "limits": settings.limits(), "accepted_inputs": ACCEPTED, "tls": settings.tls}


def create_app(settings: ServerSettings, *, store: JobStore | None = None, pool: Any = None) -> FastAPI:
    """The FastAPI application over ``settings.data_dir``. ``pool`` (a :class:`~nodulenet.serve.worker.WorkerPool`)
    runs the jobs; without one the API only stores them (they run when a server with workers starts)."""
    ctx = AppContext(settings, store or JobStore(settings.db_path), pool)
    ctx.jobs_dir.mkdir(parents=True, exist_ok=True)
    require_token = token_dependency(settings.token)

    app = FastAPI(title="NoduleNet server", version=nodulenet.__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, description=f"Find, measure and outline lung nodules in chest CT. {DISCLAIMER}")

    @app.get("/health", response_model=HealthOut, tags=["server"])
    def health() -> dict[str, Any]:
        """Liveness (no token needed)."""
        workers = ctx.workers_count()
        return {"status": "ok", "ready": workers["ready"] >= workers["configured"], "workers": workers}

    @app.get("/openapi.json", dependencies=[Depends(require_token)], include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=ERRORS)

    @api.get("/info", response_model=InfoOut, tags=["server"])
    def info() -> dict[str, Any]:
        """What this server runs and its limits."""
        return server_info(ctx)

    api.include_router(jobs_router(ctx))
    api.include_router(results_router(ctx))
    app.include_router(api)
    app.include_router(web_router(require_token))
    return app
