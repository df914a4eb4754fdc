"""Chest anatomy for the phantom: body wall, ribs, spine, sternum, mediastinum, heart, great vessels,
diaphragm and abdomen, two lungs with textured parenchyma, airways and pulmonary vessel trees.

Conventions: arrays are ``(z, y, x)``; positions are *grid millimetres* ``(z, y, x)`` = index times spacing,
in a patient-aligned grid: x grows to the patient's left, y to the back (posterior), z to the head (LPS,
identity direction). The caller maps the grid to the patient and flips axes if asked.

Partial volume: every analytic surface ``F(p) = 0`` (``F < 0`` inside) is drawn as the first-order box
integral over the voxel, ``clip(0.5 - F / sum_i |dF/dp_i| * spacing_i, 0, 1)``: a linear ramp exactly
one voxel wide measured along the surface normal, so oblique surfaces blur over thick slices as in a
real scan. Tubes (vessels, airways) are drawn by :mod:`phantom_tubes` with sub-slice sampling.

HU values are those of non-contrast chest CT: air -1000, lung parenchyma ~-860 (denser at the back,
where gravity puts blood), fat -100, muscle/blood ~+40, liver ~+60, cancellous bone ~+250, cortex ~+800.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from .phantom_tubes import Capsules, TubeTree, beside_tree, capsule_bounds, grow_tree, render_capsules

F32 = np.float32

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -85.0
HU_MUSCLE = 45.0
HU_BLOOD = 40.0
HU_LIVER = 60.0
HU_ABDOMEN = 35.0
HU_LUNG = -865.0
HU_CANCELLOUS = 230.0
HU_CORTEX = 750.0
HU_CARTILAGE = 120.0
HU_DISC = 80.0
HU_TABLE = 150.0


@dataclass(frozen=True)
class Grid:
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]

    def axis_mm(self, axis: int) -> np.ndarray:
        return (np.arange(self.shape_zyx[axis]) * self.spacing_zyx[axis]).astype(np.float64)


@dataclass(frozen=True)
class Anatomy:
    """The rendered canonical-grid anatomy (before nodules and noise)."""

    hu: np.ndarray  # float32 (z, y, x)
    lung_fraction: np.ndarray  # float32 0..1, partial-volume lung
    lung_side: np.ndarray  # uint8 (z, y, x): 1 right lung, 2 left lung, 0 elsewhere (where lung_fraction >= 0.5)
    vessel_fraction: np.ndarray  # float32 0..1, pulmonary vessels inside the lungs
    vessels: Capsules  # pulmonary vessel segments (grid mm), for juxta-vascular nodules
    params: dict[str, float]


def soft_inside(f: np.ndarray, grad_norm_weighted: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of ``F < 0`` given ``F`` and ``sum_i |dF/dp_i| * spacing_i`` (same shape)."""
    out = F32(0.5) - f / np.maximum(grad_norm_weighted, F32(1e-6))
    return np.clip(out, 0.0, 1.0, out=out).astype(F32, copy=False)


def _ellipse_fraction(dx: np.ndarray, dy: np.ndarray, a: float, b: float, sy: float, sx: float) -> np.ndarray:
    """In-plane partial-volume fraction of the ellipse ``(dx/a)^2 + (dy/b)^2 < 1`` (broadcasting)."""
    f = (dx / a) ** 2 + (dy / b) ** 2 - 1.0
    g = 2.0 * (np.abs(dx) / a**2 * sx + np.abs(dy) / b**2 * sy)
    return soft_inside(f.astype(F32), g.astype(F32))


def _mix(hu: np.ndarray, fraction: np.ndarray, value: float | np.ndarray) -> None:
    """In place: ``hu = hu * (1 - f) + value * f`` (the mean attenuation of a partly filled voxel)."""
    delta = np.asarray(value, dtype=F32) - hu
    delta *= fraction
    hu += delta


@dataclass(frozen=True)
class Torso:
    """Anatomy parameters of one phantom, in grid mm (sampled per seed)."""

    cx: float
    cy: float
    ax: float  # body half-width (x)
    ay: float  # body half-depth (y)
    fat: float
    cav_a: float  # thoracic cavity (inside the ribs) half-width
    cav_b: float
    cav_cy: float
    rib_gap: float
    rib_hr: float  # rib half-thickness, radial
    rib_hz: float  # rib half-height, z
    rib_pitch: float
    rib_drop: float
    rib_z0: float
    z_low: float  # lowest lung point (posterior costophrenic recess)
    z_apex: float
    lung_height: float
    dome_right: float
    dome_left: float
    heart: tuple[float, float, float, float, float, float]  # z, y, x centre, semi-axes c, b, a
    med_half_width: float
    spine_y: float
    spine_r: float
    canal_r: float
    vert_pitch: float
    hilum_z: float
    aorta_r: float
    trachea_r: float
    table_y: float | None
    stomach_bubble: bool
    taper_a: float  # how much the rib cage narrows towards the apex (fraction of cav_a)
    taper_b: float
    heart_angle: float  # in-plane rotation of the heart's long axis (radians, towards the left front)

    @property
    def scale(self) -> float:
        return self.ax / 170.0

    def cavity_scale(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Factors on (cav_a, cav_b) at heights ``z``: 1 in the lower chest, narrowing towards the apex."""
        lo, hi = self.z_low + 0.45 * self.lung_height, self.z_apex + 0.1 * self.lung_height
        u = np.clip((np.asarray(z, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        smooth = u * u * (3.0 - 2.0 * u)
        return 1.0 - self.taper_a * smooth, 1.0 - self.taper_b * smooth


def sample_torso(rng: np.random.Generator, grid: Grid, body_fill: float, table: bool) -> Torso:
    """Draw one patient's proportions so the body fills ``body_fill`` of the in-plane field of view."""
    nz, ny, nx = grid.shape_zyx
    sz, sy, sx = grid.spacing_zyx
    fov_x, fov_y, ext_z = nx * sx, ny * sy, nz * sz
    ax = 0.5 * body_fill * fov_x * rng.uniform(0.94, 1.0)
    ay = min(ax * rng.uniform(0.64, 0.74), 0.5 * fov_y * 0.85)
    s = ax / 170.0
    wall = max(s, 0.45) ** 0.7  # wall layers shrink slower than the body (a child's ribs are not 4x thinner)
    cx = 0.5 * fov_x + rng.uniform(-0.03, 0.03) * fov_x
    cy = 0.5 * fov_y - 0.04 * fov_y + rng.uniform(-0.02, 0.02) * fov_y
    fat = rng.uniform(5.0, 16.0) * wall
    muscle_front = rng.uniform(6.0, 12.0) * wall
    muscle_back = rng.uniform(18.0, 28.0) * wall
    muscle_side = rng.uniform(4.0, 8.0) * wall
    rib_hr, rib_hz = 3.2 * wall, 5.0 * wall
    cav_front = cy - ay + fat + muscle_front
    cav_back = cy + ay - fat - muscle_back
    cav_b = 0.5 * (cav_back - cav_front)
    cav_cy = 0.5 * (cav_back + cav_front)
    cav_a = ax - fat - muscle_side - 2 * rib_hr
    lung_height = min(rng.uniform(1.45, 1.7) * ax, 0.8 * ext_z)
    z_low = rng.uniform(0.05, 0.12) * ext_z
    z_apex = min(z_low + lung_height, ext_z - 0.06 * ext_z)
    lung_height = z_apex - z_low
    dome_right = rng.uniform(0.22, 0.28) * lung_height
    dome_left = dome_right - rng.uniform(0.03, 0.08) * lung_height
    heart_c = rng.uniform(0.18, 0.21) * lung_height
    heart_b = rng.uniform(0.5, 0.58) * cav_b
    heart_a = rng.uniform(0.46, 0.52) * cav_a
    heart = (
        z_low + dome_left + 0.8 * heart_c,
        cav_front + heart_b * rng.uniform(1.05, 1.2),
        cx + rng.uniform(0.12, 0.18) * cav_a,
        heart_c,
        heart_b,
        heart_a,
    )
    spine_r = rng.uniform(16.0, 20.0) * wall
    spine_y = cav_back - 0.35 * spine_r
    return Torso(
        cx=cx, cy=cy, ax=ax, ay=ay, fat=fat, cav_a=cav_a, cav_b=cav_b, cav_cy=cav_cy,
        rib_gap=1.5 * wall, rib_hr=rib_hr, rib_hz=rib_hz,
        rib_pitch=rng.uniform(0.17, 0.2) * lung_height, rib_drop=rng.uniform(0.5, 0.7) * lung_height,
        rib_z0=z_low + rng.uniform(0.0, 0.1) * lung_height,
        z_low=z_low, z_apex=z_apex, lung_height=lung_height, dome_right=dome_right, dome_left=dome_left,
        heart=heart, med_half_width=rng.uniform(0.1, 0.13) * cav_a,
        spine_y=spine_y, spine_r=spine_r, canal_r=0.45 * spine_r, vert_pitch=1.25 * spine_r,
        hilum_z=z_low + rng.uniform(0.52, 0.6) * lung_height,
        aorta_r=rng.uniform(10.0, 13.0) * wall, trachea_r=rng.uniform(7.0, 9.0) * wall,
        table_y=(cy + ay + rng.uniform(3.0, 12.0)) if table else None,
        stomach_bubble=bool(rng.uniform() < 0.6),
        taper_a=rng.uniform(0.22, 0.3), taper_b=rng.uniform(0.08, 0.14), heart_angle=rng.uniform(0.25, 0.5),
    )


def _diaphragm_z(t: Torso, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Height of the diaphragm under each (y, x) and its slopes: two domes, right one higher, lower at the back."""
    right = x < t.cx
    xc = np.where(right, t.cx - 0.5 * t.cav_a, t.cx + 0.5 * t.cav_a)
    dome = np.where(right, t.dome_right, t.dome_left)
    u = (x - xc) / (0.62 * t.cav_a)
    v = (y - (t.cav_cy - 0.1 * t.cav_b)) / (1.05 * t.cav_b)
    r2 = u * u + v * v
    inside = r2 < 1.0
    r2 = np.minimum(r2, 1.0)
    # cap = 1 - r^3: flat on top, steep at the costophrenic angle, like a real dome in a coronal view.
    cap = 1.0 - r2**1.5
    back_slope = 0.08 * t.lung_height / t.cav_b
    z = t.z_low + dome * cap - back_slope * (y - t.cav_cy) + 0.08 * t.lung_height
    dcap = np.where(inside, -3.0 * np.sqrt(r2), 0.0)
    dz_dx = dome * dcap * u / (0.62 * t.cav_a)
    dz_dy = dome * dcap * v / (1.05 * t.cav_b) - back_slope
    return z, dz_dy, dz_dx


def _lung_fraction(t: Torso, grid: Grid, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Partial-volume lung fraction on the (z, y, x) sub-grid given by the 1-D coordinate vectors."""
    sz, sy, sx = grid.spacing_zyx
    z, y, x = z.astype(F32), y.astype(F32), x.astype(F32)
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    # Each lung: an elliptic section against the (tapering) cavity wall, capped by a half-ellipsoid apex.
    ka, kb = (k.astype(F32)[:, None, None] for k in t.cavity_scale(z))
    cav_a = F32(t.cav_a) * ka
    la = F32(0.5 * 0.99) * cav_a
    shoulder = t.z_apex - 0.32 * t.lung_height
    hc = F32(t.z_apex - shoulder)
    right = (x < t.cx)[None, None, :]
    xl = np.where(right, F32(t.cx) - cav_a + la, F32(t.cx) + cav_a - la)
    dzc = np.clip(Z - F32(shoulder), F32(0.0), None)
    cav_b, cav_cy = F32(t.cav_b) * kb, F32(t.cav_cy)
    f = ((X - xl) / la) ** 2 + ((Y - cav_cy) / cav_b) ** 2 + (dzc / hc) ** 2 - F32(1.0)
    g = F32(2.0) * (np.abs(X - xl) / la**2 * F32(sx) + np.abs(Y - cav_cy) / cav_b**2 * F32(sy) + dzc / hc**2 * F32(sz))
    frac = soft_inside(f, g)
    # Above the diaphragm.
    zd, dzdy, dzdx = _diaphragm_z(t, y[:, None], x[None, :])
    w = (sz + np.abs(dzdy) * sy + np.abs(dzdx) * sx).astype(F32)
    np.minimum(frac, soft_inside(zd.astype(F32)[None] - Z, w[None]), out=frac)
    # Minus the heart.
    np.minimum(frac, 1.0 - _heart_fraction(t, grid, z, y, x, grow_mm=2.0), out=frac)
    # Minus the mediastinum: a midline band, wider at the back where aorta, oesophagus and spine sit.
    depth = np.clip((y - (t.cav_cy - t.cav_b)) / (2 * t.cav_b), 0.0, 1.0)
    half = t.med_half_width * (0.6 + 0.9 * depth)
    band_f = np.abs(x[None, :] - t.cx - 0.1 * t.med_half_width) - half[:, None]
    band = soft_inside(band_f.astype(F32), np.full(band_f.shape, sx, F32))
    np.minimum(frac, 1.0 - band[None], out=frac)
    # Minus the spine (with a rim of paravertebral tissue).
    spine = _ellipse_fraction(x[None, :] - t.cx, y[:, None] - t.spine_y, 1.25 * t.spine_r, 1.4 * t.spine_r, sy, sx)
    np.minimum(frac, 1.0 - spine[None], out=frac)
    return frac


def _heart_fraction(t: Torso, grid: Grid, z: np.ndarray, y: np.ndarray, x: np.ndarray, grow_mm: float = 0.0) -> np.ndarray:
    """Partial-volume heart (an ellipsoid) on the sub-grid of coordinate vectors; computed in its box only."""
    hz, hy, hx, c, b, a = t.heart
    semi = (c + grow_mm, b + grow_mm, a + grow_mm)
    out = np.zeros((len(z), len(y), len(x)), F32)
    local = []
    reach = (semi[0], max(semi[1:]), max(semi[1:]))
    for coord, centre, half in zip((z, y, x), (hz, hy, hx), reach):
        inside = np.flatnonzero(np.abs(coord - centre) < half + 3.0)
        if len(inside) == 0:
            return out
        local.append(slice(inside[0], inside[-1] + 1))
    dz, dy, dx = ((coord[sl] - centre).astype(F32) for coord, sl, centre in zip((z, y, x), local, (hz, hy, hx)))
    dz, dy0, dx0 = dz[:, None, None], dy[:, None], dx[None, :]
    # The long axis points to the patient's left and front (rotation in the axial plane).
    cos, sin = F32(np.cos(t.heart_angle)), F32(np.sin(t.heart_angle))
    du, dv = (dx0 * cos - dy0 * sin)[None], (dx0 * sin + dy0 * cos)[None]
    c, b, a = (F32(v) for v in semi)
    sz, sy, sx = (F32(v) for v in grid.spacing_zyx)
    f = (dz / c) ** 2 + (dv / b) ** 2 + (du / a) ** 2 - F32(1.0)
    # |dF/dx| and |dF/dy| through the rotation.
    gu, gv = du / a**2, dv / b**2
    g = F32(2.0) * (np.abs(dz) / c**2 * sz + np.abs(gu * cos + gv * sin) * sx + np.abs(-gu * sin + gv * cos) * sy)
    out[tuple(local)] = soft_inside(f, g)
    return out


def _mediastinal_tubes(t: Torso, ext_z: float) -> tuple[Capsules, Capsules]:
    """Great vessels and oesophagus (soft tissue in fat), and the trachea + main bronchi centreline."""
    hz, hy, hx, hc, hb, ha = t.heart
    r = t.aorta_r
    top = ext_z + 5.0
    arch_z = t.hilum_z + 0.2 * t.lung_height
    desc_x, desc_y = t.cx + t.spine_r + 0.8 * r, t.spine_y - 0.55 * t.spine_r
    asc_x, asc_y = t.cx + 0.05 * t.cav_a, hy - 0.25 * hb
    aorta = Capsules.from_polyline(
        np.array([[hz + 0.5 * hc, asc_y, asc_x], [arch_z - r, asc_y - 0.1 * r, asc_x - 0.3 * r],
                  [arch_z + 0.4 * r, 0.5 * (asc_y + desc_y), 0.5 * (asc_x + desc_x)],
                  [arch_z - r, desc_y, desc_x], [-20.0, desc_y, desc_x]]),
        np.array([r, r, r, 0.92 * r, 0.85 * r]),
    )
    svc_x = asc_x - 1.9 * r
    svc = Capsules.from_polyline(np.array([[top, asc_y - 0.3 * r, svc_x], [hz + 0.6 * hc, asc_y, svc_x]]), np.full(2, 0.75 * r))
    oes_r = 0.45 * t.trachea_r + 2.0
    oes_y = t.spine_y - t.spine_r - oes_r - 1.0
    oesophagus = Capsules.from_polyline(np.array([[top, oes_y, t.cx + 2.0], [-20.0, oes_y, t.cx + 0.2 * t.cav_a]]), np.full(2, oes_r))
    # Pulmonary trunk: from the front of the heart up and back to its bifurcation under the arch.
    trunk_top = np.array([t.hilum_z + 0.04 * t.lung_height, hy - 0.05 * hb, t.cx + 0.08 * t.cav_a])
    trunk = Capsules.from_polyline(np.array([[hz + 0.75 * hc, hy - 0.5 * hb, t.cx + 0.1 * t.cav_a], trunk_top]), np.full(2, 0.85 * r))
    # Right and left pulmonary arteries to the hila; pulmonary veins from the hila to the left atrium.
    hila = hilum_points(t)
    atrium = np.array([hz + 0.3 * hc, hy + 0.75 * hb, hx - 0.2 * ha])
    branches = [Capsules.from_polyline(np.stack([trunk_top, hila[f"{side}_artery"]]), np.array([0.7 * r, 0.55 * r])) for side in ("right", "left")]
    branches += [Capsules.from_polyline(np.stack([hila[f"{side}_vein"], atrium]), np.array([0.45 * r, 0.5 * r])) for side in ("right", "left")]
    soft = Capsules.concat([aorta, svc, oesophagus, trunk, *branches])
    trachea_y = oes_y - oes_r - t.trachea_r - 1.0
    carina = np.array([t.hilum_z + 0.08 * t.lung_height, trachea_y + 0.3 * t.trachea_r, t.cx])
    trachea = Capsules.from_polyline(np.array([[top, trachea_y, t.cx], carina]), np.full(2, t.trachea_r))
    return soft, trachea


def hilum_points(t: Torso) -> dict[str, np.ndarray]:
    """Where each lung's artery tree, vein tree and main bronchus enter (grid mm, z y x)."""
    out = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        x = t.cx + sign * (t.med_half_width * 1.6 + 0.12 * t.cav_a)
        out[f"{side}_artery"] = np.array([t.hilum_z, t.cav_cy - 0.05 * t.cav_b, x])
        out[f"{side}_vein"] = np.array([t.hilum_z - 0.12 * t.lung_height, t.cav_cy - 0.12 * t.cav_b, x + sign * 0.03 * t.cav_a])
    return out


def _spine_and_ribs(t: Torso, grid: Grid, hu: np.ndarray) -> None:
    nz, ny, nx = grid.shape_zyx
    sz, sy, sx = grid.spacing_zyx
    z, y, x = grid.axis_mm(0), grid.axis_mm(1), grid.axis_mm(2)
    # Vertebrae: body (cortex + cancellous core), canal, arch, spinous and transverse processes; discs in z.
    dx, dy = x[None, :] - t.cx, y[:, None] - t.spine_y
    body = _ellipse_fraction(dx, dy, t.spine_r, 0.9 * t.spine_r, sy, sx)
    core = _ellipse_fraction(dx, dy, t.spine_r - 1.5, 0.9 * t.spine_r - 1.5, sy, sx)
    canal_y = t.spine_y + 0.9 * t.spine_r + t.canal_r + 0.8
    arch = _ellipse_fraction(dx, y[:, None] - canal_y, t.canal_r + 3.5, t.canal_r + 3.0, sy, sx)
    canal = _ellipse_fraction(dx, y[:, None] - canal_y, t.canal_r, t.canal_r, sy, sx)
    spinous = _ellipse_fraction(dx, y[:, None] - (canal_y + t.canal_r + 0.9 * t.spine_r), 0.2 * t.spine_r, 1.0 * t.spine_r, sy, sx)
    transverse = _ellipse_fraction(np.abs(dx) - 1.1 * t.spine_r, y[:, None] - canal_y + 0.2 * t.canal_r, 0.9 * t.spine_r, 0.25 * t.spine_r, sy, sx)
    posterior = np.maximum(np.maximum(arch, spinous), transverse)
    phase = ((z - t.z_low) / t.vert_pitch) % 1.0
    disc_half = 0.12
    disc = np.clip((np.abs(phase - 0.5) - (0.5 - disc_half)) * t.vert_pitch / sz + 0.5, 0.0, 1.0).astype(F32)
    rows = np.flatnonzero((body + posterior).max(axis=1) > 0)
    cols = np.flatnonzero((body + posterior).max(axis=0) > 0)
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    sub = hu[:, ys, xs]
    bone_body = (HU_CORTEX + (core * (HU_CANCELLOUS - HU_CORTEX)))[ys, xs][None]
    body_val = bone_body + disc[:, None, None] * (HU_DISC - bone_body)
    _mix(sub, np.broadcast_to(body[ys, xs][None], sub.shape), body_val)
    post = (posterior * (1.0 - canal))[ys, xs][None] * (1.0 - 0.7 * disc[:, None, None])
    _mix(sub, post.astype(F32), HU_CORTEX * 0.6 + HU_CANCELLOUS * 0.4)
    _mix(sub, np.broadcast_to(canal[ys, xs][None], sub.shape), 25.0)
    # Ribs: an elliptic ring just outside the cavity; each rib slopes down from back to front.
    # The ring follows the cavity, which narrows towards the apex.
    ka, kb = t.cavity_scale(z)
    ring_a = t.cav_a * ka + t.rib_gap + t.rib_hr
    ring_b = t.cav_b * kb + t.rib_gap + t.rib_hr
    Y, X = np.meshgrid(y - t.cav_cy, x - t.cx, indexing="ij")
    rho_outer = np.sqrt((X / (ring_a.max() + t.rib_hr + 2.0)) ** 2 + (Y / (ring_b.max() + t.rib_hr + 2.0)) ** 2)
    rho_inner = np.sqrt((X / (ring_a.min() - t.rib_hr - 2.0)) ** 2 + (Y / (ring_b.min() - t.rib_hr - 2.0)) ** 2)
    theta = np.arctan2(Y / ring_b.max(), X / ring_a.max())
    front = (1.0 - np.sin(theta)) / 2.0  # 0 at the spine, 1 at the sternum
    band = (rho_outer < 1.0) & (rho_inner > 1.0) & (front < 0.93) & (np.abs(X) > 1.3 * t.spine_r)
    by, bx = np.nonzero(band)
    fr, th = front[band], theta[band]
    xb_, yb_ = X[band][None, :], Y[band][None, :]
    ra, rb = ring_a[:, None], ring_b[:, None]
    rho2 = (xb_ / ra) ** 2 + (yb_ / rb) ** 2
    gnorm = 2.0 * np.sqrt((xb_ / ra**2) ** 2 + (yb_ / rb**2) ** 2)
    r_b = (rho2 - 1.0) / np.maximum(gnorm, 1e-6)  # signed in-plane distance to the rib ring (mm), (z, pixel)
    zr = z[:, None] + t.rib_drop * fr[None, :]  # a rib's height drops towards the front
    u = (zr - t.rib_z0) / t.rib_pitch
    k = np.round(u)
    dz = (u - k) * t.rib_pitch
    # Slope of a rib along the arc, so the in-plane edge of an obliquely cut rib gets its ramp too.
    arc_slope = t.rib_drop * np.abs(np.cos(th)) / (2.0 * 0.5 * (ring_a.max() + ring_b.max()))
    n_ribs = 12
    valid = (k >= 0) & (k < n_ribs) & ((t.rib_z0 + k * t.rib_pitch) < t.z_apex + 0.05 * t.lung_height)
    cart = fr > 0.78  # costal cartilage towards the sternum
    frac = np.zeros(dz.shape, F32)
    marrow = np.zeros(dz.shape, F32)
    for hr, hz, out in ((t.rib_hr, t.rib_hz, frac), (t.rib_hr - 1.0, t.rib_hz - 1.2, marrow)):
        f = (r_b / hr) ** 2 + (dz / hz) ** 2 - 1.0
        g = 2.0 * (np.abs(r_b) / hr**2 * 0.5 * (sx + sy) + np.abs(dz) / hz**2 * (sz + arc_slope[None] * sx))
        out[...] = soft_inside(f.astype(F32), g.astype(F32)) * valid
    vals = hu[:, by, bx]
    bone = np.where(cart[None], HU_CARTILAGE, HU_CORTEX + marrow * (HU_CANCELLOUS - HU_CORTEX))
    _mix(vals, frac, bone.astype(F32))
    hu[:, by, bx] = vals


def render_torso(t: Torso, grid: Grid) -> tuple[np.ndarray, np.ndarray, Capsules]:
    """Body, bones, mediastinum, abdomen and lungs (plain parenchyma). Returns (hu, lung_fraction, trachea)."""
    nz, ny, nx = grid.shape_zyx
    sz, sy, sx = grid.spacing_zyx
    z, y, x = grid.axis_mm(0), grid.axis_mm(1), grid.axis_mm(2)
    # In-plane layers (the torso is a cylinder in z): air, fat, muscle, cavity.
    dx, dy = x[None, :] - t.cx, y[:, None] - t.cy
    body = _ellipse_fraction(dx, dy, t.ax, t.ay, sy, sx)
    lean = _ellipse_fraction(dx, dy, t.ax - t.fat, t.ay - t.fat, sy, sx)
    cavity = _ellipse_fraction(dx, y[:, None] - t.cav_cy, t.cav_a + 0.5, t.cav_b + 0.5, sy, sx)
    plane = np.full((ny, nx), HU_AIR, F32)
    _mix(plane, body, HU_FAT)
    _mix(plane, lean, HU_MUSCLE)
    if t.table_y is not None:
        # Carbon-fibre table: two thin curved plates with foam between.
        curve = t.table_y + 0.6 * (dx / t.ax) ** 2 * 10.0
        for offset, value in ((0.0, HU_TABLE), (2.0, -900.0), (12.0, HU_TABLE)):
            top = y[:, None] - (curve + offset)
            thick = 1.6 if value == HU_TABLE else 10.0
            slab = np.clip(0.5 + np.minimum(top, thick - top) / sy, 0, 1) * (np.abs(dx) < 1.1 * t.ax)
            _mix(plane, slab.astype(F32), value)
    hu = np.broadcast_to(plane[None], (nz, ny, nx)).copy()
    # Sternum: front midline bone over the upper two thirds of the lungs.
    st = _ellipse_fraction(dx, y[:, None] - (t.cav_cy - t.cav_b - 4.0), 0.16 * t.cav_a, 4.5, sy, sx)
    st_z = ((z > t.z_low + 0.3 * t.lung_height) & (z < t.z_apex + 0.05 * t.lung_height)).astype(F32)
    st_core = _ellipse_fraction(dx, y[:, None] - (t.cav_cy - t.cav_b - 4.0), 0.16 * t.cav_a - 1.2, 3.3, sy, sx)
    sy_rows = np.flatnonzero(st.max(axis=1) > 0)
    sbox = (slice(None), slice(sy_rows[0], sy_rows[-1] + 1))
    _mix(hu[sbox], (st[None] * st_z[:, None, None])[sbox], (HU_CORTEX + st_core * (HU_CANCELLOUS - HU_CORTEX))[None][sbox])
    # Inside the cavity (bounding box only): abdomen below the diaphragm, mediastinal fat above.
    rows = np.flatnonzero(cavity.max(axis=1) > 0)
    cols = np.flatnonzero(cavity.max(axis=0) > 0)
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    yb, xb = y[ys], x[xs]
    ka, kb = t.cavity_scale(z)
    cav3 = _ellipse_fraction(
        (xb[None, None, :] - t.cx).astype(F32), (yb[None, :, None] - t.cav_cy).astype(F32),
        (t.cav_a * ka + 0.5).astype(F32)[:, None, None], (t.cav_b * kb + 0.5).astype(F32)[:, None, None], sy, sx,
    )
    zd, dzdy, dzdx = _diaphragm_z(t, yb[:, None], xb[None, :])
    w = sz + np.abs(dzdy) * sy + np.abs(dzdx) * sx
    above = soft_inside(zd.astype(F32)[None] - z.astype(F32)[:, None, None], w.astype(F32)[None])
    abdomen = np.where(xb[None, :] < t.cx - 0.1 * t.cav_a, HU_LIVER, HU_ABDOMEN).astype(F32)
    inner = np.broadcast_to(abdomen[None], above.shape).copy()
    # Above the diaphragm: mediastinal fat, turning into the muscles and fat of the thoracic inlet above the apices.
    inlet = np.clip((z - (t.z_apex - 0.25 * t.lung_height)) / (0.3 * t.lung_height), 0.0, 0.8).astype(F32)
    _mix(inner, above, (HU_MEDIASTINAL_FAT + inlet * (HU_MUSCLE - 15.0 - HU_MEDIASTINAL_FAT))[:, None, None])
    if t.stomach_bubble:
        # Gas in the stomach fundus, just under the left dome: a classic lung-base look-alike.
        bz = t.z_low + t.dome_left - 12.0
        f = _ellipse_fraction(xb[None, :] - (t.cx + 0.45 * t.cav_a), yb[:, None] - (t.cav_cy - 0.3 * t.cav_b), 22.0 * t.scale + 6, 16.0 * t.scale + 5, sy, sx)
        zf = np.clip(0.5 + (8.0 - np.abs(z - bz)) / sz, 0, 1).astype(F32)
        _mix(inner, f[None] * zf[:, None, None] * (1.0 - above), HU_AIR)
    _mix(inner, _heart_fraction(t, grid, z, yb, xb), HU_BLOOD)
    soft_tubes, trachea = _mediastinal_tubes(t, nz * sz)
    sub_grid_origin = np.array([0.0, yb[0], xb[0]])
    shifted = Capsules(soft_tubes.start_zyx_mm - sub_grid_origin, soft_tubes.end_zyx_mm - sub_grid_origin, soft_tubes.start_radius_mm, soft_tubes.end_radius_mm)
    sub_shape = (nz, len(yb), len(xb))
    n_sub = max(1, int(np.ceil(sz / (1.5 * sx))))
    tubes = render_capsules(shifted, sub_shape, grid.spacing_zyx, n_sub_z=n_sub)
    _mix(inner, tubes, HU_BLOOD)
    grown = Capsules(shifted.start_zyx_mm, shifted.end_zyx_mm, shifted.start_radius_mm + 2.5, shifted.end_radius_mm + 2.5)
    tube_zone = render_capsules(grown, sub_shape, grid.spacing_zyx, n_sub_z=1)
    lung = np.zeros(sub_shape, F32)
    zr = np.flatnonzero((z > t.z_low - 3 * sz) & (z < t.z_apex + 3 * sz))
    lung[zr[0] : zr[-1] + 1] = _lung_fraction(t, grid, z[zr[0] : zr[-1] + 1], yb, xb)
    np.minimum(lung, 1.0 - tube_zone, out=lung)
    np.minimum(lung, cav3, out=lung)
    _mix(inner, lung, HU_LUNG)
    _mix(hu[:, ys, xs], cav3, inner)
    lung_full = np.zeros((nz, ny, nx), F32)
    lung_full[:, ys, xs] = lung
    _spine_and_ribs(t, grid, hu)
    return hu, lung_full, trachea


def _lung_texture(rng: np.random.Generator, grid: Grid, t: Torso, lung_box: tuple[slice, slice, slice]) -> np.ndarray:
    """Smooth density variation of the parenchyma (HU offsets) over ``lung_box``.

    Two octaves of smooth random field (about 12 mm and 5 mm) plus the gravity gradient of a supine
    patient: the back of the lung holds more blood, about +40 HU over the front.
    """
    shape = tuple(s.stop - s.start for s in lung_box)
    field = np.zeros(shape, F32)
    for cell_mm, amplitude in ((12.0, 14.0), (5.0, 6.0)):
        coarse_shape = tuple(max(2, int(np.ceil(n * sp / cell_mm)) + 1) for n, sp in zip(shape, grid.spacing_zyx))
        coarse = rng.standard_normal(coarse_shape).astype(F32) * F32(amplitude)
        # Separable linear interpolation, one axis at a time from the smallest array up: far cheaper
        # than ndimage.zoom on the whole box, and plain element-wise maths (no BLAS, whose summation
        # order may depend on the thread count) so the bytes never depend on the machine's threads.
        for axis in (2, 1, 0):
            coarse = _upsample_linear(coarse, axis, shape[axis])
        field += coarse
    y = grid.axis_mm(1)[lung_box[1]]
    depth = np.clip((y - (t.cav_cy - t.cav_b)) / (2 * t.cav_b), 0.0, 1.0).astype(F32)
    field += (40.0 * depth - 20.0)[None, :, None]
    return field


def _fissures(t: Torso, grid: Grid, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Occupancy of the interlobar fissures (0.5 mm pleural sheets) over ``box``.

    Each lung has an oblique (major) fissure, high at the back and low at the front; the right lung also
    has the horizontal (minor) fissure in front of its hilum. A sheet thinner than a voxel shows as a faint
    line: its occupancy peaks at ``thickness / w`` where ``w`` is the voxel's extent along the normal.
    """
    sz, sy, sx = grid.spacing_zyx
    z, y, x = (grid.axis_mm(a)[box[a]].astype(F32) for a in range(3))
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    sheet = F32(0.25)
    out = np.zeros((len(z), len(y), len(x)), F32)
    yh = t.cav_cy
    zh = t.z_low + 0.5 * t.lung_height
    for sign in (-1.0, 1.0):
        side = (X - F32(t.cx)) * F32(sign) > 0
        k = 1.1 if sign < 0 else 1.3  # the left oblique fissure is steeper
        # A gently curved sheet: z = zh + k (y - yh) + c (x - x_lung)^2, so a coronal slice shows a
        # curved line, not a ruler-straight one. Distance ~ F / |grad F| (first order).
        x_lung = t.cx + sign * 0.5 * t.cav_a
        c = 0.6 * t.lung_height / (t.cav_a**2) * 0.25
        dxl = X - F32(x_lung)
        f = (Z - F32(zh + sign * 0.03 * t.lung_height)) - F32(k) * (Y - F32(yh)) - F32(c) * dxl * dxl
        gx = F32(2.0 * c) * dxl
        gnorm = np.sqrt(F32(1.0 + k * k) + gx * gx)
        w = (F32(sz) + F32(k * sy) + np.abs(gx) * F32(sx)) / gnorm
        occ = np.clip(F32(1.0) - np.abs(f) / gnorm / w, 0.0, None) * (sheet / w)
        np.maximum(out, occ * side, out=out)
    # Right minor fissure: horizontal, from the front of the lung back to the hilum.
    zm = F32(t.hilum_z + 0.02 * t.lung_height)
    occ = np.clip(F32(1.0) - np.abs(Z - zm) / F32(sz), 0.0, None) * (sheet / F32(sz))
    np.maximum(out, occ * ((X < F32(t.cx)) & (Y < F32(yh)) & (Z - F32(zh) - F32(1.1) * (Y - F32(yh)) > 0)), out=out)
    return out


def _upsample_linear(a: np.ndarray, axis: int, n_fine: int) -> np.ndarray:
    """Linearly interpolate ``a`` along ``axis`` to ``n_fine`` samples spanning the same extent."""
    n_coarse = a.shape[axis]
    pos = np.linspace(0.0, n_coarse - 1.0, n_fine)
    lo = np.minimum(np.floor(pos).astype(int), n_coarse - 2)
    shape = [1] * a.ndim
    shape[axis] = n_fine
    w = (pos - lo).astype(F32).reshape(shape)
    return np.take(a, lo, axis=axis) * (F32(1.0) - w) + np.take(a, lo + 1, axis=axis) * w


def _territory(rng: np.random.Generator, mask: np.ndarray, grid: Grid, spacing_mm: float, per_leaf: int) -> np.ndarray:
    """Random points (grid mm) filling ``mask`` with one leaf territory per ``spacing_mm`` cube."""
    idx = np.flatnonzero(mask)
    voxel_mm3 = float(np.prod(grid.spacing_zyx))
    n = int(round(len(idx) * voxel_mm3 / spacing_mm**3 * per_leaf))
    n = max(per_leaf * 4, n)
    pick = idx[rng.integers(0, len(idx), size=n)]
    zyx = np.stack(np.unravel_index(pick, mask.shape), axis=1).astype(np.float64)
    zyx += rng.uniform(-0.5, 0.5, size=zyx.shape)
    return zyx * np.asarray(grid.spacing_zyx)


def build_anatomy(t: Torso, grid: Grid, rng: np.random.Generator, *, leaf_spacing_mm: float = 5.0) -> Anatomy:
    """Render the whole canonical-grid anatomy: torso, textured lungs, airway tree, pulmonary vessel trees."""
    sz, sy, sx = grid.spacing_zyx
    rng_texture, rng_trees = rng.spawn(2)
    hu, lung, trachea = render_torso(t, grid)
    lung_mask = lung >= 0.5
    if not lung_mask.any():
        raise ValueError("the grid is too small or too coarse to hold any lung")
    zz, yy, xx = (np.flatnonzero(lung_mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zz[0], zz[-1] + 1), slice(yy[0], yy[-1] + 1), slice(xx[0], xx[-1] + 1))
    hu[box] += lung[box] * _lung_texture(rng_texture, grid, t, box)
    _mix(hu[box], lung[box] * _fissures(t, grid, box), HU_BLOOD)
    x = grid.axis_mm(2)
    right = (x < t.cx)[None, None, :]
    side = np.where(lung_mask, np.where(right, 1, 2), 0).astype(np.uint8)
    hila = hilum_points(t)
    vessel_parts: list[Capsules] = []
    airway_trees: list[TubeTree] = []
    for side_name, label in (("right", 1), ("left", 2)):
        rng_a, rng_v = rng_trees.spawn(2)
        side_mask = side == label
        max_r = 0.55 * t.aorta_r
        arteries = grow_tree(rng_a, hila[f"{side_name}_artery"], _territory(rng_a, side_mask, grid, leaf_spacing_mm, 2), max_radius_mm=max_r)
        veins = grow_tree(rng_v, hila[f"{side_name}_vein"], _territory(rng_v, side_mask, grid, leaf_spacing_mm, 2), max_radius_mm=max_r)
        vessel_parts += [Capsules.from_tree(arteries), Capsules.from_tree(veins)]
        # The bronchus runs beside its artery, on the side facing the front-middle of the chest.
        toward = np.array([0.3, -1.0, -0.6 if label == 2 else 0.6])
        airway_trees.append(
            beside_tree(arteries, toward / np.linalg.norm(toward), radius_scale=0.85, gap_mm=0.4, max_radius_mm=0.6 * t.trachea_r)
        )
    vessels = Capsules.concat(vessel_parts)
    n_sub = max(1, int(np.ceil(sz / (1.2 * 0.5 * (sy + sx)))))
    vessel_occ = render_capsules(vessels, grid.shape_zyx, grid.spacing_zyx, n_sub_z=n_sub)
    vbox = capsule_bounds(vessels, grid.shape_zyx, grid.spacing_zyx)
    vessel_occ[vbox] *= lung[vbox]
    _mix(hu[vbox], vessel_occ[vbox], HU_BLOOD)
    # Airways: trachea, main bronchi to each tree's root, then bronchi down to ~1 mm lumen radius.
    carina = trachea.end_zyx_mm[-1]
    lumen_parts = [trachea]
    for tree in airway_trees:
        root = tree.nodes_zyx_mm[0]
        lumen_parts.append(Capsules.from_polyline(np.stack([carina, root]), np.array([0.75 * t.trachea_r, tree.node_radius_mm[0]])))
        caps = Capsules.from_tree(tree)
        lumen_parts.append(caps.select(caps.end_radius_mm >= 0.9))
    lumen = Capsules.concat(lumen_parts)
    wall_add = 0.18 * np.maximum(lumen.start_radius_mm, lumen.end_radius_mm) + 0.35
    wall = Capsules(lumen.start_zyx_mm, lumen.end_zyx_mm, lumen.start_radius_mm + wall_add, lumen.end_radius_mm + wall_add)
    wall_occ = render_capsules(wall, grid.shape_zyx, grid.spacing_zyx, n_sub_z=n_sub)
    lumen_occ = render_capsules(lumen, grid.shape_zyx, grid.spacing_zyx, n_sub_z=n_sub)
    abox = capsule_bounds(wall, grid.shape_zyx, grid.spacing_zyx)
    _mix(hu[abox], wall_occ[abox], HU_MUSCLE)
    _mix(hu[abox], lumen_occ[abox], HU_AIR)
    params = {k: float(v) for k, v in vars(t).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Anatomy(hu, lung, side, vessel_occ, vessels, params)
