"""DICOMweb credentials: ``none``, ``basic:FILE`` (the file holds ``user:password``) or ``bearer:FILE`` (a token).

Secrets come from files, never from the command line (where ``ps`` and shell history show them). A file that other
users may read is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError, NoduleNetError

AUTH_KINDS = ("none", "basic", "bearer")


@dataclass(frozen=True)
class DicomwebAuth:
    """How to authenticate to a DICOMweb server; ``secret`` never appears in ``repr`` or logs."""

    kind: str = "none"
    username: str = ""
    secret: str = ""
    source: Path | None = None

    def __repr__(self) -> str:
        where = f", from {self.source}" if self.source else ""
        return f"DicomwebAuth({self.kind}{where})"

    def describe(self) -> str:
        return "no authentication" if self.kind == "none" else f"HTTP {self.kind} from {self.source}"

    def apply(self, session: Any) -> Any:
        """Set up a ``requests.Session`` with these credentials; returns it."""
        if self.kind == "basic":
            session.auth = (self.username, self.secret)
        elif self.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.secret}"
        return session


def _read_secret(path: Path) -> str:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise InputError(path, "credentials file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the credentials file ({exc})") from None
    if mode & 0o077:
        raise InputError(path, f"the credentials file is readable by other users (mode {mode:04o}); run "
                               f"`chmod 600 {path}`")
    if not text:
        raise InputError(path, "the credentials file is empty")
    return text


def parse_auth(spec: str | None) -> DicomwebAuth:
    """``None``/``none`` -> no auth; ``basic:FILE`` -> user and password from ``user:password`` in FILE;
    ``bearer:FILE`` -> the token in FILE."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return DicomwebAuth()
    kind, sep, file = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("basic", "bearer") or not file.strip():
        raise NoduleNetError(f"DICOMweb auth must be none, basic:FILE or bearer:FILE, got {spec!r}")
    path = Path(file.strip()).expanduser()
    secret = _read_secret(path)
    if kind == "bearer":
        return DicomwebAuth("bearer", secret=secret, source=path)
    user, colon, password = secret.partition(":")
    if not colon or not user:
        raise InputError(path, "a basic-auth credentials file holds one line user:password")
    return DicomwebAuth("basic", username=user, secret=password, source=path)
