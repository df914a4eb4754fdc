"""Which scans one ``nodulenet predict`` process handles, and the output folder name of each.

- A scan argument is a DICOM folder, a DICOM file, or an image file (``.mhd``, ``.nii[.gz]``, ``.nrrd``), or a
  text file (``.txt``, ``.lst``, ``.list``) listing scans one per line: blank lines and ``#`` comments are
  skipped, relative paths are relative to the list file's folder. A listed path that does not exist stays in
  the cohort; it fails on its own with a clear error, like any other broken scan.
- Each scan gets an output folder name from its path: the file name without its image suffix, or the folder
  name; a folder named by a DICOM UID (TCIA layout: ``LIDC-IDRI-0001/<study UID>/<series UID>``) is named
  after its nearest ancestor that is not a UID plus the UID's last 8 characters (``LIDC-IDRI-0001_20603192``).
  When two scans would share a name, parent folder names are prepended until the names are unique.
  Names are computed on the whole cohort before sharding, so every rank agrees on them.
- ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``) shards the cohort: rank ``r`` of ``W``
  takes scans ``r, r + W, r + 2W, ...``; ``LOCAL_RANK`` picks the GPU on its machine.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodulenet.errors import InputError
from nodulenet.io.image_files import image_format

SCAN_LIST_SUFFIXES = (".txt", ".lst", ".list")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_UID = re.compile(r"^[0-9]+(\.[0-9]+){3,}$")  # a DICOM UID: dotted digits


@dataclass(frozen=True)
class CohortItem:
    index: int  # position in the whole cohort
    path: Path
    name: str  # output folder name, unique in the cohort


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def is_scan_list(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SCAN_LIST_SUFFIXES


def read_scan_list(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "a scan list must be a UTF-8 text file with one scan path per line") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the scan list ({exc.strerror or exc})") from None
    scans = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        scans.append(p if p.is_absolute() else path.parent / p)
    if not scans:
        raise InputError(path, "the scan list names no scan (one path per line; # starts a comment)")
    return scans


def expand_scan_arguments(arguments: Sequence[str | Path]) -> list[Path]:
    """Scan paths from the command line, with scan lists replaced by the scans they name (in order)."""
    if not arguments:
        raise InputError(None, "no scan given: name a DICOM folder, an image file or a text file listing scans")
    scans: list[Path] = []
    for arg in arguments:
        p = Path(arg).expanduser()
        scans.extend(read_scan_list(p) if is_scan_list(p) else [p])
    return scans


def _base_name(path: Path) -> tuple[str, Path]:
    """The name a scan's own path gives it, and the folder above the part of the path that name used."""
    found = image_format(path)
    if found:
        return path.name[: len(path.name) - len(found[0])], path.parent
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        path = path.parent  # one DICOM file stands for its series folder
    if _UID.match(path.name):
        for ancestor in path.parents:
            if ancestor.name and not _UID.match(ancestor.name):
                return f"{ancestor.name}_{path.name[-8:]}", ancestor.parent
    return path.name, path.parent


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "scan"


def case_names(paths: Sequence[Path]) -> list[str]:
    """Unique, file-system-safe output folder names (see the module docstring); a path given twice gets
    ``_1``, ``_2``, ... (its two runs must not overwrite each other)."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    distinct = list(dict.fromkeys(absolute))
    parts = []
    for p in distinct:
        base, above = _base_name(p)
        parts.append([base, *[q.name for q in (above, *above.parents) if q.name]])
    depth = [1] * len(distinct)
    while True:
        names = [_safe("_".join(reversed(parts[i][: depth[i]]))) for i in range(len(distinct))]
        counts = Counter(names)
        clashes = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parts[i])]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    by_path = dict(zip(distinct, names))
    totals = Counter(by_path[p] for p in absolute)
    seen: Counter[str] = Counter()
    unique = []
    for p in absolute:
        name = by_path[p]
        seen[name] += 1
        unique.append(name if totals[name] == 1 else f"{name}_{seen[name]}")
    return unique


def shard_from_environment(environ: Mapping[str, str] | None = None) -> Shard:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun``; a single process without them."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError(None, "RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(None, f"invalid RANK={rank} for WORLD_SIZE={world}")
    return Shard(rank=rank, world_size=world, local_rank=local)


def cohort_items(scans: Sequence[Path], shard: Shard | None = None) -> list[CohortItem]:
    """The items of ``scans`` this process handles (all of them without a shard)."""
    names = case_names(scans)
    items = [CohortItem(i, Path(p), n) for i, (p, n) in enumerate(zip(scans, names))]
    if shard is None or shard.world_size == 1:
        return items
    return items[shard.rank :: shard.world_size]
