"""Synthetic lung nodules: shapes, placement inside the lungs, partial-volume blending, and records.

Conventions: arrays are ``(z, y, x)``; nodule geometry is worked out in *index-aligned millimetres*
``(z, y, x)`` = voxel index times ``spacing_zyx``. That frame is the patient frame up to a rotation or
reflection (the direction matrix is orthonormal), so shapes keep their true size and roundness whatever
the scan's direction; world coordinates are only produced at the end, through the scan's
:class:`~nodulenet.io.volume.Geometry`. Boxes are ``(z0, y0, x0, z1, y1, x1)``, ``z1`` exclusive.

Kinds (what a radiologist would call them):

- ``solid``: soft-tissue density (+20..+60 HU), smooth, lobulated or spiculated margin;
- ``part_solid``: ground glass with a solid core of 35-60 % of its diameter (at least 5 mm);
- ``ground_glass``: -660..-520 HU, mottled, vessels stay visible through it (style ``classic``, the default);
  with style ``varied`` (:data:`GROUND_GLASS_STYLES`) they have the variety of real pure ground-glass nodules
  (the one of LIDC-IDRI-0002 is ~25 mm, faint, ill-defined): 10-30 mm, -800..-560 HU (the faintest barely
  200 HU above the lung), patchier (texture +-40..90 HU), an irregular margin (7 deeper, higher-frequency lobes)
  that fades out over 1.5-4 mm;
- ``juxta_pleural``: solid, its centre 0.6 radius inside the pleura so it sits on the chest wall or
  mediastinum (the part outside the lung is hidden in soft tissue and is not in the mask);
- ``juxta_vascular``: solid, touching a vessel of 0.8-3 mm radius.

Blending: a voxel takes ``old + f * max(target - old, 0)`` where ``f`` is the nodule's partial-volume
fraction (sub-slice sampled, one-voxel ramp along the surface normal). The ``max`` keeps vessels that run
through a ground-glass nodule, as they do in real scans. Inserting into a real (noisy) scan adds
correlated noise of the scan's own level inside the nodule so it is not suspiciously smooth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from nodulenet.io.volume import Geometry

from .phantom_tubes import Capsules, render_capsules

NODULE_KINDS: tuple[str, ...] = ("solid", "part_solid", "ground_glass", "juxta_pleural", "juxta_vascular")
# Smallest diameter (mm) that still reads as the kind: a 3 mm part-solid nodule has no visible core.
_MIN_DIAMETER_MM = {"part_solid": 8.0, "ground_glass": 5.0, "juxta_pleural": 5.0}
# How ground-glass nodules are drawn: "classic" (what the shipped demo model was trained and benchmarked on; the
# default, so every existing seed gives the same phantom) or "varied" (module doc; draws differ from classic's).
GROUND_GLASS_STYLES: tuple[str, ...] = ("classic", "varied")
_VARIED_GROUND_GLASS_MM = (10.0, 30.0)
F32 = np.float32


@dataclass(frozen=True)
class PhantomNodule:
    """One synthetic nodule as it ended up in the image and its instance mask.

    ``center_zyx`` is the mask centroid (fractional voxel index of the returned arrays) and
    ``center_world_xyz_mm`` the same point in patient LPS mm. ``diameter_mm`` is the diameter of the
    sphere with the nodule's partial-volume volume inside the lung (``volume_mm3``); the mask holds the
    most occupied voxels up to that volume (see ``_volume_preserving_level``). ``box_zyx`` bounds the mask (``z1`` exclusive). ``mean_hu`` is the
    mean of the final image over the mask.
    """

    id: int
    kind: str
    center_world_xyz_mm: tuple[float, float, float]
    center_zyx: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    box_zyx: tuple[int, int, int, int, int, int]
    mean_hu: float
    margin: str = "smooth"
    solid_diameter_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("center_world_xyz_mm", "center_zyx", "box_zyx"):
            d[key] = list(d[key])
        return d


@dataclass(frozen=True)
class NoduleShape:
    """A nodule's shape and densities, centred on ``center_mm`` (index-aligned mm, z y x)."""

    kind: str
    margin: str
    center_mm: np.ndarray
    radius_mm: float
    lobe_dirs: np.ndarray  # (k, 3) unit vectors
    lobe_amp: np.ndarray  # (k,)
    lobe_freq: np.ndarray  # (k,)
    lobe_phase: np.ndarray  # (k,)
    spicules: Capsules  # relative to the centre
    outer_hu: float
    texture_hu: float
    core_offset_mm: np.ndarray | None = None
    core_radius_mm: float = 0.0
    core_hu: float = 0.0
    fuzz_mm: float = 0.0  # extra width of the edge ramp: ground glass fades out, solid tissue stops

    @property
    def reach_mm(self) -> float:
        """Radius of a sphere that holds the whole nodule, spicules included."""
        r = self.radius_mm * (1.0 + float(np.abs(self.lobe_amp).sum())) + 0.5 * self.fuzz_mm
        if len(self.spicules):
            tips = np.linalg.norm(self.spicules.end_zyx_mm, axis=1) + self.spicules.end_radius_mm
            r = max(r, float(tips.max()))
        return r

    def moved(self, center_mm: np.ndarray) -> "NoduleShape":
        return NoduleShape(**{**self.__dict__, "center_mm": np.asarray(center_mm, dtype=np.float64)})


def fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly evenly spread unit vectors ``(n, 3)``."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)], axis=1)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sample_diameter(rng: np.random.Generator, kind: str, diameter_range_mm: tuple[float, float],
                    ground_glass_style: str = "classic") -> float:
    """Log-uniform in the range (small nodules are the common ones), raised to the kind's minimum; a ``varied``
    ground-glass nodule is drawn in 10-30 mm (within the range where the range allows)."""
    lo, hi = diameter_range_mm
    if kind == "ground_glass" and ground_glass_style == "varied":
        lo, hi = max(lo, _VARIED_GROUND_GLASS_MM[0]), min(max(hi, lo), _VARIED_GROUND_GLASS_MM[1])
        lo = min(lo, hi)
    lo_kind = min(max(lo, _MIN_DIAMETER_MM.get(kind, lo)), hi)
    return float(np.exp(rng.uniform(np.log(lo_kind), np.log(hi))))


def _varied_ground_glass(rng: np.random.Generator, diameter_mm: float) -> NoduleShape:
    """A pure ground-glass nodule with the variety of real ones (module doc)."""
    radius = 0.5 * diameter_mm
    k = 7
    return NoduleShape(
        kind="ground_glass", margin="irregular", center_mm=np.zeros(3), radius_mm=radius, lobe_dirs=_unit(rng, k),
        lobe_amp=rng.uniform(0.08, 0.18, k), lobe_freq=rng.uniform(1.5, 3.5, k),
        lobe_phase=rng.uniform(0, 2 * np.pi, k),
        spicules=Capsules(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0)),
        outer_hu=float(rng.uniform(-800.0, -560.0)), texture_hu=float(rng.uniform(40.0, 90.0)),
        core_offset_mm=None, core_radius_mm=0.0, core_hu=0.0, fuzz_mm=float(rng.uniform(1.5, 4.0)),
    )


def sample_shape(rng: np.random.Generator, kind: str, diameter_mm: float,
                 ground_glass_style: str = "classic") -> NoduleShape:
    """Draw a nodule of ``kind`` with nominal ``diameter_mm``, centred on the origin."""
    if kind not in NODULE_KINDS:
        raise ValueError(f"unknown nodule kind {kind!r}; expected one of {', '.join(NODULE_KINDS)}")
    if ground_glass_style not in GROUND_GLASS_STYLES:
        raise ValueError(f"unknown ground-glass style {ground_glass_style!r}; expected one of {GROUND_GLASS_STYLES}")
    if kind == "ground_glass" and ground_glass_style == "varied":
        return _varied_ground_glass(rng, diameter_mm)
    radius = 0.5 * diameter_mm
    ground_glass = kind in ("ground_glass", "part_solid")
    if ground_glass:
        margin = "lobulated" if rng.uniform() < 0.7 else "smooth"
    else:
        margin = str(rng.choice(["smooth", "lobulated", "spiculated"], p=[0.4, 0.35, 0.25]))
    # Gentle scallops: few low-frequency lobes (higher frequencies make star shapes no nodule has).
    k = 5 if margin == "lobulated" else 3
    amp = rng.uniform(0.05, 0.09, k) if margin == "lobulated" else rng.uniform(0.015, 0.04, k)
    freq = rng.uniform(1.0, 2.2, k)
    spicules = Capsules(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    if margin == "spiculated" and diameter_mm >= 6.0:
        n = int(rng.integers(4, 11))
        dirs = _unit(rng, n)
        length = np.minimum(rng.uniform(0.4, 1.1, n) * radius, 12.0)
        tilt = dirs + 0.25 * _unit(rng, n)
        tilt /= np.linalg.norm(tilt, axis=1, keepdims=True)
        base = dirs * radius * 0.85
        spicules = Capsules(base, base + tilt * length[:, None], rng.uniform(0.35, 0.7, n), np.full(n, 0.15))
    if kind == "ground_glass":
        outer, texture = rng.uniform(-660.0, -520.0), rng.uniform(30.0, 50.0)
    elif kind == "part_solid":
        outer, texture = rng.uniform(-640.0, -500.0), rng.uniform(30.0, 50.0)
    else:
        outer, texture = rng.uniform(20.0, 60.0), rng.uniform(6.0, 12.0)
    core_offset, core_radius, core_hu = None, 0.0, 0.0
    fuzz = rng.uniform(0.8, 2.0) if ground_glass else 0.0
    if kind == "part_solid":
        # A solid part of at least 5 mm: smaller ones vanish into partial volume on thick slices.
        core_radius = min(max(rng.uniform(0.35, 0.6) * radius, 2.5), 0.7 * radius)
        core_offset = _unit(rng, 1)[0] * rng.uniform(0.1, 0.5) * (radius - core_radius)
        core_hu = rng.uniform(0.0, 40.0)
    return NoduleShape(
        kind=kind, margin=margin, center_mm=np.zeros(3), radius_mm=radius, lobe_dirs=_unit(rng, k), lobe_amp=amp,
        lobe_freq=freq, lobe_phase=rng.uniform(0, 2 * np.pi, k), spicules=spicules, outer_hu=float(outer),
        texture_hu=float(texture), core_offset_mm=core_offset, core_radius_mm=float(core_radius), core_hu=float(core_hu),
        fuzz_mm=float(fuzz),
    )


def _box_for(center_mm: np.ndarray, reach_mm: float, spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.floor((center_mm - reach_mm - 1.5 * spacing) / spacing).astype(int)
    hi = np.ceil((center_mm + reach_mm + 1.5 * spacing) / spacing).astype(int) + 1
    return np.clip(lo, 0, shape), np.clip(hi, 0, shape)


def render_shape(shape: NoduleShape, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray, n_sub_z: int) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume fractions ``(outer, core)`` of the nodule over the index box ``[lo, hi)``.

    The surface is ``rho = r(u)`` with ``r(u) = R (1 + sum_k a_k cos(pi f_k u.v_k + phi_k))``; the ramp
    width along the (radial) normal is ``sum_i |u_i| * step_i`` with the z step divided by the sub-slices.
    """
    sz, sy, sx = (float(v) for v in spacing)
    sub = (np.arange(n_sub_z) + 0.5) / n_sub_z - 0.5
    z = ((lo[0] + np.arange(hi[0] - lo[0]))[None, :] + sub[:, None]) * sz
    y = (lo[1] + np.arange(hi[1] - lo[1])) * sy
    x = (lo[2] + np.arange(hi[2] - lo[2])) * sx

    def fraction(center: np.ndarray, radius: float, amp_scale: float, fuzz_mm: float) -> np.ndarray:
        dz = (z - center[0]).astype(F32)[:, :, None, None]
        dy = (y - center[1]).astype(F32)[None, None, :, None]
        dx = (x - center[2]).astype(F32)[None, None, None, :]
        rho = np.sqrt(dz * dz + dy * dy + dx * dx) + F32(1e-6)
        uz, uy, ux = dz / rho, dy / rho, dx / rho
        r = np.full(rho.shape, F32(radius))
        for v, a, f, p in zip(shape.lobe_dirs, shape.lobe_amp, shape.lobe_freq, shape.lobe_phase):
            r += F32(radius * a * amp_scale) * np.cos(F32(np.pi * f) * (uz * F32(v[0]) + uy * F32(v[1]) + ux * F32(v[2])) + F32(p))
        width = np.abs(uz) * F32(sz / n_sub_z) + np.abs(uy) * F32(sy) + np.abs(ux) * F32(sx) + F32(fuzz_mm)
        occ = np.clip(F32(0.5) - (rho - r) / width, 0.0, 1.0)
        return occ.mean(axis=0)

    outer = fraction(shape.center_mm, shape.radius_mm, 1.0, shape.fuzz_mm)
    if len(shape.spicules):
        caps = Capsules(
            shape.spicules.start_zyx_mm + shape.center_mm - lo * spacing,
            shape.spicules.end_zyx_mm + shape.center_mm - lo * spacing,
            shape.spicules.start_radius_mm,
            shape.spicules.end_radius_mm,
        )
        render_capsules(caps, tuple(int(v) for v in hi - lo), tuple(spacing), n_sub_z=n_sub_z, out=outer)
    core = np.zeros_like(outer)
    if shape.core_offset_mm is not None and shape.core_radius_mm > 0:
        # The solid part is more irregular than its halo (its own lobes, twice as deep).
        core = fraction(shape.center_mm + shape.core_offset_mm, shape.core_radius_mm, 2.0, 0.0)
    return outer, core


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (a nodule's internal texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(F32), sigma_mm / spacing, mode="reflect")
    std = float(field.std())
    return field / F32(std if std > 0 else 1.0)


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Unit-std Gaussian noise blurred in-plane by ``sigma_px``: the grain of a CT reconstruction kernel."""
    noise = rng.standard_normal(shape, dtype=F32)
    if sigma_px > 0:
        ndimage.gaussian_filter(noise, (0.0, sigma_px, sigma_px), output=noise, mode="reflect")
        # Exact std of the blurred white noise = L2 norm of the discrete kernel (2-D, separable).
        delta = np.zeros((1, 31, 31), F32)
        delta[0, 15, 15] = 1.0
        noise /= F32(np.sqrt((ndimage.gaussian_filter(delta, (0.0, sigma_px, sigma_px)) ** 2).sum()))
    return noise


@dataclass(frozen=True)
class VesselSites:
    """Where a juxta-vascular nodule may attach: points (index-aligned mm), axis (unit, or 0 if unknown), radius."""

    points_mm: np.ndarray
    axes: np.ndarray
    radii_mm: np.ndarray

    @classmethod
    def from_capsules(cls, caps: Capsules, rng: np.random.Generator, radius_range_mm: tuple[float, float] = (0.8, 3.0)) -> "VesselSites":
        mid_r = 0.5 * (caps.start_radius_mm + caps.end_radius_mm)
        keep = np.flatnonzero((mid_r >= radius_range_mm[0]) & (mid_r <= radius_range_mm[1]))
        t = rng.uniform(0.2, 0.8, len(keep))
        p0, p1 = caps.start_zyx_mm[keep], caps.end_zyx_mm[keep]
        axis = p1 - p0
        axis /= np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-9)
        r = caps.start_radius_mm[keep] + t * (caps.end_radius_mm[keep] - caps.start_radius_mm[keep])
        return cls(p0 + t[:, None] * (p1 - p0), axis, r)


def _inside(mask: np.ndarray, pts_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    idx = np.round(np.asarray(pts_mm) / spacing).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=-1)
    out = np.zeros(ok.shape, dtype=bool)
    out[ok] = mask[tuple(idx[ok].T)]
    return out


def _inward_normal(mask: np.ndarray, point_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """Unit vector from ``point_mm`` into the mask, from the mask's 3 mm neighbourhood (None if flat)."""
    dirs = fibonacci_sphere(64)
    weight = _inside(mask, point_mm + 3.0 * dirs, spacing).astype(np.float64) - 0.5
    v = (weight[:, None] * dirs).sum(axis=0)
    norm = np.linalg.norm(v)
    return v / norm if norm > 1.0 else None


def add_nodules(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    instance_mask: np.ndarray,
    spacing_zyx: Sequence[float],
    rng: np.random.Generator,
    kinds: Sequence[str],
    diameter_range_mm: tuple[float, float],
    *,
    vessel_sites: VesselSites,
    background_ok: Callable[[np.ndarray], bool],
    exclusion_mask: np.ndarray | None = None,
    noise_sigma_hu: float = 0.0,
    noise_sigma_px: float = 0.7,
    max_attempts: int = 400,
    ground_glass_style: str = "classic",
) -> list[dict[str, Any]]:
    """Place one nodule per entry of ``kinds`` into ``hu`` (float32, in place) and label it in ``instance_mask``.

    Labels continue after the largest label already in ``instance_mask``. Each nodule lies inside
    ``lung_mask``, keeps 2 mm from every other nodule and 3 mm from ``exclusion_mask``, and (except
    juxta-vascular ones, which are meant to touch one) has a centre where ``background_ok`` (index-mm
    point -> bool) says the lung is plain parenchyma. Returns per nodule ``{"id", "kind", "margin",
    "volume_mm3", "solid_diameter_mm"}``; a :class:`RuntimeError` says how many could not be placed.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    shape = hu.shape
    lung_idx = np.flatnonzero(lung_mask)
    if len(lung_idx) == 0:
        raise RuntimeError("the lung mask is empty")
    sphere = fibonacci_sphere(96)
    n_sub = max(1, int(np.ceil(spacing[0] / (1.5 * 0.5 * (spacing[1] + spacing[2])))))
    voxel_mm3 = float(np.prod(spacing))
    placed: list[tuple[np.ndarray, float]] = []
    records: list[dict[str, Any]] = []
    next_label = int(instance_mask.max()) + 1
    for kind in kinds:
        shape_ok = None
        for attempt in range(max_attempts):
            # Shrink the wish after many failures: a small lung may not hold a 30 mm nodule.
            shrink = 0.85 ** (attempt // 100)
            diameter = max(sample_diameter(rng, kind, diameter_range_mm, ground_glass_style) * shrink,
                           diameter_range_mm[0])
            candidate = sample_shape(rng, kind, diameter, ground_glass_style)
            center = _propose_center(rng, kind, candidate, lung_mask, lung_idx, spacing, vessel_sites)
            if center is None:
                continue
            cand = candidate.moved(center)
            if not _fits(cand, lung_mask, spacing, sphere, placed, exclusion_mask, background_ok):
                continue
            shape_ok = cand
            break
        if shape_ok is None:
            raise RuntimeError(f"placed {len(records)} of {len(kinds)} nodules; no room for a {kind} nodule in the lung mask")
        lo, hi = _box_for(shape_ok.center_mm, shape_ok.reach_mm, spacing, shape)
        outer, core = render_shape(shape_ok, lo, hi, spacing, n_sub)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        lung_box = lung_mask[box]
        outer_in = outer * lung_box
        target = shape_ok.outer_hu + shape_ok.texture_hu * _smooth_noise(rng, outer.shape, spacing, 1.5)
        region = hu[box]
        gain = outer_in * np.maximum(target - region, 0.0)
        if shape_ok.core_offset_mm is not None:
            blended = region + gain
            core_in = core * lung_box
            gain += core_in * np.maximum(shape_ok.core_hu + 8.0 * _smooth_noise(rng, outer.shape, spacing, 1.0) - blended, 0.0)
        if noise_sigma_hu > 0:
            # The blend replaced a fraction f of the scan's own noise; put back noise of weight
            # sqrt(f (2 - f)) so the total variance stays sigma^2 (independent parts add).
            f = np.clip(gain / np.maximum(np.abs(target - region), 1.0), 0.0, 1.0)
            gain += np.sqrt(f * (2.0 - f)) * F32(noise_sigma_hu) * correlated_noise(rng, outer.shape, noise_sigma_px)
        region += gain.astype(F32)
        free = instance_mask[box] == 0
        label_here = (outer_in >= _volume_preserving_level(outer_in * free)) & free
        instance_mask[box][label_here] = next_label
        placed.append((shape_ok.center_mm, shape_ok.reach_mm))
        records.append(
            {
                "id": next_label,
                "kind": kind,
                "margin": shape_ok.margin,
                "volume_mm3": float(outer_in.sum()) * voxel_mm3,
                "solid_diameter_mm": (
                    float(2.0 * (3.0 * float((core * lung_box).sum()) * voxel_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0))
                    if shape_ok.core_offset_mm is not None else None
                ),
            }
        )
        next_label += 1
    return records


def _volume_preserving_level(fraction: np.ndarray) -> float:
    """The occupancy level whose iso-surface holds the same volume as the partial-volume shape.

    Thresholding at 0.5 loses volume on small convex blobs (the 0.5 level of a blurred sphere lies
    inside its surface: a 5 mm nodule on 2.5 mm slices loses ~15 % of its diameter). Taking the ``k``
    most occupied voxels, ``k = round(sum of fractions)``, keeps the mask's volume equal to the nodule's
    to within a voxel. Clamped to [0.3, 0.7] so a mask never grows a halo or shrinks to its core.
    """
    k = int(round(float(fraction.sum())))
    values = fraction[fraction > 0].ravel()
    if k < 1 or values.size == 0:
        return 0.5
    k = min(k, values.size)
    level = float(np.partition(values, values.size - k)[values.size - k])
    return min(max(level, 0.3), 0.7)


def _propose_center(
    rng: np.random.Generator,
    kind: str,
    shape: NoduleShape,
    lung_mask: np.ndarray,
    lung_idx: np.ndarray,
    spacing: np.ndarray,
    vessel_sites: VesselSites,
) -> np.ndarray | None:
    if kind == "juxta_vascular":
        if len(vessel_sites.points_mm) == 0:
            return None
        i = int(rng.integers(len(vessel_sites.points_mm)))
        axis = vessel_sites.axes[i]
        u = _unit(rng, 1)[0]
        if np.linalg.norm(axis) > 0:
            u = u - (u @ axis) * axis
            u /= max(np.linalg.norm(u), 1e-9)
        # Surface to vessel axis: R + 0.2 r, so the nodule overlaps the vessel wall slightly.
        return vessel_sites.points_mm[i] + u * (shape.radius_mm + 0.2 * vessel_sites.radii_mm[i])
    start = np.array(np.unravel_index(lung_idx[rng.integers(len(lung_idx))], lung_mask.shape), dtype=np.float64)
    start = (start + rng.uniform(-0.5, 0.5, 3)) * spacing
    if kind != "juxta_pleural":
        return start
    # Walk in a mostly horizontal direction to the pleura, then step back in along the wall's normal.
    d = np.array([rng.normal(0.0, 0.25), *rng.standard_normal(2)])
    d /= np.linalg.norm(d)
    step = 0.5 * float(spacing.min())
    n_steps = int(400.0 / step)
    path = start + np.arange(1, n_steps)[:, None] * step * d
    inside = _inside(lung_mask, path, spacing)
    # The wall is where 4 mm in a row are outside the mask: thinner gaps are vessels or airways that a
    # threshold-made lung mask leaves out.
    run = int(np.ceil(4.0 / step))
    outside_run = np.convolve((~inside).astype(np.int32), np.ones(run, np.int32), mode="valid") == run
    hits = np.flatnonzero(outside_run)
    if len(hits) == 0:
        return None
    boundary = path[hits[0] - 1] if hits[0] > 0 else start
    normal = _inward_normal(lung_mask, boundary, spacing)
    if normal is None:
        return None
    return boundary + normal * 0.6 * shape.radius_mm


def _fits(
    shape: NoduleShape,
    lung_mask: np.ndarray,
    spacing: np.ndarray,
    sphere: np.ndarray,
    placed: list[tuple[np.ndarray, float]],
    exclusion_mask: np.ndarray | None,
    background_ok: Callable[[np.ndarray], bool],
) -> bool:
    c, reach = shape.center_mm, shape.reach_mm
    if not _inside(lung_mask, c[None], spacing)[0]:
        return False
    for other_c, other_reach in placed:
        if np.linalg.norm(c - other_c) < reach + other_reach + 2.0:
            return False
    body = c + sphere * shape.radius_mm * (1.0 + float(np.abs(shape.lobe_amp).sum()))
    inside = _inside(lung_mask, body, spacing)
    if shape.kind == "juxta_pleural":
        # Mostly in the lung, and touching its edge: where the nodule leaves the lung, 4 mm further out
        # is still not lung (a wall, not a vessel crossing a threshold-made mask).
        if inside.mean() < 0.55 or inside.all():
            return False
        out_dirs = sphere[~inside]
        wall = ~_inside(lung_mask, c + out_dirs * (shape.radius_mm * (1.0 + float(np.abs(shape.lobe_amp).sum())) + 4.0), spacing)
        if wall.mean() < 0.8:
            return False
    elif shape.kind == "juxta_vascular":
        # The vessel it touches may be a hole in the lung mask (masks made by thresholding air).
        if _inside(lung_mask, c + sphere * (reach + 1.5), spacing).mean() < 0.85:
            return False
    elif not _inside(lung_mask, c + sphere * (reach + 1.5), spacing).all():
        return False
    if shape.kind != "juxta_vascular" and not background_ok(c):
        return False
    if exclusion_mask is not None:
        lo, hi = _box_for(c, reach + 3.0, spacing, exclusion_mask.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        ex = exclusion_mask[box]
        if ex.any():
            zz, yy, xx = np.nonzero(ex)
            pts = (np.stack([zz, yy, xx], axis=1) + lo) * spacing
            if (np.linalg.norm(pts - c, axis=1) < reach + 3.0).any():
                return False
    return True


def describe_nodules(image: np.ndarray, instance_mask: np.ndarray, geometry: Geometry, extras: list[dict[str, Any]]) -> list[PhantomNodule]:
    """Records of every labelled nodule, measured on the final arrays (independent of how they were drawn).

    ``extras`` holds per id what the mask cannot tell (kind, margin, partial-volume volume).
    """
    spacing = np.asarray(geometry.spacing_zyx)
    voxel_mm3 = float(np.prod(spacing))
    idx = np.flatnonzero(instance_mask)
    labels = instance_mask.reshape(-1)[idx].astype(np.int64)
    coords = np.stack(np.unravel_index(idx, instance_mask.shape), axis=1).astype(np.float64)
    n_labels = int(labels.max()) + 1 if len(labels) else 1
    counts = np.bincount(labels, minlength=n_labels)
    sums = np.stack([np.bincount(labels, coords[:, a], minlength=n_labels) for a in range(3)], axis=1)
    hu_sums = np.bincount(labels, image.reshape(-1)[idx].astype(np.float64), minlength=n_labels)
    boxes = ndimage.find_objects(instance_mask)
    out: list[PhantomNodule] = []
    for extra in extras:
        i = int(extra["id"])
        if i >= n_labels or counts[i] == 0:
            continue  # a nodule with no voxel at half occupancy (cannot happen above 3 mm; kept safe)
        center = sums[i] / counts[i]
        world = geometry.voxel_to_world(center)
        box = boxes[i - 1]
        volume = float(extra.get("volume_mm3", counts[i] * voxel_mm3))
        out.append(
            PhantomNodule(
                id=i,
                kind=str(extra["kind"]),
                center_world_xyz_mm=tuple(float(v) for v in world),
                center_zyx=tuple(float(v) for v in center),
                diameter_mm=float(2.0 * (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)),
                volume_mm3=volume,
                box_zyx=(box[0].start, box[1].start, box[2].start, box[0].stop, box[1].stop, box[2].stop),
                mean_hu=float(hu_sums[i] / counts[i]),
                margin=str(extra.get("margin", "smooth")),
                solid_diameter_mm=extra.get("solid_diameter_mm"),
            )
        )
    return out
