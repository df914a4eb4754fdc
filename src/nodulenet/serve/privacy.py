"""What the server keeps about itself stays private: secrets masked in ``server.log``, data files 0600, folders 0700.

- :func:`setup_log` logs to ``<data>/server.log`` (created 0600) through :class:`MaskSecrets`, which rewrites every
  record before it is written: a ``token=...`` (or ``access_token=``, ``api_key=``...) in a query string, and an
  ``Authorization: Bearer ...`` value, become ``***``. That covers uvicorn's access log too (its request line
  carries the query string: a browser or script that put ``?token=`` in a URL would otherwise leave the secret in
  the log; the API never reads it there, but the line is written before anyone answers).
- :func:`make_data_private` runs at server start: ``umask 077`` for the server and the workers it starts (every file
  they create, from the job store's ``-wal`` to a DICOM SEG, is 0600 and every folder 0700), and ``chmod`` of what an
  older version left readable at the top of the data folder. Uploads, results and the log may hold patient
  identifiers.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

MASK = "***"
_SECRET_PARAMS = r"(?:access_token|token|api_key|apikey|key|password|secret)"
_QUERY_SECRET = re.compile(rf"([?&;]{_SECRET_PARAMS}=)[^&#\s\"']*", re.IGNORECASE)
_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with query-string secrets and bearer tokens replaced by ``***``."""
    return _BEARER.sub(rf"\g<1>{MASK}", _QUERY_SECRET.sub(rf"\g<1>{MASK}", text))


class MaskSecrets(logging.Filter):
    """A handler filter: formats each record's message, masks it (:func:`mask_secrets`) and freezes it (so no later
    formatting brings the arguments back)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report, not ours
            return True
        masked = mask_secrets(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        return True


def private_file(path: Path) -> Path:
    """Create ``path`` if missing, and make it 0600 (an existing file too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path


def setup_log(path: Path, prefix: str) -> None:
    """Log INFO and above to ``path`` (append, 0600; one line per record, several processes share the file), with
    secrets masked."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(private_file(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskSecrets())
    root.addHandler(handler)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied DICOM module otherwise


def make_data_private(data_dir: Path) -> None:
    """``umask 077`` for this process and its children, and the data folder's top level made private (folders 0700,
    files 0600). Job folders are reached only through ``<data>/jobs`` (0700), so their older files need no walk."""
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True)
    for path in [data_dir, *data_dir.iterdir()]:
        try:
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                os.chmod(path, 0o700)
            elif stat.S_ISREG(mode):
                os.chmod(path, 0o600)
        except OSError:
            continue  # vanished meanwhile, or not ours: the umask still covers what we write
