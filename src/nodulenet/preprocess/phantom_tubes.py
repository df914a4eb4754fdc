"""Branching tube trees (vessels, airways) for the chest-CT phantom, and a fast partial-volume renderer.

Conventions: every point here is in *grid millimetres* ``(z, y, x)`` = voxel index times ``spacing_zyx``
(so voxel ``(0, 0, 0)`` sits at ``(0, 0, 0)`` mm); the caller maps the grid to the patient (origin and
direction) once, at the end. Radii are in mm.

Trees grow by *territory splitting*: a set of random points fills the organ; a branch that supplies a
set of points heads towards their centroid, then the set is cut in two across its longest axis and each
half gets a daughter branch. This makes trees that fill the lung evenly, bifurcate at plausible angles
and taper by a Murray-type law ``r ~ n_points ** (1 / exponent)``. It is a cheap stand-in for
constrained-constructive-optimisation vessel models.

Rendering draws every segment as a tapered capsule (cone frustum with round ends, so joints are smooth)
with a linear partial-volume ramp one pixel wide in-plane, averaged over ``n_sub_z`` samples across the
slice thickness (the slice-sensitivity profile). Segments are drawn in batches of equal-sized boxes so
the work is numpy array maths, not a Python loop per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Box edge lengths (voxels) are rounded up to one of these so segments of similar size share a batch.
_BOX_SIZES = np.array([2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512])
# Elements (segments x sub-slices x box voxels) per numpy batch: ~8 MB per float32 temporary.
_BATCH_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class TubeTree:
    """A tree as nodes plus segments between them (``segments[i] = (parent_node, child_node)``).

    ``node_radius_mm[k]`` is the radius at node ``k``; a segment tapers from its parent's radius to its
    child's. ``incoming_dir`` is the unit direction of the segment that ends at each node (the root gets
    its first segment's direction) so airways can run beside arteries.
    """

    nodes_zyx_mm: np.ndarray  # (n_nodes, 3)
    node_radius_mm: np.ndarray  # (n_nodes,)
    segments: np.ndarray  # (n_segments, 2) int
    incoming_dir: np.ndarray  # (n_nodes, 3)


@dataclass(frozen=True)
class Capsules:
    """Flat list of tapered capsules (what the renderer draws)."""

    start_zyx_mm: np.ndarray  # (n, 3)
    end_zyx_mm: np.ndarray  # (n, 3)
    start_radius_mm: np.ndarray  # (n,)
    end_radius_mm: np.ndarray  # (n,)

    @classmethod
    def from_tree(cls, tree: TubeTree, radius_scale: float = 1.0, radius_add_mm: float = 0.0) -> "Capsules":
        """One capsule per segment, from its parent node to its child node."""
        parent, child = tree.segments[:, 0], tree.segments[:, 1]
        radius = tree.node_radius_mm * radius_scale + radius_add_mm
        return cls(tree.nodes_zyx_mm[parent], tree.nodes_zyx_mm[child], radius[parent], radius[child])

    @classmethod
    def from_polyline(cls, points_zyx_mm: np.ndarray, radii_mm: np.ndarray) -> "Capsules":
        pts = np.asarray(points_zyx_mm, dtype=np.float64)
        rad = np.asarray(radii_mm, dtype=np.float64)
        return cls(pts[:-1], pts[1:], rad[:-1], rad[1:])

    @classmethod
    def concat(cls, parts: list["Capsules"]) -> "Capsules":
        return cls(
            np.concatenate([p.start_zyx_mm for p in parts]).reshape(-1, 3),
            np.concatenate([p.end_zyx_mm for p in parts]).reshape(-1, 3),
            np.concatenate([p.start_radius_mm for p in parts]),
            np.concatenate([p.end_radius_mm for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.start_radius_mm.shape[0])

    def select(self, keep: np.ndarray) -> "Capsules":
        return Capsules(self.start_zyx_mm[keep], self.end_zyx_mm[keep], self.start_radius_mm[keep], self.end_radius_mm[keep])


def grow_tree(
    rng: np.random.Generator,
    root_zyx_mm: np.ndarray,
    territory_zyx_mm: np.ndarray,
    *,
    leaf_points: int = 2,
    leaf_radius_mm: float = 0.25,
    murray_exponent: float = 3.0,
    max_radius_mm: float = 8.0,
    first_step: float = 0.18,
) -> TubeTree:
    """Grow one tree from ``root_zyx_mm`` that supplies every point of ``territory_zyx_mm`` ``(n, 3)``.

    ``first_step`` is how far (fraction of the way to the territory centroid) the root trunk goes before
    its first bifurcation; deeper branches go 45-70 % of the way, so big vessels fan out near the hilum
    and small ones reach the periphery.

    The growth runs one generation at a time over all open branches at once (each branch's points are
    a contiguous run of ``order``), so a tree of thousands of branches costs a few dozen numpy calls.
    """
    points = np.asarray(territory_zyx_mm, dtype=np.float64)
    order = np.arange(len(points))

    def radius_for(n: np.ndarray) -> np.ndarray:
        return np.minimum(leaf_radius_mm * (np.maximum(n, 1) / leaf_points) ** (1.0 / murray_exponent), max_radius_mm)

    nodes = [np.asarray(root_zyx_mm, dtype=np.float64)[None, :]]
    radii = [radius_for(np.array([len(points)]))]
    parents: list[np.ndarray] = []
    children: list[np.ndarray] = []
    n_nodes = 1
    # Open branches: start node, first index into `order`, number of points.
    start = np.array([0])
    offset = np.array([0])
    count = np.array([len(points)])
    depth = 0
    while len(start):
        group = np.repeat(np.arange(len(start)), count)
        member = order[_ranges(offset, count)]
        pts = points[member]
        centroid = np.add.reduceat(pts, np.r_[0, np.cumsum(count)[:-1]], axis=0) / count[:, None]
        begin = np.concatenate(nodes)[start]
        leaf = count <= leaf_points
        if depth == 0:
            step = np.full(len(start), first_step)
        elif depth == 1:
            step = np.full(len(start), 0.22)
        else:
            step = rng.uniform(0.45, 0.7, size=len(start))
        # A terminal branch runs a little past its centroid so the tip reaches into its territory.
        step = np.where(leaf, rng.uniform(1.0, 1.4, size=len(start)), step)
        ends = begin + step[:, None] * (centroid - begin)
        new_ids = n_nodes + np.arange(len(start))
        nodes.append(ends)
        radii.append(radius_for(count) * np.where(leaf, 0.7, 1.0))
        parents.append(start)
        children.append(new_ids)
        n_nodes += len(start)
        # Split every non-leaf territory across its principal axis at an uneven share.
        split = ~leaf
        if not split.any():
            break
        centred = pts - centroid[group]
        outer = centred[:, :, None] * centred[:, None, :]
        cov = np.add.reduceat(outer, np.r_[0, np.cumsum(count)[:-1]], axis=0)
        _, vecs = np.linalg.eigh(cov)
        axis = vecs[:, :, -1]
        proj = np.einsum("ij,ij->i", centred, axis[group])
        resort = np.lexsort((proj, group))
        order[_ranges(offset, count)] = member[resort]
        share = rng.uniform(0.3, 0.7, size=len(start))
        k = np.clip(np.round(share * count), 1, np.maximum(count - 1, 1)).astype(np.int64)
        start = np.concatenate([new_ids[split], new_ids[split]])
        offset_new = np.concatenate([offset[split], offset[split] + k[split]])
        count = np.concatenate([k[split], count[split] - k[split]])
        offset = offset_new
        depth += 1

    node_arr = np.concatenate(nodes)
    seg = np.stack([np.concatenate(parents), np.concatenate(children)], axis=1).astype(np.int64)
    incoming = np.zeros_like(node_arr)
    vec = node_arr[seg[:, 1]] - node_arr[seg[:, 0]]
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-9)
    incoming[seg[:, 1]] = vec
    incoming[0] = vec[0]
    return TubeTree(node_arr, np.concatenate(radii), seg, incoming)


def _ranges(offset: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(o, o + c)`` for each pair, without a Python loop."""
    total = int(count.sum())
    starts = np.repeat(offset - np.r_[0, np.cumsum(count)[:-1]], count)
    return starts + np.arange(total)


def beside_tree(tree: TubeTree, side_zyx: np.ndarray, radius_scale: float, gap_mm: float, max_radius_mm: float = np.inf) -> TubeTree:
    """A companion tree (e.g. the bronchus beside each artery): same topology, each node moved sideways.

    The offset of node ``k`` is perpendicular to its incoming segment, towards ``side_zyx`` projected off
    that direction, and long enough for the two tubes to touch with ``gap_mm`` between their surfaces.
    Offsets are per node, so parent and child segments still meet.
    """
    side = np.asarray(side_zyx, dtype=np.float64)
    d = tree.incoming_dir
    perp = side[None, :] - (d @ side)[:, None] * d
    norm = np.linalg.norm(perp, axis=1, keepdims=True)
    # Where the incoming direction is (nearly) parallel to `side`, any perpendicular will do.
    fallback = np.cross(d, np.array([0.0, 0.0, 1.0]))
    perp = np.where(norm > 0.2, perp, fallback)
    perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-9)
    radius = np.minimum(tree.node_radius_mm * radius_scale, max_radius_mm)
    offset = perp * (tree.node_radius_mm + radius + gap_mm)[:, None]
    return TubeTree(tree.nodes_zyx_mm + offset, radius, tree.segments, tree.incoming_dir)


def _round_up_box(n: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(_BOX_SIZES, n)
    over = pos >= len(_BOX_SIZES)
    out = _BOX_SIZES[np.minimum(pos, len(_BOX_SIZES) - 1)].copy()
    out[over] = n[over]
    return out


def render_capsules(
    capsules: Capsules,
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    *,
    n_sub_z: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Fractional occupancy (0..1, float32, ``shape_zyx``) of the union of ``capsules``.

    Union is the voxel-wise maximum, so overlapping branches do not add up past 1. The in-plane ramp is
    one mean pixel wide (box integration across an edge); thin tubes are scaled by
    ``r^2 / (r^2 + w^2 / 12)`` so a sub-pixel vessel keeps its true cross-section area instead of the
    ramp's wider cone. Along z the profile is sampled ``n_sub_z`` times across the slice.
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    sz, sy, sx = (float(v) for v in spacing_zyx)
    if out is None:
        out = np.zeros((nz, ny, nx), dtype=np.float32)
    if len(capsules) == 0:
        return out
    flat_out = out.reshape(-1)
    spacing = np.array([sz, sy, sx])
    ramp = 0.5 * (sy + sx)
    p0 = np.asarray(capsules.start_zyx_mm, dtype=np.float64)
    p1 = np.asarray(capsules.end_zyx_mm, dtype=np.float64)
    r0 = np.asarray(capsules.start_radius_mm, dtype=np.float64)
    r1 = np.asarray(capsules.end_radius_mm, dtype=np.float64)
    reach = np.maximum(r0, r1) + ramp
    lo = np.floor((np.minimum(p0, p1) - reach[:, None]) / spacing).astype(np.int64)
    hi = np.ceil((np.maximum(p0, p1) + reach[:, None]) / spacing).astype(np.int64) + 1
    shape = np.array([nz, ny, nx])
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    visible = np.all(hi > lo, axis=1)
    dims = np.stack([_round_up_box(hi[:, a] - lo[:, a]) for a in range(3)], axis=1)
    sub = ((np.arange(n_sub_z) + 0.5) / n_sub_z - 0.5).astype(np.float64)
    keys = dims[:, 0] * 1_000_000 + dims[:, 1] * 1_000 + dims[:, 2]
    for key in np.unique(keys[visible]):
        members = np.flatnonzero(visible & (keys == key))
        bz, by, bx = (int(v) for v in dims[members[0]])
        per_capsule = n_sub_z * bz * by * bx
        step = max(1, _BATCH_ELEMENTS // per_capsule)
        for start in range(0, len(members), step):
            sel = members[start : start + step]
            _render_batch(flat_out, (nz, ny, nx), spacing, ramp, sub, lo[sel], (bz, by, bx), p0[sel], p1[sel], r0[sel], r1[sel])
    return out


def _render_batch(
    flat_out: np.ndarray,
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    ramp: float,
    sub: np.ndarray,
    lo: np.ndarray,
    box: tuple[int, int, int],
    p0: np.ndarray,
    p1: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
) -> None:
    nz, ny, nx = shape
    bz, by, bx = box
    f32 = np.float32
    iz, iy, ix = np.arange(bz), np.arange(by), np.arange(bx)
    # Offsets from each capsule's start point, broadcast to (K, n_sub, bz, by, bx).
    dz = (((lo[:, 0, None, None] + iz[None, None, :] + sub[None, :, None]) * spacing[0]) - p0[:, 0, None, None])
    dy = ((lo[:, 1, None] + iy[None, :]) * spacing[1]) - p0[:, 1, None]
    dx = ((lo[:, 2, None] + ix[None, :]) * spacing[2]) - p0[:, 2, None]
    dz = dz.astype(f32)[:, :, :, None, None]
    dy = dy.astype(f32)[:, None, None, :, None]
    dx = dx.astype(f32)[:, None, None, None, :]
    axis = (p1 - p0).astype(f32)
    length2 = np.maximum((axis * axis).sum(axis=1), f32(1e-9))
    ez = axis[:, 0, None, None, None, None]
    ey = axis[:, 1, None, None, None, None]
    ex = axis[:, 2, None, None, None, None]
    t = (dz * ez + dy * ey + dx * ex) / length2[:, None, None, None, None]
    np.clip(t, 0.0, 1.0, out=t)
    qz = dz - t * ez
    dist2 = qz * qz
    qy = dy - t * ey
    dist2 += qy * qy
    qx = dx - t * ex
    dist2 += qx * qx
    radius = r0.astype(f32)[:, None, None, None, None] + t * (r1 - r0).astype(f32)[:, None, None, None, None]
    occ = f32(0.5) + (radius - np.sqrt(dist2)) / f32(ramp)
    np.clip(occ, 0.0, 1.0, out=occ)
    r2 = radius * radius
    occ *= r2 / (r2 + f32(ramp * ramp / 12.0))
    occ = occ.mean(axis=1)  # (K, bz, by, bx)
    gz = lo[:, 0, None] + iz[None, :]
    gy = lo[:, 1, None] + iy[None, :]
    gx = lo[:, 2, None] + ix[None, :]
    inside = (gz < nz)[:, :, None, None] & (gy < ny)[:, None, :, None] & (gx < nx)[:, None, None, :]
    keep = inside & (occ > 1e-3)
    flat = (gz[:, :, None, None] * ny + gy[:, None, :, None]) * nx + gx[:, None, None, :]
    np.maximum.at(flat_out, flat[keep], occ[keep])


def capsule_bounds(
    capsules: Capsules, shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], margin_mm: float = 2.0
) -> tuple[slice, slice, slice]:
    """The index box (slices) that holds every capsule plus ``margin_mm``, clipped to the grid."""
    spacing = np.asarray(spacing_zyx)
    reach = np.maximum(capsules.start_radius_mm, capsules.end_radius_mm)[:, None] + margin_mm
    lo = np.minimum(capsules.start_zyx_mm, capsules.end_zyx_mm) - reach
    hi = np.maximum(capsules.start_zyx_mm, capsules.end_zyx_mm) + reach
    lo_i = np.clip(np.floor(lo.min(axis=0) / spacing).astype(int), 0, shape_zyx)
    hi_i = np.clip(np.ceil(hi.max(axis=0) / spacing).astype(int) + 1, 0, shape_zyx)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))  # type: ignore[return-value]
