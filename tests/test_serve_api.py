"""The HTTP API in-process (FastAPI TestClient, no workers: jobs stay queued): bearer auth on every endpoint but
/health, the bounded queue (503 + Retry-After), pagination, DELETE, 404/409 with reasons, uploads refused with 4xx
leaving nothing behind, and the OpenAPI schema."""

from __future__ import annotations

import gzip
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest

from nodulenet.serve.app import create_app
from nodulenet.serve.settings import DISCLAIMER, ServerSettings

TOKEN = "api-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NIFTI = gzip.compress((348).to_bytes(4, "little") + b"\0" * 344 + b"n+1\0" + b"\0" * 4)


# starlette deprecates its httpx-based TestClient in favour of a package this project does not install
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture
def api(tmp_path: Path):
    from fastapi.testclient import TestClient

    settings = ServerSettings(data_dir=tmp_path / "data", token=TOKEN, workers=0, queue_size=3, max_upload_mb=0.05,
                              max_zip_members=10)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def _submit(client: Any, name: str = "scan.nii.gz", data: bytes = NIFTI, **fields: str):
    return client.post("/v1/jobs", headers=AUTH, files={"file": (name, data)}, data=fields)


def test_every_endpoint_but_health_needs_the_token(api) -> None:
    client, _ = api
    assert client.get("/health").status_code == 200
    job = _submit(client).json()["id"]
    endpoints = [("GET", "/v1/info"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{job}"),
                 ("GET", f"/v1/jobs/{job}/nodules"), ("GET", f"/v1/jobs/{job}/mask"), ("GET", f"/v1/jobs/{job}/seg"),
                 ("GET", f"/v1/jobs/{job}/report"), ("GET", f"/v1/jobs/{job}/files"),
                 ("GET", f"/v1/jobs/{job}/files/nodules.json"), ("DELETE", f"/v1/jobs/{job}"), ("GET", "/openapi.json")]
    for method, path in endpoints:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
    assert client.get(f"/v1/jobs/{job}", headers=AUTH).json()["state"] == "queued"  # nothing was deleted


def test_info_states_model_limits_and_the_disclaimer(api) -> None:
    client, settings = api
    info = client.get("/v1/info", headers=AUTH).json()
    assert info["disclaimer"] == DISCLAIMER and "not a medical device" in info["disclaimer"]
    assert info["limits"]["max_upload_mb"] == 0.05 and info["limits"]["queue_size"] == 3
    assert info["workers"] == {"configured": 0, "ready": 0} and info["model"] is None
    assert info["api_version"] == 1


def test_queue_full_is_503_with_retry_after_and_nothing_kept(api) -> None:
    client, settings = api
    ids = [_submit(client).json()["id"] for _ in range(3)]
    r = _submit(client)
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0 and "queue is full" in r.json()["detail"]
    assert sorted(p.name for p in settings.jobs_dir.iterdir()) == sorted(ids)


def test_pagination_newest_first_with_total(api) -> None:
    client, settings = api
    ids = [_submit(client).json()["id"] for _ in range(3)]
    page = client.get("/v1/jobs?limit=2&offset=0", headers=AUTH).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["next_offset"] == 2
    last = client.get("/v1/jobs", params={"limit": 2, "offset": page["next_offset"]}, headers=AUTH).json()
    assert [j["id"] for j in last["jobs"]] == [ids[0]] and last["next_offset"] is None
    assert client.get("/v1/jobs?state=done", headers=AUTH).json()["total"] == 0
    assert client.get("/v1/jobs?limit=0", headers=AUTH).status_code == 422
    assert client.get("/v1/jobs?state=sleeping", headers=AUTH).status_code == 400


def test_job_json_and_results_before_done(api) -> None:
    client, _ = api
    first = _submit(client, threshold="0.8").json()
    second = _submit(client).json()
    job = client.get(f"/v1/jobs/{second['id']}", headers=AUTH).json()
    assert job["state"] == "queued" and job["queue_position"] == 1 and job["progress"] == 0.0
    assert job["input"] == {"kind": "nifti", "name": "scan.nii.gz", "bytes": len(NIFTI)}
    assert first["options"] == {"threshold": 0.8, "label_format": "nii.gz", "dicom_outputs": True}
    r = client.get(f"/v1/jobs/{first['id']}/nodules", headers=AUTH)
    assert r.status_code == 409 and "is queued" in r.json()["detail"]
    r = client.get("/v1/jobs/0123456789abcdef0123456789abcdef", headers=AUTH)
    assert r.status_code == 404 and "no job 0123456789abcdef0123456789abcdef" in r.json()["detail"]
    assert client.get("/v1/jobs/..%2F..%2Fetc", headers=AUTH).status_code == 404


def test_delete_removes_a_queued_job_and_its_files(api) -> None:
    client, settings = api
    job = _submit(client).json()["id"]
    assert (settings.jobs_dir / job / "input" / "scan.nii.gz").is_file()
    r = client.delete(f"/v1/jobs/{job}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"id": job, "deleted": True, "state": "queued"}
    assert not (settings.jobs_dir / job).exists()
    assert client.get(f"/v1/jobs/{job}", headers=AUTH).status_code == 404
    assert client.delete(f"/v1/jobs/{job}", headers=AUTH).status_code == 404


def _zip(members: list[tuple[str, bytes, int]]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode:
                info.create_system = 3
                info.external_attr = mode << 16
            archive.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize("name, data, status, words", [
    ("slip.zip", _zip([("../../../escaped.dcm", b"owned", 0)]), 400, "escapes the job folder"),
    ("abs.zip", _zip([("/tmp/escaped.dcm", b"owned", 0)]), 400, "absolute path"),
    ("link.zip", _zip([("link.dcm", b"/etc/passwd", stat.S_IFLNK | 0o777)]), 400, "symbolic link"),
    ("bomb.zip", _zip([("zeros.dcm", b"\0" * 3_000_000, 0)]), 413, "zip bomb"),
    ("many.zip", _zip([(f"{i}.dcm", b"x", 0) for i in range(11)]), 413, "more than 10 files"),
    ("scan.png", b"\x89PNG....", 415, "unsupported file type"),
    ("big.nii.gz", b"\x1f\x8b" + b"\0" * 60_000, 413, "limit of 0.05 MB"),
])
def test_refused_uploads_leave_nothing_anywhere(api, tmp_path: Path, name: str, data: bytes, status: int,
                                                words: str) -> None:
    client, settings = api
    before = {p for p in tmp_path.rglob("*")}
    r = _submit(client, name, data)
    assert r.status_code == status and words in r.json()["detail"]
    assert list(settings.jobs_dir.iterdir()) == []  # no job folder, no staging left
    assert client.get("/v1/jobs", headers=AUTH).json()["total"] == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if "escaped" in p.name]
    assert not Path("/tmp/escaped.dcm").exists()


def test_unknown_form_field_and_missing_file(api) -> None:
    client, _ = api
    r = client.post("/v1/jobs", headers=AUTH, files={"file": ("a.nii.gz", NIFTI)}, data={"weights": "/etc/x"})
    assert r.status_code == 400 and "unknown form field 'weights'" in r.json()["detail"]
    r = client.post("/v1/jobs", headers=AUTH, data={"threshold": "0.5"})
    assert r.status_code in (400, 415)


def test_openapi_documents_the_versioned_api(api) -> None:
    client, _ = api
    schema = client.get("/openapi.json", headers=AUTH).json()
    paths = schema["paths"]
    for path in ("/health", "/v1/info", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/nodules",
                 "/v1/jobs/{job_id}/mask", "/v1/jobs/{job_id}/seg", "/v1/jobs/{job_id}/report",
                 "/v1/jobs/{job_id}/files", "/v1/jobs/{job_id}/files/{name}"):
        assert path in paths, path
    upload = paths["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "threshold", "scan_member"} <= set(upload["properties"])
    assert "delete" in paths["/v1/jobs/{job_id}"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 404  # no public docs page: it could not fetch the schema anyway
