"""Settings of the DICOM side of ``nodulenet serve`` (``--dicom-port`` and friends) and their checks.

Files it keeps under the server's data folder (beside those of :mod:`nodulenet.serve.settings`)::

    dicom-incoming/<SeriesInstanceUID>/   instances received by C-STORE, one file per SOP instance, until the
                                          series is complete (no new instance for --dicom-idle-s seconds)
    jobs/<id>/dicom-series.json           what the listener knew of a series when it queued it as a job
    dicom.json                            {ae_title, host, port} of the running listener (port 0: the one it got)
    jobs.sqlite3, table dicom_deliveries  one row per job whose SEG + SR are sent: state, attempts, last error
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nodulenet.errors import NoduleNetError
from nodulenet.pacs.auth import DicomwebAuth, parse_auth

DEFAULT_AE_TITLE = "NODULENET"
DEFAULT_IDLE_S = 10.0
RETRY_CAP_S = 600.0  # longest wait between two tries of sending a result
# AE titles: up to 16 characters of the default character repertoire, no backslash, not only spaces (PS3.5 6.2).
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_DIMSE_DEST = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9a-fA-F:.]+\]|[^:@\[\]]+):(?P<port>\d{1,5})$")


def check_ae_title(value: str, flag: str) -> str:
    title = value.strip()
    if not title or not _AE.match(title):
        raise NoduleNetError(f"{flag} {value!r} is not a DICOM AE title (1-16 printable ASCII characters, "
                             "no backslash)")
    return title


@dataclass(frozen=True)
class Destination:
    """Where SEG + SR go: a DICOM node (C-STORE SCU) or a DICOMweb server (STOW-RS)."""

    kind: str  # "dimse" | "stow"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" if self.kind == "dimse" else self.url


def parse_destination(text: str) -> Destination:
    """``AE@host:port`` (C-STORE) or ``http(s)://host:port/dicom-web`` (STOW-RS)."""
    value = text.strip()
    if value.lower().startswith(("http://", "https://")):
        return Destination("stow", url=value.rstrip("/"))
    match = _DIMSE_DEST.match(value)
    if not match:
        raise NoduleNetError(f"--dicom-dest {text!r}: give AE@host:port (C-STORE) or the http(s):// root of a "
                             "DICOMweb server (STOW-RS)")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise NoduleNetError(f"--dicom-dest {text!r}: port must be 1..65535")
    return Destination("dimse", ae_title=check_ae_title(match["ae"], "--dicom-dest AE title"),
                       host=match["host"].strip("[]"), port=port)


@dataclass(frozen=True)
class DicomSettings:
    """The DICOM listener and where its results go (the ``--dicom-*`` flags of ``nodulenet serve``)."""

    port: int
    allowed_aes: tuple[str, ...]
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    idle_s: float = DEFAULT_IDLE_S
    destination: Destination | None = None
    destination_auth: DicomwebAuth = field(default_factory=DicomwebAuth)
    max_delivery_attempts: int = 8
    retry_s: float = 15.0  # first retry of a failed delivery; doubled each time, at most RETRY_CAP_S
    poll_s: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise NoduleNetError(f"--dicom-port must be 0..65535, got {self.port}")
        check_ae_title(self.ae_title, "--ae-title")
        if not self.allowed_aes:
            raise NoduleNetError("--dicom-port needs at least one --dicom-allow-ae: the calling AE titles (the PACS, "
                                 "the modality) that may send studies; every other caller is refused")
        object.__setattr__(self, "allowed_aes", tuple(check_ae_title(a, "--dicom-allow-ae") for a in self.allowed_aes))
        if not self.idle_s > 0:
            raise NoduleNetError(f"--dicom-idle-s must be a positive number of seconds, got {self.idle_s}")
        if not self.retry_s > 0:
            raise NoduleNetError(f"--dicom-retry-s must be a positive number of seconds, got {self.retry_s}")
        if self.max_delivery_attempts < 1:
            raise NoduleNetError(f"max_delivery_attempts must be at least 1, got {self.max_delivery_attempts}")

    @classmethod
    def from_flags(cls, *, port: int, allowed_aes: list[str], ae_title: str, host: str, idle_s: float,
                   destination: str | None, destination_auth: str | None,
                   retry_s: float = 15.0) -> DicomSettings:
        dest = parse_destination(destination) if destination else None
        if destination_auth and (dest is None or dest.kind != "stow"):
            raise NoduleNetError("--dicom-dest-auth is for a DICOMweb (STOW-RS) --dicom-dest")
        return cls(port=port, allowed_aes=tuple(allowed_aes), ae_title=ae_title, host=host, idle_s=idle_s,
                   destination=dest, destination_auth=parse_auth(destination_auth), retry_s=retry_s)

    def incoming_dir(self, data_dir: Path) -> Path:
        return data_dir / "dicom-incoming"

    def state_path(self, data_dir: Path) -> Path:
        return data_dir / "dicom.json"
