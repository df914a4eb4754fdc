"""JSON shapes of the HTTP API (pydantic models): they make the OpenAPI schema (``GET /openapi.json``) say what
each endpoint returns. Times are UTC ISO 8601 strings; sizes in bytes unless a name says MB; progress 0..1."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    detail: str = Field(description="One line: what is wrong, naming the job, file or zip member")


class HealthOut(BaseModel):
    status: str = Field(description="'ok' while the server answers")
    ready: bool = Field(description="True when every configured worker has loaded the model")
    workers: dict[str, int] = Field(description="configured, ready")


class InputOut(BaseModel):
    kind: str = Field(description="nifti | nrrd | metaimage | dicom-zip | image-zip")
    name: str = Field(description="The uploaded file's name (sanitised)")
    bytes: int


class FileOut(BaseModel):
    name: str
    kind: str = Field(description="nodules_json, candidates_csv, label_map, dicom_seg, dicom_sr, report_html")
    bytes: int
    sha256: str


class JobOut(BaseModel):
    id: str = Field(description="uuid4 hex")
    state: str = Field(description="queued | running | done | failed")
    progress: float = Field(description="0..1")
    stage: str = Field(description="What the job is doing, in words")
    error: Optional[str] = Field(None, description="Why a failed job failed (one line)")
    created: str
    started: Optional[str] = None
    finished: Optional[str] = None
    attempts: int = Field(description="Runs started (a job interrupted by a crash is re-run once)")
    queue_position: Optional[int] = Field(None, description="Queued jobs ahead of this one (0: next)")
    input: InputOut
    options: dict[str, Any] = Field(description="threshold, label_format, dicom_outputs")
    n_findings: Optional[int] = None
    seconds: Optional[float] = Field(None, description="Prediction time on the server (done jobs)")
    result: Optional[dict[str, Any]] = Field(None, description="GET /v1/jobs/{id} of a done job: the scan's result "
                                                               "as in predict's summary.json (paths relative)")
    files: Optional[list[FileOut]] = Field(None, description="GET /v1/jobs/{id} of a done job: its output files")
    predict_config: Optional[dict[str, Any]] = Field(None, description="GET /v1/jobs/{id} of a done job: "
                                                                       "predict_config.json of its run")
    links: dict[str, str]


class JobListOut(BaseModel):
    total: int = Field(description="Jobs matching (all pages)")
    limit: int
    offset: int
    next_offset: Optional[int] = Field(None, description="offset of the next page, null on the last")
    jobs: list[JobOut] = Field(description="Newest first")


class FileListOut(BaseModel):
    job: str
    scan_dir: str = Field(description="The folder name predict gave the scan's outputs on the server")
    files: list[FileOut]


class DeletedOut(BaseModel):
    id: str
    deleted: bool
    state: str = Field(description="The job's state when it was deleted (a running job was stopped)")


class InfoOut(BaseModel):
    name: str
    version: str = Field(description="nodulenet version of the server")
    api_version: int
    disclaimer: str
    model: Optional[dict[str, Any]] = Field(None, description="name, version, weights_sha256, config_sha256, "
                                                              "shipped; null while no worker has loaded it")
    prediction: Optional[dict[str, Any]] = Field(None, description="precision, network_config, prepare_config: "
                                                                   "what decides the results besides the model")
    device: str
    default_threshold: float
    workers: dict[str, int] = Field(description="configured, ready")
    queue: dict[str, int] = Field(description="jobs per state")
    limits: dict[str, Any] = Field(description="max_upload_mb, max_unpacked_mb, max_zip_members, max_zip_ratio, "
                                               "queue_size, max_attempts")
    accepted_inputs: str
    tls: bool
