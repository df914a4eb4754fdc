"""What to send for each scan, and SFTP transfers with byte counts, cancel checks and atomic result folders.

What one scan argument needs on the remote side (paths relative to the folder that holds the scan, so the
scan keeps its own file name there and its outputs keep their names, e.g. ``seriesuid`` in candidates.csv):

- a folder (DICOM series): every file under it, recursively (the DICOM reader walks sub-folders too);
- ``.mhd``: the header and its ``ElementDataFile`` (nothing more for ``LOCAL``; the header's whole folder for
  ``LIST`` or a file pattern); ``.nhdr``: the header and its ``data file`` likewise;
- ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``: the file;
- any other file that is DICOM (``DICM`` at byte 128) stands for its series: its whole folder goes; a file
  that is not DICOM goes alone (the remote reader then reports what is wrong with it).

Downloads land in a hidden temp folder beside the final one (``<out>/.<name>.remote-XXXX``), ``nodules.json``
last, and the folder is renamed into place only when complete: a folder with ``nodules.json`` is complete.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError
from nodulenet.io.image_files import image_format

COMPLETE_MARKER = "nodules.json"  # written last by the exporter, and downloaded last here


@dataclass(frozen=True)
class UploadFile:
    local: Path
    rel: str  # POSIX path relative to the scan's upload folder
    size: int  # bytes


@dataclass(frozen=True)
class ScanUpload:
    """The files of one scan and the path (relative to its upload folder) to hand to ``nodulenet predict``."""

    scan_rel: str
    files: tuple[UploadFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _tree(folder: Path, base: Path) -> list[UploadFile]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file():
                files.append(UploadFile(path, path.relative_to(base).as_posix(), path.stat().st_size))
    return files


def _one(path: Path, base: Path) -> UploadFile:
    rel = os.path.relpath(path, base)
    if rel.startswith(".."):
        raise InputError(path, f"lies outside {base}, the folder of the header that names it: --remote sends a "
                               f"scan's folder only; move the data file beside its header")
    return UploadFile(path, Path(rel).as_posix(), path.stat().st_size)


def _header_data_files(header: Path, pattern: str) -> list[Path] | None:
    """Data files a detached header names; None when it uses a list or file pattern (send the folder)."""
    head = header.read_bytes()[: 64 * 1024].decode("latin-1")
    match = re.search(pattern, head, re.IGNORECASE | re.MULTILINE)
    if match is None:
        return []
    name = match.group(1).strip()
    if name.upper() == "LOCAL":
        return []
    if name.upper().startswith("LIST") or " " in name or "%" in name:
        return None
    return [header.parent / name]


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def plan_upload(scan: Path) -> ScanUpload:
    """The files one scan argument needs remotely (see the module docstring); the scan must exist."""
    if scan.is_dir():
        return ScanUpload(scan.name, tuple(_tree(scan, scan.parent)))
    found = image_format(scan)
    base = scan.parent
    if found and found[0] in (".mhd", ".nhdr"):
        pattern = r"^ElementDataFile\s*=\s*(.*)$" if found[0] == ".mhd" else r"^data ?file\s*:\s*(.*)$"
        data = _header_data_files(scan, pattern)
        if data is None:
            return ScanUpload(scan.name, tuple(f for f in _tree(base, base) if "/" not in f.rel))
        return ScanUpload(scan.name, (_one(scan, base), *(_one(p, base) for p in data if p.is_file())))
    if found is None and _is_dicom_file(scan):
        series = scan.parent
        return ScanUpload(f"{series.name}/{scan.name}", tuple(_tree(series, series.parent)))
    return ScanUpload(scan.name, (_one(scan, base),))


class Meter:
    """Counts bytes for a progress callback and stops a transfer when ``check()`` raises (cancel)."""

    def __init__(self, on_bytes: Callable[[int], None], check: Callable[[], None]) -> None:
        self.on_bytes = on_bytes
        self.check = check
        self._seen = 0

    def file_callback(self) -> Callable[[int, int], None]:
        """A paramiko callback for one file (it reports the running total of that file)."""
        self._seen = 0

        def callback(done: int, _total: int) -> None:
            delta, self._seen = done - self._seen, done
            self.on_bytes(delta)
            self.check()

        return callback


def sftp_makedirs(sftp: Any, path: str, made: set[str]) -> None:
    """``mkdir -p`` over SFTP; ``made`` caches folders already there."""
    if path in made or path in ("", "/"):
        return
    sftp_makedirs(sftp, posixpath.dirname(path), made)
    try:
        sftp.stat(path)
    except FileNotFoundError:
        sftp.mkdir(path)
    made.add(path)


def upload_scan(sftp: Any, plan: ScanUpload, remote_dir: str, meter: Meter, made: set[str]) -> str:
    """Send one scan's files under ``remote_dir``; returns the remote path of the scan itself."""
    for f in plan.files:
        meter.check()
        target = posixpath.join(remote_dir, f.rel)
        sftp_makedirs(sftp, posixpath.dirname(target), made)
        with open(f.local, "rb") as fl:
            sftp.putfo(fl, target, file_size=f.size, callback=meter.file_callback(), confirm=True)
    return posixpath.join(remote_dir, plan.scan_rel)


def remote_files(sftp: Any, folder: str) -> list[tuple[str, int]]:
    """``(path relative to folder, size)`` of every regular file under a remote folder, recursively."""
    found: list[tuple[str, int]] = []

    def walk(rel: str) -> None:
        for attr in sorted(sftp.listdir_attr(posixpath.join(folder, rel) if rel else folder),
                           key=lambda a: a.filename):
            child = posixpath.join(rel, attr.filename) if rel else attr.filename
            if stat.S_ISDIR(attr.st_mode or 0):
                walk(child)
            elif stat.S_ISREG(attr.st_mode or 0):
                found.append((child, int(attr.st_size or 0)))

    walk("")
    return found


def download_folder(sftp: Any, remote_dir: str, files: list[tuple[str, int]], local_dir: Path, meter: Meter,
                    finish: Callable[[Path], None] | None = None) -> Path:
    """Fetch ``files`` of ``remote_dir`` into ``local_dir``, atomically; returns ``local_dir``.

    Everything goes into a hidden temp folder beside ``local_dir``, ``nodules.json`` last; ``finish(temp)``
    may then edit the copy (still hidden); only then does the folder replace ``local_dir`` (an older one is
    moved aside first and removed after). On any error or cancel the temp folder is removed and
    ``local_dir`` is as it was.
    """
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.remote-", dir=local_dir.parent))
    try:
        ordered = sorted(files, key=lambda f: (f[0] == COMPLETE_MARKER, f[0]))
        for rel, size in ordered:
            meter.check()
            dest = temp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as fl:
                sftp.getfo(posixpath.join(remote_dir, rel), fl, callback=meter.file_callback())
            if dest.stat().st_size != size:
                raise OSError(f"{rel}: got {dest.stat().st_size} bytes, expected {size}")
        if finish is not None:
            finish(temp)
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp makes it private; a result folder is an ordinary folder
        old = None
        if local_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.old-", dir=local_dir.parent))
            os.replace(local_dir, old / "previous")
        try:
            os.replace(temp, local_dir)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", local_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return local_dir
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def _umask() -> int:
    from nodulenet.io.atomic import default_file_mode

    return 0o666 & ~default_file_mode()
