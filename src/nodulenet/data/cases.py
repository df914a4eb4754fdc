"""Prepared cases as training material: checked once, indexed, and read through a memory map.

Conventions: arrays ``(z, y, x)`` on the prepared 1 mm grid; boxes ``(z0, y0, x0, z1, y1, x1)`` voxels, upper
bounds exclusive; world coordinates DICOM LPS mm ``(x, y, z)``. The folder format is the one written by
:func:`nodulenet.preprocess.prepare.prepare_case` (``image.nrrd`` raw uint8, ``lung_mask.nrrd``,
``nodule_mask.nrrd``, ``nodules.json``, ``transform.json``, ``config.json``, ``done.json``).

:func:`load_cases` checks every folder up front - the files exist, have the sizes ``done.json`` recorded, parse,
and agree with each other - so a broken case is reported by file name and skipped when the dataset is built,
not discovered by a worker an hour into training. What a crop needs is then kept in memory, small:

- each nodule's mask as a tight crop + its origin (a few KB; no full-size label volume per case),
- lung voxel positions on a coarse grid (for lung-centred negative crops),
- the image as a lazily opened read-only memory map (not pickled: each worker process opens its own).

Reading the gzip'ed masks is the slow part (~0.3 s for a LIDC case); with ``cache_dir`` the derived arrays are
stored once per case as ``.npz`` (no pickles), keyed by the case's ``done.json`` so a re-prepared case is re-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nodulenet.errors import InputError
from nodulenet.io.atomic import atomic_path
from nodulenet.io.volume import Geometry
from nodulenet.preprocess.config import CASE_FILES, DONE_FILE
from nodulenet.preprocess.resample import CaseTransform

from .nrrd_mmap import RawNrrdLayout, memmap_raw_nrrd, read_nrrd_array, read_raw_nrrd_layout

log = logging.getLogger("nodulenet.data")

LUNG_LABELS = (1, 2)  # right, left; 3 is the dilation margin (outside the lungs)
_LIDC_PATIENT = re.compile(r"LIDC-IDRI-\d{4}")
_CACHE_VERSION = 2
MAX_LUNG_POINTS = 20_000


@dataclass
class CaseNodule:
    """One nodule of a prepared case: its mask as a tight crop placed at ``mask_origin_zyx``."""

    id: int
    mask: np.ndarray  # bool, shape = the nodule's bounding box
    mask_origin_zyx: tuple[int, int, int]
    center_world_xyz_mm: tuple[float, float, float]
    diameter_mm: float | None

    @property
    def box_zyx(self) -> tuple[int, int, int, int, int, int]:
        """Tight bounding box of the mask (no border), upper bounds exclusive."""
        z, y, x = self.mask_origin_zyx
        d, h, w = self.mask.shape
        return (z, y, x, z + d, y + h, x + w)

    @property
    def center_zyx(self) -> np.ndarray:
        """Centre of the mask's bounding box in voxel-index coordinates (voxel k's centre is k)."""
        b = np.asarray(self.box_zyx, dtype=np.float64)
        return (b[:3] + b[3:]) / 2.0 - 0.5


# The LUNA16 evaluation script's size for findings listed without one (annotations_excluded.csv's -1).
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0


@dataclass
class PreparedCase:
    """A checked prepared case (see the module doc); cheap to pickle into data-loader workers."""

    case_id: str
    case_dir: Path
    patient_id: str
    geometry: Geometry
    image_layout: RawNrrdLayout
    nodules: list[CaseNodule]
    excluded_nodules: list[dict[str, Any]]  # {"center_world_xyz_mm": [x, y, z], "diameter_mm": d | None}
    lung_points_zyx: np.ndarray  # int16 [N, 3], lung voxels on a coarse grid
    notes: list[str] = field(default_factory=list)
    _image: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.image_layout.shape_zyx

    def within_excluded(self, point_zyx: np.ndarray) -> bool:
        """True when a prepared-grid point lies within an excluded finding's radius (LUNA16's hit rule; 10 mm
        across when its size is unknown): training must not take it as background (see data/sampling.py)."""
        if not self.excluded_nodules:
            return False
        point_world = self.geometry.voxel_to_world(np.asarray(point_zyx, dtype=np.float64))
        distances = np.linalg.norm(self._excluded_world_xyz() - point_world, axis=1)
        return bool(np.any(distances < self._excluded_diameters_mm() / 2.0))

    def _excluded_world_xyz(self) -> np.ndarray:
        return np.asarray([e["center_world_xyz_mm"] for e in self.excluded_nodules], dtype=np.float64).reshape(-1, 3)

    def _excluded_diameters_mm(self) -> np.ndarray:
        return np.asarray([e["diameter_mm"] if e["diameter_mm"] and e["diameter_mm"] > 0
                           else EXCLUDED_DEFAULT_DIAMETER_MM for e in self.excluded_nodules], dtype=np.float64)

    def excluded_centres_zyx(self) -> tuple[np.ndarray, np.ndarray]:
        """The excluded findings on the prepared grid: centres ``[K, 3]`` (zyx voxel index, fractional) and
        diameters ``[K]`` in mm (10 mm when unknown, as :meth:`within_excluded`)."""
        return self.geometry.world_to_voxel(self._excluded_world_xyz()).reshape(-1, 3), self._excluded_diameters_mm()

    @property
    def image(self) -> np.ndarray:
        """The uint8 image as a read-only memory map, opened on first use in this process."""
        if self._image is None:
            self._image = memmap_raw_nrrd(self.image_layout)
        return self._image

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_image"] = None  # a memory map is reopened by each worker, never pickled
        return state


@dataclass(frozen=True)
class CaseProblem:
    """Why a case folder was skipped: the file at fault and what is wrong with it."""

    case_id: str
    file: str
    problem: str

    def to_dict(self) -> dict[str, str]:
        return {"case_id": self.case_id, "file": self.file, "problem": self.problem}


def patient_id_for(case_id: str, source: dict[str, Any] | None = None) -> str:
    """The patient a case belongs to: ``source.patient_id`` if recorded, the LIDC-IDRI-NNNN part of the id,
    else the case id itself (LUNA16 series UIDs do not name the patient: give a mapping to group them)."""
    if source and isinstance(source.get("patient_id"), str) and source["patient_id"]:
        return str(source["patient_id"])
    found = _LIDC_PATIENT.search(case_id)
    return found.group(0) if found else case_id


def find_case_dirs(roots: Iterable[str | Path]) -> list[Path]:
    """Case folders under each root: the root itself if it is a case, else its sub-folders holding case files."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise InputError(root, "not a folder of prepared cases")
        if any((root / name).exists() for name in (DONE_FILE, *CASE_FILES)):
            found.append(root)
            continue
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any((sub / name).exists() for name in (DONE_FILE, *CASE_FILES)):
                found.append(sub)
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None


def _check_files(case_dir: Path) -> dict[str, Any]:
    """Files present, complete (``done.json``) and of the sizes recorded when the case was finished."""
    done_path = case_dir / DONE_FILE
    if not done_path.is_file():
        raise InputError(done_path, "missing: the case was never finished (re-run the preparation)")
    done = _read_json(done_path)
    if not isinstance(done, dict):
        raise InputError(done_path, "not a JSON object")
    recorded = done.get("files") or {}
    for name in CASE_FILES:
        path = case_dir / name
        if not path.is_file():
            raise InputError(path, "missing")
        size = path.stat().st_size
        if name in recorded and int(recorded[name]) != size:
            raise InputError(path, f"changed since the case was prepared: {size} bytes, done.json recorded "
                                   f"{recorded[name]} (truncated or overwritten?)")
    return done


def _label_array(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    array = read_nrrd_array(path)  # raises InputError naming the file when it is unreadable or truncated
    if array.shape != shape:
        raise InputError(path, f"shape {array.shape} differs from image.nrrd's {shape}")
    return array


def _derived_arrays(case_dir: Path, shape: tuple[int, int, int], nodule_ids: Sequence[int],
                    lung_stride: int) -> dict[str, np.ndarray]:
    """Tight nodule masks and coarse lung points, read from the two gzip'ed label volumes."""
    labels = _label_array(case_dir / "nodule_mask.nrrd", shape)
    arrays: dict[str, np.ndarray] = {}
    if labels.size and int(labels.max()) > 0:
        slices = ndimage.find_objects(labels.astype(np.int32, copy=False))
        for nid in nodule_ids:
            if nid <= len(slices) and slices[nid - 1] is not None:
                sl = slices[nid - 1]
                arrays[f"mask_{nid}"] = labels[sl] == nid
                arrays[f"origin_{nid}"] = np.array([s.start for s in sl], dtype=np.int64)
    lung = _label_array(case_dir / "lung_mask.nrrd", shape)
    coarse = np.isin(lung[::lung_stride, ::lung_stride, ::lung_stride], LUNG_LABELS)
    points = np.argwhere(coarse) * lung_stride
    # At most MAX_LUNG_POINTS evenly spread points: ~120 KB per case, so a thousand cases fit in every worker.
    step = -(-len(points) // MAX_LUNG_POINTS)
    arrays["lung_points"] = points[::max(step, 1)].astype(np.int16)
    return arrays


def _cache_file(cache_dir: Path, case_id: str, done_bytes: bytes, lung_stride: int) -> Path:
    key = hashlib.sha256(done_bytes + f"|v{_CACHE_VERSION}|s{lung_stride}".encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    return cache_dir / f"{safe}-{key}.npz"


def load_case(case_dir: str | Path, *, lung_point_stride: int = 4, cache_dir: str | Path | None = None) -> PreparedCase:
    """Check and index one prepared case folder; raises :class:`InputError` naming the bad file."""
    case_dir = Path(case_dir)
    _check_files(case_dir)
    layout = read_raw_nrrd_layout(case_dir / "image.nrrd")
    if layout.dtype != "u1":
        raise InputError(layout.path, f"voxel type {layout.dtype}, expected uint8 (prepared cases are 0..255)")
    try:
        geometry = CaseTransform.from_dict(_read_json(case_dir / "transform.json")).preprocessed
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(case_dir / "transform.json", f"not a case transform ({type(exc).__name__}: {exc})") from None
    if geometry.shape_zyx != layout.shape_zyx:
        raise InputError(case_dir / "transform.json", f"prepared shape {geometry.shape_zyx} differs from "
                                                      f"image.nrrd's {layout.shape_zyx}")
    record = _read_json(case_dir / "nodules.json")
    try:
        entries = [(int(n["id"]), n) for n in record["nodules"]]
        excluded = [{"center_world_xyz_mm": [float(v) for v in n["center_world_xyz_mm"]],
                     "diameter_mm": None if n.get("diameter_mm") is None else float(n["diameter_mm"])}
                    for n in record.get("excluded_nodules", [])]
        case_id = str(record.get("case_id") or case_dir.name)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(case_dir / "nodules.json", f"missing or invalid field {exc}") from None

    done_bytes = (case_dir / DONE_FILE).read_bytes()
    cache = _cache_file(Path(cache_dir), case_id, done_bytes, lung_point_stride) if cache_dir else None
    arrays: dict[str, np.ndarray] | None = None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            arrays = None  # a damaged cache file is rebuilt, never trusted
    if arrays is None:
        arrays = _derived_arrays(case_dir, layout.shape_zyx, [i for i, _ in entries], lung_point_stride)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

    nodules: list[CaseNodule] = []
    notes: list[str] = []
    for nid, entry in entries:
        if f"mask_{nid}" not in arrays:
            if int(entry.get("mask_voxels") or 0) > 0:
                raise InputError(case_dir / "nodule_mask.nrrd", f"nodule {nid} of nodules.json has no voxels in it")
            notes.append(f"nodule {nid} has no mask voxels (too small for the 1 mm grid?): not a training target")
            continue
        nodules.append(CaseNodule(
            id=nid, mask=arrays[f"mask_{nid}"].astype(bool),
            mask_origin_zyx=tuple(int(v) for v in arrays[f"origin_{nid}"]),  # type: ignore[arg-type]
            center_world_xyz_mm=tuple(float(v) for v in entry["center_world_xyz_mm"]),  # type: ignore[arg-type]
            diameter_mm=None if entry.get("diameter_mm") is None else float(entry["diameter_mm"]),
        ))
    return PreparedCase(
        case_id=case_id, case_dir=case_dir, patient_id=patient_id_for(case_id, record.get("source")),
        geometry=geometry, image_layout=layout, nodules=nodules, excluded_nodules=excluded,
        lung_points_zyx=arrays["lung_points"].astype(np.int16), notes=notes,
    )


@dataclass
class CaseLoadReport:
    cases: list[PreparedCase]
    problems: list[CaseProblem]

    @property
    def n_nodules(self) -> int:
        return sum(len(c.nodules) for c in self.cases)


def load_cases(
    case_dirs: Sequence[str | Path],
    *,
    lung_point_stride: int = 4,
    cache_dir: str | Path | None = None,
    progress: Any = None,
) -> CaseLoadReport:
    """Load every case folder; a broken one becomes a :class:`CaseProblem` (logged) instead of an exception.

    ``progress``: optional callable ``progress(done, total)`` (e.g. to advance a progress bar).
    """
    cases: list[PreparedCase] = []
    problems: list[CaseProblem] = []
    for k, case_dir in enumerate(case_dirs):
        case_dir = Path(case_dir)
        try:
            cases.append(load_case(case_dir, lung_point_stride=lung_point_stride, cache_dir=cache_dir))
        except InputError as exc:
            problem = CaseProblem(case_dir.name, str(exc.path or case_dir), exc.problem)
            problems.append(problem)
            log.warning("skipped case %s: %s: %s", problem.case_id, problem.file, problem.problem)
        if progress is not None:
            progress(k + 1, len(case_dirs))
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(case.case_dir, f"case id {case.case_id!r} also used by {seen[case.case_id]}")
        seen[case.case_id] = case.case_dir
    return CaseLoadReport(cases, problems)
