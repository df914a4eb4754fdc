"""Seeded synthetic chest CT ("phantom") with known nodules, and nodule insertion into real scans.

Used by the tests, by ``nodulenet demo`` (one scan, real inference) and for smoke/demo training. The
anatomy aims at what a detector must learn to ignore in real LIDC scans: branching vessel trees (the
main source of false positives), airways, ribs, spine, heart and diaphragm, textured parenchyma,
partial volume and CT noise. See :mod:`.phantom_anatomy`, :mod:`.phantom_tubes`, :mod:`.phantom_nodules`.

Conventions (DESIGN.md): arrays ``(z, y, x)``; world coordinates are DICOM LPS mm ordered ``(x, y, z)``;
boxes ``(z0, y0, x0, z1, y1, x1)`` in voxels, ``z1`` exclusive. The phantom is drawn on a patient-aligned
grid (x to the patient's left, y to the back, z to the head) and then flipped to the configured
direction, so a flipped phantom is the same patient stored the other way round: every world position,
nodule centre included, is identical.

Determinism: every random draw comes from ``numpy.random.Generator`` streams spawned from one
``SeedSequence(seed)`` (anatomy, nodules and noise each have their own stream, so changing the number of
nodules does not move a vessel). The same seed and config give byte-identical arrays.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nodulenet import __version__
from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic, write_text_atomic
from nodulenet.io.volume import Geometry, Volume

from .phantom_anatomy import Grid, build_anatomy, sample_torso
from .phantom_nodules import (
    GROUND_GLASS_STYLES,
    NODULE_KINDS,
    PhantomNodule,
    VesselSites,
    add_nodules,
    correlated_noise,
    describe_nodules,
)

# Bump when the same seed + config would give different arrays (recorded in nodules.json).
PHANTOM_GENERATOR_VERSION = "1"
PHANTOM_FORMATS = ("nii.gz", "mhd", "nrrd", "dicom")  # dicom: the scan as a CT series folder, masks .nii.gz
F32 = np.float32

__all__ = [
    "NODULE_KINDS",
    "PHANTOM_FORMATS",
    "PHANTOM_GENERATOR_VERSION",
    "Phantom",
    "PhantomConfig",
    "PhantomNodule",
    "insert_nodules",
    "make_phantom",
    "phantom_series_uid",
    "write_phantom",
]


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate. Sizes in voxels or mm as named; the slice thickness is drawn per seed.

    The number of slices is ``round(extent_z_mm / thickness)`` where the thickness (= slice spacing, as
    in LIDC) is drawn uniformly from ``slice_thickness_range_mm`` (rounded to 0.05 mm); give a range of
    one value for a fixed thickness. The body fills ``body_fill`` of the in-plane field of view, so a
    small grid gives a small (child-sized) chest with adult-sized vessels, ribs and nodules in mm.
    ``flip_xyz`` stores the image with the index axis reversed (direction -1) along world x, y or z.
    ``fov_padding_hu`` fills the corners outside the round field of view as scanners do (LIDC uses
    -2048 or -3024); ``None`` leaves air there.
    """

    shape_yx: tuple[int, int] = (288, 288)
    spacing_yx_mm: tuple[float, float] = (0.75, 0.75)
    extent_z_mm: float = 200.0
    slice_thickness_range_mm: tuple[float, float] = (1.25, 2.5)
    n_nodules: int = 4
    nodule_kinds: tuple[str, ...] = NODULE_KINDS
    diameter_range_mm: tuple[float, float] = (3.0, 30.0)
    noise_sigma_hu: float = 20.0
    noise_correlation_px: float = 0.7
    body_fill: float = 0.9
    table: bool = True
    vessel_leaf_spacing_mm: float = 5.0
    flip_xyz: tuple[bool, bool, bool] = (False, False, False)
    fov_padding_hu: int | None = -3024
    # "classic" or "varied" ground-glass nodules (preprocess/phantom_nodules.py); classic keeps every seed as it was.
    ground_glass_style: str = "classic"

    def __post_init__(self) -> None:
        problems = []
        if self.ground_glass_style not in GROUND_GLASS_STYLES:
            problems.append(f"ground_glass_style must be one of {GROUND_GLASS_STYLES}, got {self.ground_glass_style!r}")
        if len(self.shape_yx) != 2 or min(self.shape_yx) < 32:
            problems.append(f"shape_yx must be two sizes >= 32, got {self.shape_yx}")
        if len(self.spacing_yx_mm) != 2 or min(self.spacing_yx_mm) <= 0:
            problems.append(f"spacing_yx_mm must be two positive sizes, got {self.spacing_yx_mm}")
        elif len(self.shape_yx) == 2 and min(n * s for n, s in zip(self.shape_yx, self.spacing_yx_mm)) < 100.0:
            problems.append("the in-plane field of view (shape_yx * spacing_yx_mm) must be at least 100 mm to hold a chest")
        if self.extent_z_mm < 60.0:
            problems.append(f"extent_z_mm must be at least 60 mm to hold the lungs, got {self.extent_z_mm}")
        lo, hi = self.slice_thickness_range_mm
        if not 0 < lo <= hi:
            problems.append(f"slice_thickness_range_mm must satisfy 0 < low <= high, got {self.slice_thickness_range_mm}")
        elif self.extent_z_mm / hi < 16:
            problems.append(f"extent_z_mm={self.extent_z_mm} gives fewer than 16 slices at {hi} mm")
        if self.n_nodules < 0:
            problems.append(f"n_nodules must be >= 0, got {self.n_nodules}")
        unknown = [k for k in self.nodule_kinds if k not in NODULE_KINDS]
        if unknown or (self.n_nodules and not self.nodule_kinds):
            problems.append(f"nodule_kinds must be drawn from {NODULE_KINDS}, got {self.nodule_kinds}")
        dlo, dhi = self.diameter_range_mm
        if not 1.0 <= dlo <= dhi:
            problems.append(f"diameter_range_mm must satisfy 1 <= low <= high, got {self.diameter_range_mm}")
        if self.noise_sigma_hu < 0 or not 0.3 <= self.body_fill <= 0.98:
            problems.append("noise_sigma_hu must be >= 0 and body_fill within [0.3, 0.98]")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhantomConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Phantom:
    """A generated scan: HU image, nodule instance labels, lung mask, nodule records, and provenance."""

    image: Volume  # int16 HU
    nodule_mask: Volume  # uint16, 0 background, nodule ids 1..n
    lung_mask: Volume  # uint8 0/1
    vessel_mask: Volume  # uint8 0/1: pulmonary vessels in the lungs (partial volume >= 0.5); the false-positive bait
    nodules: list[PhantomNodule]
    seed: int
    config: PhantomConfig
    series_uid: str
    info: dict[str, Any] = field(default_factory=dict)


def phantom_series_uid(seed: int, config: PhantomConfig) -> str:
    """A DICOM-style UID (pydicom's root) derived only from the seed, config and generator version."""
    from pydicom.uid import generate_uid

    key = json.dumps({"seed": int(seed), "config": config.to_dict(), "v": PHANTOM_GENERATOR_VERSION}, sort_keys=True)
    return str(generate_uid(entropy_srcs=["nodulenet-phantom", key]))


def _flip_to_direction(arrays: list[np.ndarray], origin_xyz: np.ndarray, spacing_zyx: tuple[float, float, float],
                       flip_xyz: tuple[bool, bool, bool]) -> tuple[list[np.ndarray], np.ndarray, tuple[float, ...]]:
    """Reverse the flagged axes; return the arrays, the new origin (world of the new voxel 0) and direction."""
    shape = arrays[0].shape
    origin = origin_xyz.copy()
    direction = np.eye(3)
    out = list(arrays)
    for world_axis, flip in enumerate(flip_xyz):
        if not flip:
            continue
        array_axis = 2 - world_axis  # world x <-> array axis 2 (columns), z <-> axis 0
        out = [np.flip(a, axis=array_axis) for a in out]
        origin[world_axis] += (shape[array_axis] - 1) * spacing_zyx[array_axis]
        direction[world_axis, world_axis] = -1.0
    return [np.ascontiguousarray(a) for a in out], origin, tuple(direction.reshape(-1))


def make_phantom(seed: int, config: PhantomConfig = PhantomConfig()) -> Phantom:
    """Generate the phantom for ``seed`` (see module doc). Pure: same inputs, byte-identical outputs."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng_geometry, rng_anatomy, rng_nodules, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    lo, hi = config.slice_thickness_range_mm
    # Thickness on a 0.05 mm grid (as scanners offer), rounded to 4 decimals so it prints as it is.
    thickness = round(float(np.round(rng_geometry.uniform(lo, hi) / 0.05) * 0.05), 4) if hi > lo else float(lo)
    thickness = float(min(max(thickness, lo), hi))
    nz = int(round(config.extent_z_mm / thickness))
    ny, nx = config.shape_yx
    sy, sx = config.spacing_yx_mm
    grid = Grid((nz, ny, nx), (thickness, float(sy), float(sx)))
    torso = sample_torso(rng_anatomy, grid, config.body_fill, config.table)
    anatomy = build_anatomy(torso, grid, rng_anatomy, leaf_spacing_mm=config.vessel_leaf_spacing_mm)
    hu = anatomy.hu
    lung = anatomy.lung_fraction >= 0.5
    instance = np.zeros(grid.shape_zyx, dtype=np.uint16)
    extras: list[dict[str, Any]] = []
    if config.n_nodules:
        start = int(rng_nodules.integers(len(config.nodule_kinds)))
        kinds = [config.nodule_kinds[(start + i) % len(config.nodule_kinds)] for i in range(config.n_nodules)]
        vessel_frac = anatomy.vessel_fraction
        spacing = np.asarray(grid.spacing_zyx)

        def plain_parenchyma(center_mm: np.ndarray) -> bool:
            idx = tuple(np.clip(np.round(center_mm / spacing).astype(int), 0, np.asarray(grid.shape_zyx) - 1))
            return bool(vessel_frac[idx] < 0.2)

        try:
            extras = add_nodules(
                hu, lung, instance, grid.spacing_zyx, rng_nodules, kinds, config.diameter_range_mm,
                vessel_sites=VesselSites.from_capsules(anatomy.vessels, rng_nodules),
                background_ok=plain_parenchyma, ground_glass_style=config.ground_glass_style,
            )
        except RuntimeError as exc:
            raise ValueError(f"seed {seed}: {exc}; ask for fewer or smaller nodules or a bigger grid") from None
    if config.noise_sigma_hu > 0:
        hu += F32(config.noise_sigma_hu) * correlated_noise(rng_noise, hu.shape, config.noise_correlation_px)
    # Scanners store HU from -1024 up; round half to even (np.rint) is deterministic.
    image = np.rint(np.clip(hu, -1024.0, 3071.0)).astype(np.int16)
    if config.fov_padding_hu is not None:
        yy = (np.arange(ny) - (ny - 1) / 2.0) * sy
        xx = (np.arange(nx) - (nx - 1) / 2.0) * sx
        outside = (yy[:, None] ** 2 + xx[None, :] ** 2) > (0.5 * min(ny * sy, nx * sx)) ** 2
        image[:, outside] = np.int16(config.fov_padding_hu)
    # Canonical origin: centred in x and y like a scanner's field of view, z well below zero (feet first).
    origin = np.array([
        -(nx - 1) * sx / 2.0 + rng_geometry.uniform(-15.0, 15.0),
        -(ny - 1) * sy / 2.0 + rng_geometry.uniform(-15.0, 15.0),
        -rng_geometry.uniform(250.0, 400.0),
    ])
    vessels_u8 = ((anatomy.vessel_fraction >= 0.5) & lung).astype(np.uint8)
    (image, instance, lung_u8, vessels_u8), origin, direction = _flip_to_direction(
        [image, instance, lung.astype(np.uint8), vessels_u8], origin, grid.spacing_zyx, config.flip_xyz
    )
    geometry = Geometry(grid.shape_zyx, grid.spacing_zyx, tuple(origin), direction)
    uid = phantom_series_uid(seed, config)
    meta = {"modality": "CT", "series_instance_uid": uid, "phantom_seed": seed, "generator_version": PHANTOM_GENERATOR_VERSION}
    nodules = describe_nodules(image, instance, geometry, extras)
    info = {"slice_thickness_mm": thickness, "anatomy": anatomy.params, "n_vessel_segments": len(anatomy.vessels)}
    return Phantom(
        image=Volume.from_geometry(image, geometry, meta),
        nodule_mask=Volume.from_geometry(instance, geometry, {**meta, "content": "nodule instance labels"}),
        lung_mask=Volume.from_geometry(lung_u8, geometry, {**meta, "content": "lung mask"}),
        vessel_mask=Volume.from_geometry(vessels_u8, geometry, {**meta, "content": "pulmonary vessel mask"}),
        nodules=nodules,
        seed=seed,
        config=config,
        series_uid=uid,
        info=info,
    )


def _luna_csv(series_uid: str, nodules: Sequence[PhantomNodule]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
    for n in nodules:
        x, y, z = n.center_world_xyz_mm
        writer.writerow([series_uid, f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", f"{n.diameter_mm:.4f}"])
    return buf.getvalue()


def write_phantom(out_dir: str | Path, seed: int, config: PhantomConfig = PhantomConfig(), fmt: str = "nii.gz") -> dict[str, Path]:
    """Generate the phantom for ``seed`` and write it to ``out_dir``; return the written paths by name.

    Files: ``scan.<fmt>`` (int16 HU; ``scan/`` holding one DICOM CT slice per z for ``fmt="dicom"``, whose masks
    are ``.nii.gz``), ``nodule_mask.<fmt>`` (uint16 instance ids), ``lung_mask.<fmt>``
    (uint8), ``annotations.csv`` (LUNA16 columns, world LPS mm, one row per nodule) and ``nodules.json``
    (records, geometry, seed, config, generator version). Every file is written atomically.
    """
    from nodulenet.io.image_files import write_image

    fmt = fmt.lstrip(".")
    if fmt not in PHANTOM_FORMATS:
        raise InputError(out_dir, f"unknown phantom format {fmt!r}; choose one of {', '.join(PHANTOM_FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    phantom = make_phantom(seed, config)
    mask_fmt = "nii.gz" if fmt == "dicom" else fmt
    paths = {
        "scan": _write_dicom_scan(phantom, out / "scan") if fmt == "dicom" else write_image(phantom.image,
                                                                                              out / f"scan.{fmt}"),
        "nodule_mask": write_image(phantom.nodule_mask, out / f"nodule_mask.{mask_fmt}"),
        "lung_mask": write_image(phantom.lung_mask, out / f"lung_mask.{mask_fmt}"),
    }
    paths["annotations"] = write_text_atomic(out / "annotations.csv", _luna_csv(phantom.series_uid, phantom.nodules))
    record = {
        "generator": "nodulenet.preprocess.phantom",
        "generator_version": PHANTOM_GENERATOR_VERSION,
        "nodulenet_version": __version__,
        "seed": phantom.seed,
        "series_uid": phantom.series_uid,
        "config": config.to_dict(),
        "geometry": phantom.image.geometry.to_dict(),
        "slice_thickness_mm": phantom.info["slice_thickness_mm"],
        "files": {k: p.name for k, p in paths.items()},
        "nodules": [n.to_dict() for n in phantom.nodules],
    }
    paths["nodules"] = write_json_atomic(out / "nodules.json", record)
    return paths


def _write_dicom_scan(phantom: Phantom, folder: Path) -> Path:
    """The phantom's scan as a CT series folder; its UIDs derive from the phantom's series UID (same seed, same
    files)."""
    from pydicom.uid import generate_uid

    from nodulenet.io.dicom_write import SeriesIdentity, write_ct_series

    uid = phantom.series_uid
    identity = SeriesIdentity(
        study_uid=generate_uid(entropy_srcs=[uid, "study"]), series_uid=uid,
        frame_of_reference_uid=generate_uid(entropy_srcs=[uid, "frame of reference"]),
        patient_id=f"PHANTOM-{phantom.seed:05d}", series_description=f"NoduleNet phantom seed {phantom.seed}")
    write_ct_series(phantom.image, folder, identity)
    return folder


def _noise_sigma(hu: np.ndarray, lung_mask: np.ndarray) -> float:
    """Noise level of a scan in its lungs, from neighbouring-pixel differences (robust MAD; vessels are rare)."""
    step = max(1, hu.shape[0] // 24)  # a couple dozen slices are plenty and keep this fast
    a = hu[::step].astype(np.float32)
    m = lung_mask[::step]
    diff = (a[:, :, 1:] - a[:, :, :-1])[m[:, :, 1:] & m[:, :, :-1]]
    if diff.size < 100:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def insert_nodules(
    volume: Volume,
    lung_mask: np.ndarray,
    seed: int,
    n: int,
    kinds: Sequence[str] = NODULE_KINDS,
    diameter_range_mm: tuple[float, float] = (3.0, 30.0),
    exclusion_mask: np.ndarray | None = None,
) -> tuple[Volume, Volume, list[PhantomNodule]]:
    """Insert ``n`` synthetic nodules into a real scan's lungs; return (new scan, instance mask, records).

    ``lung_mask`` (bool, the scan's shape) says where nodules may go; ``exclusion_mask`` (e.g. the
    scan's real nodules) is kept 3 mm clear. Kinds are used in turn from a seed-chosen start. Shapes are
    drawn in mm using the scan's spacing, so they stay round on anisotropic grids; centres are reported
    through the scan's geometry (origin, spacing and direction). Voxels more than a nodule's reach away
    from every nodule are returned unchanged. The output keeps the input's dtype.
    """
    lung = np.asarray(lung_mask).astype(bool)
    if lung.shape != volume.shape_zyx:
        raise InputError(None, f"lung mask shape {lung.shape} does not match the scan's {volume.shape_zyx}")
    if exclusion_mask is not None and np.asarray(exclusion_mask).shape != volume.shape_zyx:
        raise InputError(None, f"exclusion mask shape {np.asarray(exclusion_mask).shape} does not match the scan's {volume.shape_zyx}")
    if not lung.any():
        raise InputError(None, "the lung mask is empty; no place to insert nodules")
    bad = [k for k in kinds if k not in NODULE_KINDS]
    if bad or (n and not kinds):
        raise InputError(None, f"unknown nodule kind(s) {bad}; choose from {', '.join(NODULE_KINDS)}")
    rng_sites, rng_nodules, rng_order = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    hu = volume.array.astype(np.float32)
    spacing = np.asarray(volume.spacing_zyx, dtype=np.float64)
    # Vessel sites: voxels of vessel density mostly surrounded by lung (a lung mask may or may not
    # include its vessels; the chest wall and mediastinum are lung on one side only). Found on a 2x
    # coarser grid: plenty of sites, a quarter of the work.
    step = 2
    coarse_hu = hu[::step, ::step, ::step]
    lung_share = ndimage.uniform_filter(lung[::step, ::step, ::step].astype(np.float32), size=5, mode="constant")
    inner = (lung_share >= 0.6) & (coarse_hu > -350) & (coarse_hu < 200)
    cand = np.flatnonzero(inner)
    if len(cand) > 4000:
        cand = np.sort(rng_sites.choice(cand, 4000, replace=False))
    pts = np.stack(np.unravel_index(cand, inner.shape), axis=1).astype(np.float64) * step * spacing
    sites = VesselSites(pts, np.zeros_like(pts), np.full(len(pts), 1.5))

    def plain_parenchyma(center_mm: np.ndarray) -> bool:
        idx = tuple(np.clip(np.round(center_mm / spacing).astype(int), 0, np.asarray(hu.shape) - 1))
        return bool(hu[idx] < -500)

    start = int(rng_order.integers(len(kinds))) if n else 0
    chosen = [kinds[(start + i) % len(kinds)] for i in range(n)]
    instance = np.zeros(hu.shape, dtype=np.uint16)
    try:
        extras = add_nodules(
            hu, lung, instance, spacing, rng_nodules, chosen, diameter_range_mm, vessel_sites=sites,
            background_ok=plain_parenchyma, exclusion_mask=None if exclusion_mask is None else np.asarray(exclusion_mask).astype(bool),
            noise_sigma_hu=_noise_sigma(volume.array, lung),
        )
    except RuntimeError as exc:
        raise InputError(None, f"cannot insert {n} nodules: {exc}") from None
    dtype = volume.array.dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        new = np.rint(np.clip(hu, info.min, info.max)).astype(dtype)
        # Only voxels a nodule touched may change; rounding elsewhere reproduces the input exactly.
    else:
        new = hu.astype(dtype)
    geometry = volume.geometry
    nodules = describe_nodules(new, instance, geometry, extras)
    out_scan = volume.with_array(new, inserted_nodules=len(nodules), insert_seed=int(seed))
    out_mask = Volume.from_geometry(instance, geometry, {"content": "inserted nodule instance labels", "insert_seed": int(seed)})
    return out_scan, out_mask, nodules
