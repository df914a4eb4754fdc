"""Prepare one CT case for training and evaluation: one folder per case (whole datasets:
:mod:`nodulenet.preprocess.prepare_dataset`).

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
rerun; a folder without it is redone.

The image itself comes from :func:`make_network_input`, which ``nodulenet predict`` calls too
(:mod:`nodulenet.infer.prepare_input`): a new scan reaches the network exactly as the training cases did.

LUNA16 cases have no outlines: their nodule masks are **spheres** of the annotated diameter around the
annotated centre, drawn on the prepared grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import nodulenet
from nodulenet.io.atomic import write_json_atomic
from nodulenet.io.image_files import write_image
from nodulenet.io.orientation import canonical_orientation
from nodulenet.io.volume import Geometry, Volume
from nodulenet.preprocess.config import CASE_FILES, DONE_FILE, PrepareConfig
from nodulenet.preprocess.lung_mask import LungMaskResult, lung_bounding_box, segment_lungs
from nodulenet.preprocess.normalize import apply_lung_mask, hu_to_uint8
from nodulenet.preprocess.overlay import render_overlay
from nodulenet.preprocess.resample import CaseTransform, resample_labels, resample_volume

LUNG_LABEL_MARGIN = 3

logger = logging.getLogger(__name__)


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


def fill_scanner_padding(ct: Volume, config: PrepareConfig) -> Volume:
    """``ct`` with scanner padding (below ``config.padding_below_hu``: -2048, -3024 outside the field of view) set
    to ``config.padding_fill_hu``, so that no interpolation (reorientation of an oblique scan, resampling) blends it
    into the body edge. The same volume when there is none."""
    padding = ct.array < config.padding_below_hu
    if not padding.any():
        return ct
    return ct.with_array(np.where(padding, np.asarray(config.padding_fill_hu, dtype=ct.array.dtype), ct.array))


def canonical_hu(ct: Volume, config: PrepareConfig, lap: Any = None) -> tuple[Volume, Any, Any]:
    """``ct`` in HU as the lung mask and the network see it: padding filled, canonical orientation, resampled to
    ``config.spacing_zyx_mm``; returns ``(hu, resample mapping, reorientation)``. ``lap(stage)`` times the steps."""
    # Padding first: an oblique scan is interpolated by its reorientation already.
    canonical, orientation = canonical_orientation(fill_scanner_padding(ct, config))
    if not orientation.is_identity:
        logger.info("%s: %s", ct.meta.get("source_path", "scan"), orientation.describe())
    if lap is not None:
        lap("orient")
    hu, mapping = resample_volume(canonical, config.spacing_zyx_mm, "linear")
    if lap is not None:
        lap("resample")
    return hu, mapping, orientation


@dataclass
class NetworkInput:
    """A scan as the network sees it: uint8 ``(z, y, x)`` on the prepared grid, the transform back to the scan,
    and the lung segmentation of the resampled (uncropped) scan."""

    image: np.ndarray
    transform: CaseTransform
    lung: LungMaskResult
    stage_seconds: dict[str, float] = field(default_factory=dict)


def make_network_input(ct: Volume, config: PrepareConfig) -> NetworkInput:
    """Put ``ct`` (HU) into canonical orientation (:func:`nodulenet.io.orientation.canonical_orientation`: axial
    slices, LPS axis signs, as every training case), resample it, segment the lungs, crop to them (undilated lungs
    + ``crop_margin_voxels``, as published) and window to uint8 with everything outside the dilated lungs set to
    ``pad_value``. The transform maps back to ``ct``'s own grid.

    Raises :class:`~nodulenet.preprocess.lung_mask.LungSegmentationError` when no lung is found.
    """
    stages: dict[str, float] = {}
    last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages[name] = round(now - last, 3)
        last = now

    hu, mapping, orientation = canonical_hu(ct, config, lap)
    lung = segment_lungs(hu, config.lung)
    lap("lung_mask")
    box = lung_bounding_box(lung.lungs > 0, config.crop_margin_voxels)
    transform = CaseTransform(ct.geometry, mapping.resampled, box[:3], box[3:],
                              orientation=None if orientation.is_identity else orientation)
    crop = transform.crop_slices
    image = hu_to_uint8(hu.array[crop], config.hu_min, config.hu_max)
    del hu
    image = apply_lung_mask(image, lung.kept[crop], lung.lungs[crop], config.pad_value, config.remove_bone,
                            config.bone_threshold)
    lap("normalize")
    stages.update({f"lung.{k}": v for k, v in lung.stage_seconds.items()})
    return NetworkInput(image=image, transform=transform, lung=lung, stage_seconds=stages)


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

    prepared = make_network_input(ct, config)
    stages.update({k: v for k, v in prepared.stage_seconds.items() if not k.startswith("lung.")})
    last = time.perf_counter()
    lung, transform, image = prepared.lung, prepared.transform, prepared.image
    crop = transform.crop_slices
    geometry = transform.preprocessed
    lungs, kept = lung.lungs[crop], lung.kept[crop]
    lung_labels = np.where(kept & (lungs == 0), np.uint8(LUNG_LABEL_MARGIN), lungs).astype(np.uint8)

    if nodule_mask is not None:
        if nodule_mask.shape_zyx != ct.shape_zyx:
            raise ValueError(f"nodule mask {nodule_mask.shape_zyx} is not on the scan grid {ct.shape_zyx}")
        if transform.orientation is not None:  # the same reorientation as the image (nearest for an oblique scan)
            nodule_mask = transform.orientation.to_canonical(nodule_mask, interpolation="nearest", fill_value=0)
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
