"""Settings of ``nodulenet serve`` and the files it keeps under its data folder.

Data folder layout (``--data``, default ``./nodulenet-server``)::

    token            the bearer token (created on first start, mode 0600) unless --token/NODULENET_TOKEN is given
    jobs.sqlite3     the job store (SQLite, WAL): one row per job, see :mod:`nodulenet.serve.store`
    jobs/<id>/       one folder per job: input/ (the upload, unpacked), work/ (a running prediction),
                     result/ (the finished prediction: <scan>/ with nodules.json etc., job_result.json)
    server.log       readable log of the server and its workers (append-only; rotate with copytruncate)
    server.json      {pid, url, started_utc} of the running server (written once it listens)
    server.lock      held (flock) while a server uses the folder: two servers never share one

Sizes are in MB (10^6 bytes) at the interface and bytes inside.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError, NoduleNetError

DISCLAIMER = ("Research software, not a medical device: NoduleNet's findings are not a diagnosis and must not be "
              "used for clinical decisions.")
API_VERSION = 1
TOKEN_ENV = "NODULENET_TOKEN"
MIN_TOKEN_LENGTH = 16
MB = 1_000_000


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``nodulenet serve`` was started with (the CLI flags). ``token`` is the resolved secret."""

    data_dir: Path
    token: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1  # inference processes, each with its own loaded model; 0 = accept and store jobs only
    max_upload_mb: float = 1024.0  # one POST /v1/jobs body
    max_unpacked_mb: float = 4096.0  # everything a zip unpacks to
    max_zip_members: int = 20000
    max_zip_ratio: float = 200.0  # uncompressed / compressed size of one zip member (zip bombs reach 1000+)
    queue_size: int = 100  # queued (not yet running) jobs; more are refused with 503
    weights: Path | None = None  # None: the shipped demo model
    device: str = "cpu"
    threshold: float = 0.5  # default for jobs that do not choose one
    threads: int | None = None  # torch threads per worker; None: the CPU cores shared out between workers
    max_attempts: int = 2  # a job interrupted by a crash runs at most this many times in all
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    insecure: bool = False  # allow a non-loopback bind without TLS
    poll_s: float = 0.25  # how often an idle worker looks for a queued job

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise NoduleNetError(f"--workers must be 0 or more, got {self.workers}")
        if not 0 <= self.port <= 65535:
            raise NoduleNetError(f"--port must be 0..65535, got {self.port}")
        for flag, value in (("--max-upload-mb", self.max_upload_mb), ("--max-unpacked-mb", self.max_unpacked_mb)):
            if not value > 0:
                raise NoduleNetError(f"{flag} must be a positive number of MB, got {value}")
        if self.queue_size < 1:
            raise NoduleNetError(f"--queue-size must be at least 1, got {self.queue_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise NoduleNetError(f"--threshold must be a probability in [0, 1], got {self.threshold}")
        if self.max_attempts < 1:
            raise NoduleNetError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise NoduleNetError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for path in (self.ssl_certfile, self.ssl_keyfile):
            if path is not None and not Path(path).is_file():
                raise InputError(path, "TLS file does not exist")

    # -- derived -----------------------------------------------------------------------------------------

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mb * MB)

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "server.json"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / "server.lock"

    def worker_threads(self) -> int:
        """Torch threads per worker: the given number, else the cores shared out (at least 1)."""
        if self.threads is not None:
            return int(self.threads)
        return max(1, (os.cpu_count() or 1) // max(1, self.workers))

    def limits(self) -> dict[str, Any]:
        return {"max_upload_mb": self.max_upload_mb, "max_unpacked_mb": self.max_unpacked_mb,
                "max_zip_members": self.max_zip_members, "max_zip_ratio": self.max_zip_ratio,
                "queue_size": self.queue_size, "max_attempts": self.max_attempts}

    def to_public_dict(self) -> dict[str, Any]:
        """The settings without the token (for logs and the worker processes' start arguments)."""
        d = asdict(self)
        d.pop("token")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, tls: bool, insecure: bool) -> None:
    """Refuse to serve the token in clear text to the network: a non-loopback bind needs TLS or --insecure."""
    if not is_loopback(host) and not tls and not insecure:
        raise NoduleNetError(
            f"--host {host} is reachable from other machines and the bearer token would cross the network in clear "
            "text: give --ssl-certfile and --ssl-keyfile (TLS), or --insecure if the network is trusted (a VPN)")


def token_fingerprint(token: str) -> str:
    """A short, non-secret way to tell tokens apart in logs: the first 4 characters and the length."""
    return f"{token[:4]}... ({len(token)} characters)"


def _read_token_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the token file ({exc})") from None
    if len(text) < MIN_TOKEN_LENGTH:
        raise InputError(path, f"the token in this file is shorter than {MIN_TOKEN_LENGTH} characters")
    return text


def resolve_token(data_dir: Path, given: str | None) -> tuple[str, str]:
    """The server's bearer token and where it came from (for the start-up message; never the token itself).

    ``given`` (``--token`` or ``NODULENET_TOKEN``) is the token, or the path of a file holding it. Without it the
    token is read from ``<data>/token``, which is created on first start (``secrets.token_urlsafe(32)``, mode
    0600). A token file that other users can read is refused, as ssh refuses such a key.
    """
    if given:
        candidate = Path(given).expanduser()
        if candidate.is_file():
            return _read_token_file(candidate), f"from the file {candidate}"
        if len(given) < MIN_TOKEN_LENGTH:
            raise NoduleNetError(f"--token must be at least {MIN_TOKEN_LENGTH} characters (or the path of a file "
                                 f"holding the token); got {len(given)} characters")
        return given, "given by --token / NODULENET_TOKEN"
    path = data_dir / "token"
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise InputError(path, f"the token file is readable by other users (mode {mode:04o}); run "
                                   f"`chmod 600 {path}` and start again")
        return _read_token_file(path), f"in {path}"
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, f"created in {path} (mode 0600)"
