"""Prepare CT cases for training and evaluation: one folder per case, resumable, in parallel.

Conventions (DESIGN.md): arrays ``(z, y, x)``; world ``(x, y, z)`` DICOM LPS mm; boxes
``(z0, y0, x0, z1, y1, x1)`` in voxels of the prepared grid, upper bounds exclusive.

A prepared case ``<out>/<case_id>/`` holds

- ``image.nrrd``: uint8, **uncompressed** (raw encoding, so a loader can memory-map it after the text
  header); its header places the cropped 1 mm grid in world space (spacing, origin = world position of
  the first voxel's centre, direction = the scan's);
- ``lung_mask.nrrd`` (gzip): 1 = right lung, 2 = left lung (1 only when the two could not be told apart),
  3 = the dilation margin whose image is kept; 0 = padded with ``pad_value``;
- ``nodule_mask.nrrd`` (gzip): instance labels, value = nodule ``id`` in ``nodules.json``;
- ``nodules.json``: nodules with centre (world and prepared voxels), diameter, box, readers, ratings;
- ``transform.json``: original, resampled and prepared geometry + crop (see :class:`CaseTransform`);
- ``config.json``: the resolved :class:`PrepareConfig` and the nodulenet version;
- ``overlay.png``: a picture for people; ``done.json``: written last, marks the case complete.

Every file is written atomically. A case whose ``done.json`` exists with the same config is skipped on a
rerun; a folder without it is redone. One failing case is recorded in ``<out>/errors.json`` and the run
goes on; ``<out>/summary.json`` and ``<out>/prepare.log`` describe the run.

LUNA16 cases have no outlines: their nodule masks are **spheres** of the annotated diameter around the
annotated centre, drawn on the prepared grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import nodulenet
from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.image_files import read_image, write_image
from nodulenet.io.lidc_xml import parse_lidc_xml
from nodulenet.io.luna_csv import index_by_seriesuid, read_luna_annotations, read_luna_excluded
from nodulenet.io.volume import Geometry, Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.lidc_nodules import lidc_labels_for_series
from nodulenet.preprocess.lung_mask import lung_bounding_box, segment_lungs
from nodulenet.preprocess.normalize import apply_lung_mask, hu_to_uint8
from nodulenet.preprocess.overlay import render_overlay
from nodulenet.preprocess.resample import CaseTransform, resample_labels, resample_volume

LUNG_LABEL_MARGIN = 3
DONE_FILE = "done.json"
CASE_FILES = ("image.nrrd", "lung_mask.nrrd", "nodule_mask.nrrd", "nodules.json", "transform.json", "config.json")


@dataclass(frozen=True)
class NoduleAnnotation:
    """A nodule given to :func:`prepare_case`: where it is in the world and how big (``None``: unknown)."""

    id: int
    center_world_xyz_mm: tuple[float, float, float]
    diameter_mm: float | None
    n_readers: int | None = None
    characteristics: dict[str, float | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseSummary:
    """What happened to one case (returned by :func:`prepare_case`, collected in ``summary.json``)."""

    case_id: str
    status: str  # "done" | "skipped" | "failed"
    out_dir: str
    source: str = ""
    seconds: float = 0.0
    shape_zyx: list[int] | None = None
    n_nodules: int = 0
    n_excluded_nodules: int = 0
    lung_volume_ml: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    error_file: str | None = None
    error: str | None = None
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# LIDC-IDRI (and LUNA16, built from it) are CC BY 3.0: any image of their cases credits TCIA.
DATASET_CREDITS = {
    "LIDC-IDRI": "Image: LIDC-IDRI, The Cancer Imaging Archive (TCIA), CC BY 3.0.",
    "LUNA16": "Image: LUNA16 / LIDC-IDRI, The Cancer Imaging Archive (TCIA), CC BY 3.0.",
}


def config_hash(config: PrepareConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ one case


def _sphere_labels(geometry: Geometry, nodules: Sequence[NoduleAnnotation]) -> np.ndarray:
    """Instance labels of balls of each nodule's diameter (first nodule wins where two overlap)."""
    labels = np.zeros(geometry.shape_zyx, dtype=np.uint8 if len(nodules) < 256 else np.uint16)
    spacing = np.asarray(geometry.spacing_zyx)
    for n in nodules:
        if n.diameter_mm is None:
            continue
        c = geometry.world_to_voxel(n.center_world_xyz_mm)
        r = n.diameter_mm / 2.0 / spacing
        lo = np.maximum(np.ceil(c - r).astype(int), 0)
        hi = np.minimum(np.floor(c + r).astype(int) + 1, geometry.shape_zyx)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        ball = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2
        region = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        region[(ball <= (n.diameter_mm / 2.0) ** 2) & (region == 0)] = n.id
    return labels


def _nodule_entry(n: NoduleAnnotation, geometry: Geometry, labels: np.ndarray | None) -> dict[str, Any]:
    """JSON record of a nodule in the prepared grid; box from its mask, else from its diameter."""
    c = geometry.world_to_voxel(n.center_world_xyz_mm)
    entry: dict[str, Any] = {
        "id": n.id,
        "n_readers": n.n_readers,
        "center_world_xyz_mm": [float(v) for v in n.center_world_xyz_mm],
        "diameter_mm": n.diameter_mm,
        "center_zyx": [float(v) for v in c],
        "inside_crop": bool(np.all(c >= -0.5) and np.all(c <= np.asarray(geometry.shape_zyx) - 0.5)),
    }
    where = np.argwhere(labels == n.id) if labels is not None else np.empty((0, 3))
    if where.size:
        lo, hi = where.min(axis=0), where.max(axis=0) + 1
        entry.update(box_zyx=[int(v) for v in (*lo, *hi)], box_source="mask", mask_voxels=int(len(where)))
    elif n.diameter_mm is not None:
        r = n.diameter_mm / 2.0 / np.asarray(geometry.spacing_zyx)
        lo, hi = np.ceil(c - r).astype(int), np.floor(c + r).astype(int) + 1
        entry.update(box_zyx=[int(v) for v in (*lo, *hi)], box_source="diameter", mask_voxels=0)
    else:
        entry.update(box_zyx=None, box_source=None, mask_voxels=0)
    entry["characteristics"] = dict(n.characteristics)
    entry.update(n.extra)
    return entry


def resample_ct_hu(ct: Volume, config: PrepareConfig) -> tuple[Volume, Any]:
    """Fill scanner padding, then resample the HU volume linearly to ``config.spacing_zyx_mm``.

    Shared by :func:`prepare_case` and predict's input preparation, so a new scan is resampled exactly as the
    training cases were. Padding (-2048, -3024) outside the field of view would otherwise be interpolated
    into the body edge.
    """
    array = ct.array
    padding = array < config.padding_below_hu
    if padding.any():
        array = np.where(padding, np.asarray(config.padding_fill_hu, dtype=array.dtype), array)
    del padding
    return resample_volume(ct.with_array(array), config.spacing_zyx_mm, "linear")


def prepare_case(
    ct: Volume,
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    *,
    case_id: str | None = None,
    nodules: Sequence[NoduleAnnotation] = (),
    nodule_mask: Volume | None = None,
    excluded_nodules: Sequence[NoduleAnnotation] = (),
    source: dict[str, Any] | None = None,
) -> CaseSummary:
    """Resample ``ct`` (HU) to the config's spacing, segment the lungs, normalise, crop, write the case folder.

    ``nodule_mask``: instance labels on ``ct``'s grid, value = the nodule's ``id`` (LIDC outlines); without
    it nodules become spheres of their diameter (LUNA16). ``excluded_nodules`` (e.g. fewer readers than
    ``min_readers``) are listed in ``nodules.json`` but not in the mask.
    """
    config = config or PrepareConfig()
    out = Path(out_dir)
    case_id = case_id or out.name
    stages: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages[name] = round(now - last, 3)
        last = now

    hu, mapping = resample_ct_hu(ct, config)
    lap("resample")

    lung = segment_lungs(hu, config.lung)
    lap("lung_mask")

    box = lung_bounding_box(lung.lungs > 0, config.crop_margin_voxels)  # published: undilated lungs + 5 voxels
    transform = CaseTransform(mapping.original, mapping.resampled, box[:3], box[3:])
    crop = transform.crop_slices
    geometry = transform.preprocessed
    lungs, kept = lung.lungs[crop], lung.kept[crop]
    image = hu_to_uint8(hu.array[crop], config.hu_min, config.hu_max)
    image = apply_lung_mask(image, kept, lungs, config.pad_value, config.remove_bone, config.bone_threshold)
    lung_labels = np.where(kept & (lungs == 0), np.uint8(LUNG_LABEL_MARGIN), lungs).astype(np.uint8)
    del hu
    lap("normalize")

    if nodule_mask is not None:
        if nodule_mask.shape_zyx != ct.shape_zyx:
            raise ValueError(f"nodule mask {nodule_mask.shape_zyx} is not on the scan grid {ct.shape_zyx}")
        nodule_labels = resample_labels(nodule_mask, config.spacing_zyx_mm)[0].array[crop]
    else:
        nodule_labels = _sphere_labels(geometry, nodules)
    nodule_entries = [_nodule_entry(n, geometry, nodule_labels) for n in nodules]
    excluded_entries = [_nodule_entry(n, geometry, None) for n in excluded_nodules]
    log = [f"warning: nodule {e['id']} centre outside the crop" for e in nodule_entries if not e["inside_crop"]]
    lap("nodules")

    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_FILE).unlink(missing_ok=True)  # the folder is incomplete until done.json is back
    write_image(Volume.from_geometry(image, geometry), out / "image.nrrd", compress=False)
    write_image(Volume.from_geometry(lung_labels, geometry), out / "lung_mask.nrrd", compress=True)
    write_image(Volume.from_geometry(nodule_labels, geometry), out / "nodule_mask.nrrd", compress=True)
    source = dict(source or {})
    write_json_atomic(
        out / "nodules.json",
        {
            "case_id": case_id,
            "series_instance_uid": ct.meta.get("series_instance_uid"),
            "source": source,
            "conventions": (
                "center_zyx/box_zyx in voxels of image.nrrd (z, y, x), box upper bounds exclusive; "
                "center_world_xyz_mm in DICOM LPS mm (x, y, z); nodule_mask value = id"
            ),
            "shape_zyx": list(geometry.shape_zyx),
            "spacing_zyx": list(geometry.spacing_zyx),
            "nodules": nodule_entries,
            "excluded_nodules": excluded_entries,
            "lung": lung.summary(),
        },
    )
    write_json_atomic(out / "transform.json", transform.to_dict())
    write_json_atomic(
        out / "config.json",
        {"nodulenet_version": nodulenet.__version__, "config_hash": config_hash(config), "prepare": config.to_dict()},
    )
    if config.overlay:
        render_overlay(
            image, lung_labels, nodule_labels, nodule_entries, out / "overlay.png", excluded=excluded_entries,
            title=case_id, spacing_zyx=geometry.spacing_zyx,
            head_at_last_slice=geometry.direction_matrix[2, 2] >= 0,
            credit=DATASET_CREDITS.get(str(source.get("dataset", "")), ""),
        )
    lap("write")
    seconds = round(time.perf_counter() - t0, 3)
    write_json_atomic(
        out / DONE_FILE,
        {
            "case_id": case_id,
            "nodulenet_version": nodulenet.__version__,
            "config_hash": config_hash(config),
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "files": {name: (out / name).stat().st_size for name in CASE_FILES},
        },
    )
    return CaseSummary(
        case_id=case_id, status="done", out_dir=str(out), source=str(source.get("path", "")), seconds=seconds,
        shape_zyx=list(geometry.shape_zyx), n_nodules=len(nodule_entries), n_excluded_nodules=len(excluded_entries),
        lung_volume_ml=round(lung.lung_volume_ml, 1), log=log,
        stage_seconds={**stages, **{f"lung.{k}": v for k, v in lung.stage_seconds.items()}},
    )


def is_case_done(case_dir: str | Path, config: PrepareConfig) -> bool:
    """True if ``case_dir`` holds a complete case prepared with the same settings."""
    case_dir = Path(case_dir)
    try:
        done = json.loads((case_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return done.get("config_hash") == config_hash(config) and all((case_dir / n).is_file() for n in CASE_FILES)


# ------------------------------------------------------------------------------------------ finding cases


@dataclass(frozen=True)
class LidcCase:
    """A CT series folder (TCIA layout) with its LIDC XML, to be prepared as ``case_id``."""

    case_id: str
    series_dir: Path
    series_instance_uid: str


@dataclass(frozen=True)
class LunaCase:
    """A LUNA16 ``<seriesuid>.mhd`` file and its annotations.csv rows."""

    case_id: str
    mhd_path: Path
    nodules: tuple[NoduleAnnotation, ...]
    excluded_nodules: tuple[NoduleAnnotation, ...] = ()


def _series_header(folder: Path, names: list[str]) -> pydicom.Dataset | None:
    """Header of the first readable DICOM file in ``folder`` (a damaged file is the worker's to report)."""
    for name in sorted(names)[:5]:
        try:
            return pydicom.dcmread(folder / name, stop_before_pixels=True,
                                   specific_tags=["Modality", "SeriesInstanceUID", "PatientID"])
        except Exception:  # noqa: BLE001 - try the next file; read_dicom_series reports bad files properly
            continue
    return None


def find_lidc_cases(src_root: str | Path) -> tuple[list[LidcCase], list[dict[str, str]]]:
    """CT series folders under ``src_root`` that hold ``.dcm`` files and an ``.xml``; and skipped folders.

    ``case_id`` is the top-level folder under ``src_root`` (the patient, e.g. ``LIDC-IDRI-0001``); when one
    patient has several annotated CT series each id gets ``_<last 8 characters of the series UID>``.
    Non-CT series (chest X-rays) and CT series without any XML are returned as skipped, with the reason.
    """
    root = Path(src_root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the LIDC-IDRI folder holding patient folders)")
    found: list[tuple[str, Path, str]] = []
    skipped: list[dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        dcm = [f for f in filenames if f.lower().endswith(".dcm")]
        if not dcm:
            continue
        folder = Path(dirpath)
        rel = folder.relative_to(root).parts
        patient = rel[0] if rel else root.name
        header = _series_header(folder, dcm)
        if header is None:
            skipped.append({"folder": str(folder), "reason": "no readable DICOM header"})
            continue
        if str(header.get("Modality", "")) != "CT":
            skipped.append({"folder": str(folder), "reason": f"modality {header.get('Modality', '?')}, not CT"})
            continue
        if not any(f.lower().endswith(".xml") for f in filenames):
            skipped.append({"folder": str(folder), "reason": "CT series without an LIDC annotation XML"})
            continue
        found.append((patient, folder, str(header.get("SeriesInstanceUID", ""))))
    counts = Counter(patient for patient, _, _ in found)
    cases = [
        LidcCase(patient if counts[patient] == 1 else f"{patient}_{uid[-8:]}", folder, uid)
        for patient, folder, uid in found
    ]
    return sorted(cases, key=lambda c: c.case_id), skipped


def find_luna_cases(
    mhd_root: str | Path, annotations_csv: str | Path, excluded_csv: str | Path | None = None
) -> list[LunaCase]:
    """Every ``<seriesuid>.mhd`` under ``mhd_root`` (subset folders searched) with its annotations."""
    root = Path(mhd_root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the LUNA16 folder holding subset*/<seriesuid>.mhd)")
    annotations = index_by_seriesuid(read_luna_annotations(annotations_csv))
    excluded = index_by_seriesuid(read_luna_excluded(excluded_csv)) if excluded_csv else {}
    cases: dict[str, LunaCase] = {}
    for path in sorted(root.rglob("*.mhd")):
        uid = path.name[: -len(".mhd")]
        if uid in cases:
            raise InputError(path, f"series {uid} also found at {cases[uid].mhd_path}")
        nodules = tuple(
            NoduleAnnotation(k, a.center_world_xyz_mm, a.diameter_mm, None, {}, {"source": "annotations.csv"})
            for k, a in enumerate(annotations.get(uid, []), start=1)
        )
        skipped = tuple(
            NoduleAnnotation(len(nodules) + k, a.center_world_xyz_mm, a.diameter_mm, None, {},
                             {"source": "annotations_excluded.csv"})
            for k, a in enumerate(excluded.get(uid, []), start=1)
        )
        cases[uid] = LunaCase(uid, path, nodules, skipped)
    return list(cases.values())


# ------------------------------------------------------------------------------------------ workers


def _lidc_inputs(case: LidcCase, config: PrepareConfig) -> dict[str, Any]:
    ct = read_dicom_series(case.series_dir, case.series_instance_uid or None)
    labels = lidc_labels_for_series(case.series_dir, ct, min_readers=config.min_readers, consensus=config.consensus)  # type: ignore[arg-type]
    if labels is None:
        others = []
        for xml in sorted(case.series_dir.glob("*.xml")):
            try:
                others.append(f"{xml.name} annotates series {parse_lidc_xml(xml).series_instance_uid}")
            except InputError as exc:
                others.append(f"{xml.name}: {exc.problem}")
        raise InputError(
            case.series_dir,
            f"no LIDC annotation XML for CT series {ct.meta.get('series_instance_uid')}; " + "; ".join(others),
        )

    def annotation(r: Any) -> NoduleAnnotation:
        extra = {"reader_ids": list(r.reader_ids), "consensus": r.consensus, "volume_mm3": round(r.volume_mm3, 1)}
        return NoduleAnnotation(r.id, r.center_world_xyz_mm, r.diameter_mm, r.n_readers, dict(r.characteristics), extra)

    return {
        "ct": ct,
        "nodules": [annotation(r) for r in labels.nodules],
        "excluded_nodules": [annotation(r) for r in labels.excluded_nodules],
        "nodule_mask": labels.instance_mask,
        "source": {"path": str(case.series_dir), "xml": str(labels.xml_path), "dataset": "LIDC-IDRI",
                   "labels": labels.settings},
    }


def _luna_inputs(case: LunaCase, config: PrepareConfig) -> dict[str, Any]:
    ct = read_image(case.mhd_path)
    ct.meta.setdefault("series_instance_uid", case.case_id)
    return {
        "ct": ct,
        "nodules": list(case.nodules),
        "excluded_nodules": list(case.excluded_nodules),
        "nodule_mask": None,
        "source": {"path": str(case.mhd_path), "dataset": "LUNA16",
                   "labels": {"mask": "spheres of the annotated diameter around the annotated centre",
                              "n_readers": "not in annotations.csv (LUNA16 kept nodules marked by >= 3 of 4)"}},
    }


class _ListHandler(logging.Handler):
    """Collects what the readers log (warnings such as 'several CT series, read the largest') for prepare.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


def _prepare_one(case: LidcCase | LunaCase, out_root: str, config_dict: dict[str, Any]) -> dict[str, Any]:
    """Worker: prepare one case; never raises (a failure comes back as a 'failed' summary)."""
    config = PrepareConfig.from_dict(config_dict)
    t0 = time.perf_counter()
    source_path = str(case.series_dir if isinstance(case, LidcCase) else case.mhd_path)
    handler = _ListHandler()
    logging.getLogger("nodulenet").addHandler(handler)
    try:
        t_read = time.perf_counter()
        inputs = _lidc_inputs(case, config) if isinstance(case, LidcCase) else _luna_inputs(case, config)
        read_seconds = round(time.perf_counter() - t_read, 3)
        summary = prepare_case(inputs.pop("ct"), Path(out_root) / case.case_id, config, case_id=case.case_id, **inputs)
        summary.stage_seconds = {"read": read_seconds, **summary.stage_seconds}
        summary.seconds = round(time.perf_counter() - t0, 3)
        summary.log = handler.lines + summary.log
        return summary.to_dict()
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the run; it is reported
        # Errors about the input (bad file, no lungs found) are one clear line; anything else is a bug
        # whose traceback goes to prepare.log.
        is_input = isinstance(exc, NoduleNetError)
        path = str(exc.path) if isinstance(exc, InputError) and exc.path is not None else source_path
        message = str(exc) if is_input else f"{type(exc).__name__}: {exc}"
        return CaseSummary(
            case_id=case.case_id, status="failed", out_dir=str(Path(out_root) / case.case_id), source=source_path,
            seconds=round(time.perf_counter() - t0, 3), error_file=path, error=message,
            log=handler.lines + ([] if is_input else traceback.format_exc().splitlines()),
        ).to_dict()
    finally:
        logging.getLogger("nodulenet").removeHandler(handler)


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk

    # Several worker processes share the cores; each ITK filter would otherwise start one thread per core.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


# ------------------------------------------------------------------------------------------ the run


@dataclass
class PrepareRunSummary:
    """Outcome of a :func:`prepare_lidc` / :func:`prepare_luna` run (also written as ``summary.json``)."""

    out_root: str
    dataset: str
    seconds: float
    cases: list[CaseSummary]
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for c in self.cases if c.status == status)

    @property
    def failed(self) -> list[CaseSummary]:
        return [c for c in self.cases if c.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_root": self.out_root,
            "dataset": self.dataset,
            "nodulenet_version": nodulenet.__version__,
            "seconds": self.seconds,
            "n_cases": len(self.cases),
            "n_done": self.count("done"),
            "n_skipped": self.count("skipped"),
            "n_failed": self.count("failed"),
            "cases": [{k: v for k, v in c.to_dict().items() if k != "log"} for c in self.cases],
            "skipped_inputs": self.skipped_inputs,
        }


def _file_logger(out_root: Path) -> logging.Logger:
    run_logger = logging.getLogger(f"nodulenet.prepare.run.{id(out_root)}")
    run_logger.setLevel(logging.INFO)
    run_logger.propagate = False
    handler = logging.FileHandler(out_root / "prepare.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    run_logger.addHandler(handler)
    return run_logger


def _errors(cases: list[CaseSummary]) -> list[dict[str, Any]]:
    return [{"case_id": c.case_id, "file": c.error_file, "message": c.error} for c in cases if c.status == "failed"]


def _in_workers(todo: Sequence[LidcCase | LunaCase], out: Path, config_dict: dict[str, Any], workers: int,
                done: Any) -> None:
    """Run ``_prepare_one`` over ``todo`` in ``workers`` spawned processes, calling ``done`` per result."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a forked child can inherit a lock held by the parent's ITK thread pool.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(_prepare_one, case, str(out), config_dict): case for case in todo}
        for future in as_completed(futures):
            case = futures[future]
            try:
                done(CaseSummary(**future.result()))
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory
                done(CaseSummary(case.case_id, "failed", str(out / case.case_id), source=str(case.case_id),
                                 error=f"worker process failed: {type(exc).__name__}: {exc}"))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not start the queued cases
        raise
    pool.shutdown()


def run_cases(
    cases: Sequence[LidcCase | LunaCase],
    out_root: str | Path,
    config: PrepareConfig,
    *,
    dataset: str,
    workers: int = 1,
    force: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
    skipped_inputs: list[dict[str, str]] | None = None,
) -> PrepareRunSummary:
    """Prepare ``cases`` into ``out_root`` (resumable, ``workers`` processes); see the module doc."""
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    run_log = _file_logger(out)
    t0 = time.perf_counter()
    results: list[CaseSummary] = []

    def record(summary: CaseSummary) -> None:
        results.append(summary)
        for line in summary.log:
            run_log.info("%s: %s", summary.case_id, line)
        if summary.status == "failed":
            run_log.error("%s FAILED (%s): %s", summary.case_id, summary.error_file, summary.error)
            write_json_atomic(out / "errors.json", _errors(results))  # visible while the run goes on
        elif summary.status == "done":
            run_log.info("%s done in %.1f s: %d nodule(s), lungs %.2f L, stages %s", summary.case_id, summary.seconds,
                         summary.n_nodules, (summary.lung_volume_ml or 0) / 1000, summary.stage_seconds)
        progress.advance(task_id)

    try:
        run_log.info("prepare %s: %d case(s) -> %s, workers=%d, config %s", dataset, len(cases), out, workers,
                     json.dumps(config.to_dict(), sort_keys=True))
        for s in skipped_inputs or []:
            run_log.info("skipped input %s: %s", s.get("folder"), s.get("reason"))
        finished = [c for c in cases if not force and is_case_done(out / c.case_id, config)]
        finished_ids = {c.case_id for c in finished}
        todo = [c for c in cases if c.case_id not in finished_ids]
        progress = Progress(TextColumn("[bold]prepare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, disable=not show_progress)
        with progress:
            task_id = progress.add_task(dataset, total=len(cases))
            for case in finished:
                record(CaseSummary(case.case_id, "skipped", str(out / case.case_id),
                                   log=["already prepared with this config, skipped"]))
            if min(workers, len(todo)) <= 1:
                for case in todo:
                    record(CaseSummary(**_prepare_one(case, str(out), config.to_dict())))
            else:
                _in_workers(todo, out, config.to_dict(), min(workers, len(todo)), record)
        order = {c.case_id: i for i, c in enumerate(cases)}
        results.sort(key=lambda c: order.get(c.case_id, len(order)))
        summary = PrepareRunSummary(str(out), dataset, round(time.perf_counter() - t0, 2), results,
                                    list(skipped_inputs or []))
        write_json_atomic(out / "errors.json", _errors(results))
        write_json_atomic(out / "summary.json", summary.to_dict())
        run_log.info("finished in %.1f s: %d done, %d skipped, %d failed", summary.seconds, summary.count("done"),
                     summary.count("skipped"), summary.count("failed"))
    finally:
        for handler in list(run_log.handlers):
            handler.close()
            run_log.removeHandler(handler)
    if show_progress:
        console.print(summary_table(summary))
    return summary


def summary_table(summary: PrepareRunSummary) -> Table:
    """A rich table of the run: one row per case."""
    table = Table(title=f"{summary.dataset}: {summary.count('done')} prepared, {summary.count('skipped')} skipped, "
                        f"{summary.count('failed')} failed in {summary.seconds:.0f} s -> {summary.out_root}")
    for column in ("case", "status", "seconds", "nodules", "lungs (L)", "shape (z, y, x)", "note"):
        table.add_column(column, no_wrap=column == "case")
    colours = {"done": "green", "skipped": "dim", "failed": "red"}
    for c in summary.cases:
        table.add_row(
            c.case_id, f"[{colours.get(c.status, 'white')}]{c.status}[/]",
            f"{c.seconds:.1f}" if c.status != "skipped" else "",
            str(c.n_nodules) if c.status == "done" else "",
            f"{c.lung_volume_ml / 1000:.2f}" if c.lung_volume_ml else "",
            "x".join(str(s) for s in c.shape_zyx) if c.shape_zyx else "",
            (c.error or "")[:120],
        )
    return table


def prepare_lidc(
    src_root: str | Path,
    out_root: str | Path,
    config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    min_readers: int | None = None,
    force: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
) -> PrepareRunSummary:
    """Prepare every annotated CT series of an LIDC-IDRI download (TCIA layout) under ``src_root``.

    ``min_readers`` overrides ``config.min_readers`` (nodules marked by fewer readers are listed as
    excluded and left out of the mask).
    """
    config = config or PrepareConfig()
    if min_readers is not None:
        config = config.replace(min_readers=min_readers)
    cases, skipped = find_lidc_cases(src_root)
    if not cases:
        raise InputError(src_root, "no CT series folder with .dcm files and an LIDC .xml found under it")
    return run_cases(cases, out_root, config, dataset="LIDC-IDRI", workers=workers, force=force,
                     show_progress=show_progress, console=console, skipped_inputs=skipped)


def prepare_luna(
    mhd_root: str | Path,
    annotations_csv: str | Path,
    out_root: str | Path,
    config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    excluded_csv: str | Path | None = None,
    force: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
) -> PrepareRunSummary:
    """Prepare every ``<seriesuid>.mhd`` under ``mhd_root``; nodule masks are spheres (see module doc)."""
    config = config or PrepareConfig()
    cases = find_luna_cases(mhd_root, annotations_csv, excluded_csv)
    if not cases:
        raise InputError(mhd_root, "no .mhd file found under it")
    return run_cases(cases, out_root, config, dataset="LUNA16", workers=workers, force=force,
                     show_progress=show_progress, console=console)
