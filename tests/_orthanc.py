"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests: :func:`running_orthanc`.

    with running_orthanc(tmp_path) as orthanc:
        orthanc.upload(paths)                  # REST POST /instances
        orthanc.dicomweb_url                   # http://127.0.0.1:<port>/dicom-web

Each Orthanc gets a temporary config and storage folder and two free loopback ports (HTTP, DICOM); it runs in the
foreground (``Orthanc CONFIG``, no daemon, no systemd) and is always stopped on the way out (SIGTERM, then SIGKILL).
``RemoteAccessAllowed`` is false (Orthanc 1.10 has no bind-address option: it only answers loopback clients), HTTP
needs the test user's password, and only the DICOM modalities the test registers (AE title + 127.0.0.1 + port) may
C-STORE into it. Without the packages the tests that need it skip, saying which package to install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
ORTHANC_AET = "ORTHANC"
USER, PASSWORD = "nodulenet", "orthanc-test-password-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicomweb_plugin() -> Path | None:
    for folder in DICOMWEB_PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            return path
    return None


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (for ``pytest.skip``), None when it can."""
    if not Path(ORTHANC_BINARY).is_file():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class OrthancProcess:
    folder: Path
    http_port: int
    dicom_port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(USER, PASSWORD), timeout=60)

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.http() as client:
            response = client.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """REST ``POST /instances`` of each file; returns Orthanc's instance ids."""
        ids = []
        with self.http() as client:
            for path in paths:
                response = client.post("/instances", content=Path(path).read_bytes())
                response.raise_for_status()
                ids.append(response.json()["ID"])
        return ids

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        self.rest("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def find_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series of the study with its main DICOM tags (Modality, SeriesInstanceUID ...)."""
        found = self.rest("POST", "/tools/find", json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid},
                                                         "Expand": True})
        return found

    def instance_file(self, orthanc_id: str) -> bytes:
        with self.http() as client:
            response = client.get(f"/instances/{orthanc_id}/file")
        response.raise_for_status()
        return response.content

    def tail(self, n: int = 30) -> str:
        if not self.log.exists():
            return "(no Orthanc log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def start(self, timeout_s: float = 60.0) -> None:
        config = self.folder / "orthanc.json"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([ORTHANC_BINARY, "--logdir=" + str(self.folder), str(config)],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode}:\n{self.tail()}")
            try:
                with self.http() as client:
                    if client.get("/system", timeout=2).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start within {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def write_config(folder: Path, http_port: int, dicom_port: int) -> Path:
    plugin = dicomweb_plugin()
    config = {
        "Name": "nodulenet-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        # Only registered modalities (checked by AE title AND host) may store into this Orthanc.
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {},
        "DicomModalitiesInDatabase": False,
        "OverwriteInstances": True,
        "StableAge": 2,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "HttpDescribeErrors": True,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


@contextmanager
def running_orthanc(parent: Path | None = None) -> Iterator[OrthancProcess]:
    """Start Orthanc in a new temp folder (under ``parent`` when given); see the module docstring."""
    folder = Path(tempfile.mkdtemp(prefix="orthanc-", dir=parent))
    orthanc = OrthancProcess(folder=folder, http_port=free_port(), dicom_port=free_port())
    write_config(folder, orthanc.http_port, orthanc.dicom_port)
    try:
        orthanc.start()
        yield orthanc
    finally:
        orthanc.stop()
        shutil.rmtree(folder, ignore_errors=True)
