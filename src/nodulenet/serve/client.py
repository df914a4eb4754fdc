"""Client of ``nodulenet serve`` (httpx only: it does not need the ``server`` extra): :class:`ServerClient` and
:mod:`nodulenet.serve.client_predict` runs ``nodulenet predict --server URL`` with it.

What is uploaded for a scan (the same scan local ``predict`` would read):

- a DICOM folder: every file under it (recursively, as the DICOM reader searches), zipped on the fly into a temp file;
  a DICOM file: its folder, zipped, plus ``scan_member`` so that the server reads that file's series;
- ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``: the file; ``.mhd``: the header and the data file it names.

Errors are :class:`ServerError` (a :class:`~nodulenet.errors.NoduleNetError`: one line): the server cannot be reached
(names the URL), 401 (wrong/missing token), 413 (with the server's limit), 503 (queue full, :class:`ServerBusy`),
a failed job (:class:`JobFailed`, with the server's error).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import ssl
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import nodulenet
from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.header_text import parse_metaimage_header, read_head

ProgressCallback = Callable[[int, int], None]  # (bytes sent, total bytes)
JobCallback = Callable[[dict[str, Any]], None]  # the job's JSON at every poll
CHUNK = 1 << 20
_ENDS = ("nodules.json",)  # downloaded last: a folder holding it is complete


class ServerError(NoduleNetError):
    """The server refused a request or could not be reached; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        self.status = status
        self.detail = detail
        super().__init__(message)


class ServerUnreachable(ServerError):
    """No answer from the server (connection refused, DNS, TLS, timeout)."""


class ServerAuthError(ServerError):
    """401: the token is missing or wrong."""


class ServerBusy(ServerError):
    """503: the server's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message, 503)


class JobFailed(ServerError):
    """The job ended ``failed`` on the server; ``job`` is its JSON (``job["error"]`` says why)."""

    def __init__(self, message: str, job: dict[str, Any]) -> None:
        self.job = job
        super().__init__(message, None, job.get("error"))


def read_token(token: str | os.PathLike[str] | None) -> str:
    """``token`` itself, or the content of the file it names; an error saying where to find it when None."""
    if token is None or str(token).strip() == "":
        raise NoduleNetError("no server token: pass --token TOKEN (or the path of a file holding it) or set "
                             "NODULENET_TOKEN; the server keeps it in <data>/token")
    candidate = Path(str(token)).expanduser()
    try:
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8").strip()
            if not text:
                raise InputError(candidate, "the token file is empty")
            return text
    except OSError:  # a token that is not a valid path (too long...) is the token
        pass
    return str(token).strip()


# ------------------------------------------------------------------------------------------------ uploads


@dataclass
class UploadPlan:
    """The files (upload name, local path) and form fields that carry one scan."""

    files: list[tuple[str, Path]]
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.files)


def _metaimage_data(path: Path) -> str | None:
    """The ElementDataFile of a MetaImage header (None for LOCAL)."""
    header = parse_metaimage_header(read_head(path), path)
    return None if header.local else header.data_file


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _zip_folder(folder: Path, dest: Path) -> int:
    """Zip every regular file under ``folder`` (recursively, as the DICOM reader searches); returns the count."""
    count = 0
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                path = Path(root) / name
                if path.is_file():
                    archive.write(path, path.relative_to(folder).as_posix())
                    count += 1
    return count


@contextmanager
def upload_plan(scan: str | Path) -> Iterator[UploadPlan]:
    """What to send for ``scan`` (see the module docstring); a temp zip is removed afterwards."""
    scan = Path(scan)
    if not scan.exists():
        raise InputError(scan, "does not exist")
    low = scan.name.lower()
    if scan.is_file() and low.endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
        if low.endswith(".mha") and _metaimage_data(scan) is not None:
            raise InputError(scan, "this .mha keeps its data in another file; the server takes a self-contained "
                                   ".mha (ElementDataFile = LOCAL) or a .mhd with its .raw")
        yield UploadPlan([(scan.name, scan)])
        return
    if scan.is_file() and low.endswith(".mhd"):
        data = _metaimage_data(scan)
        if data is None:
            yield UploadPlan([(scan.name, scan)])
            return
        data_path = scan.parent / data
        if "/" in data or "\\" in data or not data_path.is_file():
            raise InputError(scan, f"its data file {data!r} must be a file beside the header to upload it")
        yield UploadPlan([(scan.name, scan), (data_path.name, data_path)])
        return
    if scan.is_file() and low.endswith((".nhdr", ".raw", ".zraw")):
        raise InputError(scan, "the server takes .nii, .nii.gz, .nrrd (attached data), .mha, .mhd (with its "
                               ".raw/.zraw) or a DICOM folder")
    member = None
    folder = scan
    if scan.is_file():
        if not _is_dicom_file(scan):
            raise InputError(scan, "unsupported scan file type; give a DICOM folder or file, .mhd, .mha, .nii, "
                                   ".nii.gz or .nrrd")
        folder, member = scan.parent, scan.name  # the server reads this file's series, as local predict does
    fd, tmp = tempfile.mkstemp(prefix="nodulenet-upload-", suffix=".zip")
    os.close(fd)
    try:
        if _zip_folder(folder, Path(tmp)) == 0:
            raise InputError(folder, "the folder holds no files")
        plan = UploadPlan([(f"{folder.name or 'dicom'}.zip", Path(tmp))])
        if member:
            plan.fields["scan_member"] = member
        yield plan
    finally:
        Path(tmp).unlink(missing_ok=True)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_body(plan: UploadPlan, fields: dict[str, str], progress: ProgressCallback | None = None
                   ) -> tuple[str, int, Callable[[], Iterator[bytes]]]:
    """``(content type, length, body factory)``: a ``multipart/form-data`` body streamed from the files in chunks
    (never read whole into memory), reporting bytes sent to ``progress``."""
    boundary = f"nodulenet-{secrets.token_hex(16)}"
    heads: list[tuple[bytes, Path | bytes]] = []
    for name, value in {**plan.fields, **fields}.items():
        heads.append((f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode(),
                      value.encode("utf-8")))
    for upload_name, path in plan.files:
        heads.append((f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quote(upload_name)}"'
                      f'\r\nContent-Type: application/octet-stream\r\n\r\n'.encode("utf-8"), path))
    tail = f"--{boundary}--\r\n".encode()
    length = len(tail) + sum(len(h) + (len(v) if isinstance(v, bytes) else v.stat().st_size) + 2 for h, v in heads)

    def body() -> Iterator[bytes]:
        sent = 0
        for head, value in heads:
            yield head
            if isinstance(value, bytes):
                yield value
            else:
                with open(value, "rb") as f:
                    while block := f.read(CHUNK):
                        sent += len(block)
                        if progress is not None:
                            progress(sent, plan.total_bytes)
                        yield block
            yield b"\r\n"
        yield tail

    return f"multipart/form-data; boundary={boundary}", length, body


# ------------------------------------------------------------------------------------------------- client


class ServerClient:
    """One nodulenet server: ``ServerClient("http://127.0.0.1:8000", token)`` (token or a file holding it).

    ``timeout`` (s) bounds every read and write; ``verify``: True (the system's CAs), False (no check), the path of
    a CA/certificate PEM file (a self-signed server) or an ``ssl.SSLContext``. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, url: str, token: str | os.PathLike[str] | None, *, timeout: float = 60.0,
                 verify: bool | str | os.PathLike[str] | ssl.SSLContext = True) -> None:
        if not re.match(r"^https?://[^/]+", url or ""):
            raise NoduleNetError(f"server URL must look like http://host:port or https://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        if isinstance(verify, (str, os.PathLike)):
            try:
                verify = ssl.create_default_context(cafile=os.fspath(verify))
            except (OSError, ssl.SSLError) as exc:
                raise InputError(Path(verify), f"cannot use it to check the server's certificate ({exc})") from None
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  verify=verify, headers={"Authorization": f"Bearer {read_token(token)}",
                                                          "User-Agent": f"nodulenet/{nodulenet.__version__}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerUnreachable(f"{what}: the server at {self.url} did not answer within {self.timeout:g} s") \
                from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{what}: cannot reach the nodulenet server at {self.url} "
                                    f"({exc or type(exc).__name__})") from None
        self._check(response, what)
        return response

    @contextmanager
    def _stream(self, path: str, what: str) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                self._check(response, what)
                yield response
        except httpx.TimeoutException:
            raise ServerUnreachable(f"{what}: the server at {self.url} did not answer within {self.timeout:g} s") \
                from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{what}: connection to {self.url} failed ({exc or type(exc).__name__})") \
                from None

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        try:
            detail = str(response.json().get("detail"))
        except ValueError:
            detail = response.text.strip()[:200] or response.reason_phrase
        if status == 401:
            raise ServerAuthError(f"the server at {self.url} refused the token (401 {detail}); check --token or "
                                  "NODULENET_TOKEN", status, detail)
        if status == 503:
            retry = response.headers.get("retry-after", "5")
            raise ServerBusy(f"{what}: the server at {self.url} is busy ({detail})",
                             float(retry) if retry.replace(".", "", 1).isdigit() else 5.0)
        raise ServerError(f"{what}: {detail} ({status} from {self.url})", status, detail)

    # -- API ---------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._send("GET", "/health", "health check").json()

    def info(self) -> dict[str, Any]:
        """Server version, model (name, weights SHA-256), device, workers, limits, disclaimer."""
        return self._send("GET", "/v1/info", "server info").json()

    def submit(self, scan: str | Path, *, threshold: float | None = None, label_format: str | None = None,
               dicom_outputs: bool | None = None, progress: ProgressCallback | None = None,
               max_upload_mb: float | None = None) -> dict[str, Any]:
        """Upload ``scan`` as a new job; returns the job's JSON (``id``, ``state`` "queued", ...).

        Raises :class:`ServerBusy` when the queue is full and :class:`ServerError` when the upload is refused
        (the message is the server's, naming the file or zip member). ``max_upload_mb`` (the server's limit, from
        :meth:`info`) refuses a too-large upload here, before sending it."""
        fields: dict[str, str] = {}
        if threshold is not None:
            fields["threshold"] = repr(float(threshold))
        if label_format is not None:
            fields["label_format"] = label_format
        if dicom_outputs is not None:
            fields["dicom_outputs"] = "true" if dicom_outputs else "false"
        with upload_plan(scan) as plan:
            content_type, length, body = multipart_body(plan, fields, progress)
            if max_upload_mb is not None and length > max_upload_mb * 1e6:
                raise ServerError(f"upload of {scan}: {length / 1e6:.1f} MB is larger than the server's limit of "
                                  f"{max_upload_mb:g} MB ({self.url})", 413)
            return self._send("POST", "/v1/jobs", f"upload of {scan}", content=body(),
                              headers={"Content-Type": content_type, "Content-Length": str(length)}).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._send("GET", f"/v1/jobs/{job_id}", f"job {job_id}").json()

    def list_jobs(self, limit: int = 50, offset: int = 0, state: str | None = None) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"total", "limit", "offset", "next_offset", "jobs"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return self._send("GET", "/v1/jobs", "job list", params=params).json()

    def delete(self, job_id: str) -> dict[str, Any]:
        """Stop the job if it is queued or running and delete it on the server."""
        return self._send("DELETE", f"/v1/jobs/{job_id}", f"delete job {job_id}").json()

    def wait(self, job_id: str, *, poll_s: float = 0.5, timeout_s: float | None = None,
             on_progress: JobCallback | None = None) -> dict[str, Any]:
        """Poll until the job is done (returns its JSON) or failed (:class:`JobFailed`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                job = self.job(job_id)
            except ServerError as exc:
                if exc.status == 404:
                    raise ServerError(f"job {job_id} no longer exists on {self.url} (deleted?)", 404) from None
                raise
            if on_progress is not None:
                on_progress(job)
            if job["state"] == "done":
                return job
            if job["state"] == "failed":
                raise JobFailed(f"job {job_id} failed on the server: {job.get('error')}", job)
            if deadline is not None and time.monotonic() > deadline:
                raise ServerError(f"job {job_id} is still {job['state']} after {timeout_s:g} s")
            time.sleep(poll_s)

    def download_file(self, job_id: str, name: str, dest: Path, sha256: str | None = None) -> Path:
        """One output file into ``dest`` (temp file + rename; checked against ``sha256`` when given)."""
        tmp = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        try:
            with self._stream(f"/v1/jobs/{job_id}/files/{name}", f"download of {name} (job {job_id})") as r, \
                    open(tmp, "wb") as f:
                for block in r.iter_bytes(CHUNK):
                    digest.update(block)
                    f.write(block)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ServerError(f"download of {name} (job {job_id}) is damaged: SHA-256 {digest.hexdigest()} "
                                  f"instead of {sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def download(self, job_id: str, dest_dir: str | Path) -> list[Path]:
        """Every output file of a done job into ``dest_dir`` (created), ``nodules.json`` last; each checked
        against the SHA-256 the server lists."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        listing = self._send("GET", f"/v1/jobs/{job_id}/files", f"file list of job {job_id}").json()
        entries = sorted(listing["files"], key=lambda e: (e["name"] in _ENDS, e["name"]))
        return [self.download_file(job_id, e["name"], dest / e["name"], e.get("sha256")) for e in entries]

    def fetch(self, job_id: str, what: str, dest: str | Path) -> Path:
        """One result of a done job: ``what`` = nodules | mask | seg | report, written to ``dest``."""
        if what not in ("nodules", "mask", "seg", "report"):
            raise NoduleNetError(f"what must be nodules, mask, seg or report; got {what!r}")
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with self._stream(f"/v1/jobs/{job_id}/{what}", f"{what} of job {job_id}") as r, open(tmp, "wb") as f:
                for block in r.iter_bytes(CHUNK):
                    f.write(block)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


__all__ = ["JobFailed", "ServerAuthError", "ServerBusy", "ServerClient", "ServerError", "ServerUnreachable",
           "read_token", "upload_plan"]
