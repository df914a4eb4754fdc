"""Write files so that a reader never sees half of one: write a temp file beside it, then rename.

``os.replace`` is atomic on POSIX within one file system, so the temp file lives in the target's folder.
A failure (full disk, Ctrl-C, bad data) removes the temp file and leaves any previous file untouched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """0o666 minus the process umask: what a plainly created file gets (mkstemp's temp files are 0o600)."""
    try:  # Linux reports the umask without changing it (no race with other threads)
        status = Path("/proc/self/status").read_text()
        umask = int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)  # type: ignore[union-attr]
    except (OSError, AttributeError, ValueError):
        umask = os.umask(0)  # elsewhere: set it and put it back
        os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed over ``path``, on error removed.

    ``suffix`` defaults to the target's full suffix (``.nii.gz`` stays ``.nii.gz``) because writers such as
    SimpleITK choose the format by the file name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # The finished file must get the permissions a plain open() would give, not mkstemp's private 0o600.
    os.chmod(tmp, default_file_mode())
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def ensure_output_folder(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents) and prove it writable, before any work is done.

    Raises :class:`~nodulenet.errors.OutputFolderError` (one line, the CLI's exit code 2) when the path is a file,
    a parent is a file, permission is denied, or the file system refuses files (``/proc``, read-only mounts): the
    OS error is reported with the folder it concerns instead of a traceback from deep inside the writer.
    """
    from nodulenet.errors import OutputFolderError

    folder = Path(path)
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputFolderError(folder, "the output path exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on some folders nobody can write (read-only mounts, root-owned 0555 for others), so write.
        fd, probe = tempfile.mkstemp(prefix=".nodulenet-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = Path(exc.filename) if getattr(exc, "filename", None) else folder
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, (NotADirectoryError, FileExistsError)):
            reason = f"{reason}: a part of the path is a file, not a folder"
        raise OutputFolderError(folder, f"cannot create or write the output folder ({reason}; at {where})") from None
    return folder
