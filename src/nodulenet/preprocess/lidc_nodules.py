"""Turn an LIDC-IDRI annotation file into physical nodules on the CT grid: masks, centres, sizes.

Conventions
-----------
- Arrays are ``(z, y, x)`` on the grid of the given :class:`~nodulenet.io.volume.Volume`, whose rows and
  columns must be as stored in the DICOM files (as SimpleITK and ``read_dicom_series`` read them): an
  LIDC outline point ``(x, y)`` is array column ``x`` and row ``y`` of its slice, whatever the direction.
- A ROI's slice is found by its ``imageSOP_UID`` in ``volume.meta["sop_instance_uids"]``; failing that,
  by its ``imageZposition`` within half a slice of ``volume.meta["slice_positions_mm"]`` (or of the
  geometry's slice positions, e.g. for a LUNA16 ``.mhd`` of the same series).
- Boxes are ``(z0, y0, x0, z1, y1, x1)`` voxels, upper bounds exclusive. World is LPS mm ``(x, y, z)``.

Which pixels an outline covers
------------------------------
LIDC readers were told to draw each outline just *outside* the nodule, so that the outline pixels do
not overlap it; pylidc follows this by default (``Annotation.boolean_mask(include_contour_points=False)``).
So by default a nodule is the pixels strictly inside its outline, and a hole outline
(``inclusion=FALSE``), drawn outside the nodule i.e. inside the hole, removes its outline pixels too.
With ``include_contour_pixels=True`` every outline pixel belongs to the nodule (what the published
NoduleNet masks did with ``cv2.fillPoly``, which also filled hole outlines as nodule); a hole then
removes only its strict inside. The per-reader **centre and diameter** always use the default (outline
excluded) because LUNA16 did: the centroid of those voxels and the diameter of the sphere of equal volume
reproduce, to < 0.01 mm, one reader's row of ``annotations_excluded.csv`` on each of LIDC-IDRI-0001 and
-0002 and the merged row of 0002's two-reader nodule.

Physical nodules
----------------
Readers' outlines are grouped into physical nodules pylidc-like: two outlines of different readers are
linked when they share a voxel or come within ``tol_mm`` (default: the largest voxel spacing, i.e. the
slice spacing, as pylidc's default tolerance) of each other. A nodule's centre and diameter are the means
of its readers' centres and diameters, as LUNA16 built ``annotations.csv`` (>= 3 mm, >= 3 of 4 readers).
Point marks (nodules < 3 mm, non-nodules) are grouped the same way by distance (``point_tol_mm``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nodulenet.errors import InputError
from nodulenet.io.lidc_xml import CHARACTERISTIC_NAMES, LidcCharacteristics, LidcNodule, LidcReader
from nodulenet.io.lidc_xml import LidcReadMessage, LidcRoi, find_lidc_xml
from nodulenet.io.volume import Volume

ConsensusMethod = Literal["union", "majority"]
"""``union``: voxels any reader marked (the NoduleNet protocol). ``majority``: voxels marked by >= 50 % of
the nodule's readers (pylidc ``consensus(clevel=0.5)``)."""

Box = tuple[int, int, int, int, int, int]


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so a record's dict equals its JSON round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ReaderOutline:
    """One reader's outline of one nodule >= 3 mm, rasterised on the volume grid.

    ``interior``/``filled`` are boolean arrays over ``box`` without / with the outline pixels."""

    reader_index: int
    reader_id: str
    nodule_id: str
    box: Box
    interior: np.ndarray
    filled: np.ndarray
    outline_world_xyz_mm: np.ndarray  # (n, 3) outline points, for distances between outlines
    center_world_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    characteristics: LidcCharacteristics | None

    def mask(self, include_contour_pixels: bool) -> np.ndarray:
        # An outline too small to have a strict inside still marks a nodule: then its pixels count.
        return self.filled if include_contour_pixels or not self.interior.any() else self.interior


@dataclass(frozen=True)
class PointMark:
    """One reader's point mark (nodule < 3 mm or non-nodule)."""

    reader_index: int
    reader_id: str
    finding_id: str
    kind: str
    center_world_xyz_mm: tuple[float, float, float]


@dataclass(frozen=True)
class NoduleRecord:
    """A physical nodule >= 3 mm as a plain, JSON-able record (see module doc for the conventions)."""

    id: int
    n_readers: int
    reader_ids: tuple[str, ...]
    center_world_xyz_mm: tuple[float, float, float]
    center_zyx: tuple[float, float, float]  # fractional voxel index of the centre in the given volume
    diameter_mm: float
    bbox_zyx: Box
    volume_mm3: float
    characteristics: dict[str, float | None]
    consensus: str

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(asdict(self))
        return plain


@dataclass(frozen=True)
class PointFindingRecord:
    """A physical finding marked by points (``kind``: ``small_nodule`` or ``non_nodule``)."""

    id: int
    kind: str
    n_readers: int
    reader_ids: tuple[str, ...]
    center_world_xyz_mm: tuple[float, float, float]
    center_zyx: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(asdict(self))
        return plain


@dataclass(frozen=True)
class NoduleCluster:
    """The outlines (at most one per reader) that refer to one physical nodule."""

    outlines: tuple[ReaderOutline, ...]

    @property
    def n_readers(self) -> int:
        return len(self.outlines)

    @property
    def center_world_xyz_mm(self) -> tuple[float, float, float]:
        c = np.mean([o.center_world_xyz_mm for o in self.outlines], axis=0)
        return (float(c[0]), float(c[1]), float(c[2]))

    @property
    def diameter_mm(self) -> float:
        return float(np.mean([o.diameter_mm for o in self.outlines]))

    def characteristics(self) -> dict[str, float | None]:
        """Mean of each rating over the readers who gave it (``None`` if nobody did)."""
        result: dict[str, float | None] = {}
        for name in CHARACTERISTIC_NAMES:
            values = [getattr(o.characteristics, name) for o in self.outlines if o.characteristics is not None]
            values = [v for v in values if v is not None]
            result[name] = float(np.mean(values)) if values else None
        return result

    def consensus_mask(
        self, method: ConsensusMethod, include_contour_pixels: bool | None = None
    ) -> tuple[Box, np.ndarray]:
        """The nodule's consensus mask over its box. ``include_contour_pixels=None`` uses each method's
        reference convention: outline pixels included for ``union`` (NoduleNet), excluded for
        ``majority`` (pylidc)."""
        include = (method == "union") if include_contour_pixels is None else include_contour_pixels
        box = _union_box([o.box for o in self.outlines])
        votes = np.zeros(_box_shape(box), dtype=np.int16)
        for o in self.outlines:
            votes[_local_slices(o.box, box)] += o.mask(include)
        if method == "union":
            mask = votes >= 1
        elif method == "majority":
            # pylidc: mean vote >= 0.5, i.e. 2 * votes >= n (with 2 readers either one suffices).
            mask = 2 * votes >= self.n_readers
            if not mask.any():
                # Readers whose outlines touch without overlapping: keep the best-agreed voxels rather
                # than give a nodule an empty label.
                mask = votes == votes.max()
        else:
            raise ValueError(f"unknown consensus method {method!r}; use 'union' or 'majority'")
        return box, mask


@dataclass(frozen=True)
class LidcFindings:
    """Everything the readers marked on one series, grouped into physical findings."""

    xml_path: Path
    nodules: tuple[NoduleCluster, ...]  # sorted by centre z, then y, x
    small_nodules: tuple[tuple[PointMark, ...], ...]
    non_nodules: tuple[tuple[PointMark, ...], ...]


@dataclass(frozen=True)
class LidcLabels:
    """Training labels of one series: instance mask (0 = background, k = ``nodules[k-1]``) + records."""

    xml_path: Path
    instance_mask: Volume
    nodules: tuple[NoduleRecord, ...]
    excluded_nodules: tuple[NoduleRecord, ...]  # >= 3 mm but fewer than min_readers readers; not in mask
    small_nodules: tuple[PointFindingRecord, ...]
    non_nodules: tuple[PointFindingRecord, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the mask array, JSON-able."""
        lists = ("nodules", "excluded_nodules", "small_nodules", "non_nodules")
        found = {name: [r.to_dict() for r in getattr(self, name)] for name in lists}
        return {"xml_path": str(self.xml_path), "settings": dict(self.settings), **found}


# ----------------------------------------------------------------------------------- box helpers


def _box_shape(box: Box) -> tuple[int, int, int]:
    return (box[3] - box[0], box[4] - box[1], box[5] - box[2])


def _union_box(boxes: list[Box]) -> Box:
    lo = np.min([b[:3] for b in boxes], axis=0)
    hi = np.max([b[3:] for b in boxes], axis=0)
    return (int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2]))


def _local_slices(inner: Box, outer: Box) -> tuple[slice, slice, slice]:
    """Slices of ``outer``-local arrays that hold ``inner`` (``inner`` must lie inside ``outer``)."""
    return tuple(slice(inner[a] - outer[a], inner[a + 3] - outer[a]) for a in range(3))  # type: ignore[return-value]


def _overlap_voxels(a: ReaderOutline, b: ReaderOutline) -> int:
    lo = np.maximum(a.box[:3], b.box[:3])
    hi = np.minimum(a.box[3:], b.box[3:])
    if np.any(hi <= lo):
        return 0
    common: Box = (int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2]))
    return int(np.count_nonzero(a.filled[_local_slices(common, a.box)] & b.filled[_local_slices(common, b.box)]))


# ----------------------------------------------------------------------------------- slices


class _SliceLocator:
    """Finds the array slice of an LIDC ROI by SOP uid, else by z position within half a slice."""

    def __init__(self, volume: Volume, xml_path: Path) -> None:
        self.xml_path = xml_path
        nz = volume.shape_zyx[0]
        uids = volume.meta.get("sop_instance_uids") or []
        self.by_uid = {str(u): k for k, u in enumerate(uids)} if len(uids) == nz else {}
        positions = volume.meta.get("slice_positions_mm")
        if positions is None or len(positions) != nz:
            positions = volume.voxel_to_world(np.c_[np.arange(nz), np.zeros(nz), np.zeros(nz)])[:, 2]
        self.z_mm = np.asarray(positions, dtype=np.float64)
        self.half_slice_mm = 0.5 * float(volume.spacing_zyx[0])

    def slice_of(self, roi: LidcRoi, what: str) -> int:
        k = self.by_uid.get(roi.sop_instance_uid)
        if k is not None:
            return k
        nearest = int(np.argmin(np.abs(self.z_mm - roi.z_position_mm)))
        if abs(self.z_mm[nearest] - roi.z_position_mm) <= self.half_slice_mm + 1e-3:
            return nearest
        raise InputError(
            self.xml_path,
            f"{what}: image {roi.sop_instance_uid} (z = {roi.z_position_mm} mm) is not a slice of this series "
            "(no such SOP instance and no slice within half a slice spacing); XML and series do not match",
        )


# ----------------------------------------------------------------------------------- rasterising


def _closed_chain_pixels(edge_xy: np.ndarray) -> np.ndarray:
    """Pixels (x, y) of the closed outline, consecutive points joined by 8-connected straight runs.

    LIDC outlines are usually already 8-connected pixel chains, but some readers' tools left gaps of a
    few pixels; joining them (a DDA line: round evenly spaced samples, 1 pixel per step along the
    longer axis) closes the outline so that filling it is well defined."""
    pts = np.vstack([edge_xy, edge_xy[:1]])
    p, q = pts[:-1], pts[1:]
    n = np.maximum(np.abs(q - p).max(axis=1), 1)  # pixels added by each segment (its end included)
    seg = np.repeat(np.arange(len(p)), n)
    t = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + 1) / n[seg]
    return np.vstack([edge_xy[:1], np.rint(p[seg] + t[:, None] * (q[seg] - p[seg])).astype(np.int64)])


def rasterise_outline(edge_xy: Any, shape_yx: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """Rasterise one closed outline of pixel ``(x, y)`` points.

    Returns ``((y0, x0), interior, filled)``: the local arrays' top-left pixel, the pixels strictly inside
    the outline and the inside plus the outline pixels. Filling uses ``scipy.ndimage.binary_fill_holes``:
    the outline is an 8-connected pixel loop, so the background it encloses is cut off from the outside
    under 4-connectivity and gets filled; a degenerate outline (a line or a point) has no interior.
    """
    pts = np.asarray(edge_xy, dtype=np.int64).reshape(-1, 2)
    if pts.min() < 0 or pts[:, 0].max() >= shape_yx[1] or pts[:, 1].max() >= shape_yx[0]:
        raise ValueError(f"outline leaves the {shape_yx[1]}x{shape_yx[0]} image")
    chain = _closed_chain_pixels(pts)
    # One pixel of margin so the fill sees outside background on every side.
    x0, y0 = int(chain[:, 0].min()) - 1, int(chain[:, 1].min()) - 1
    h, w = int(chain[:, 1].max()) - y0 + 2, int(chain[:, 0].max()) - x0 + 2
    outline = np.zeros((h, w), dtype=bool)
    outline[chain[:, 1] - y0, chain[:, 0] - x0] = True
    filled = ndimage.binary_fill_holes(outline)
    interior = filled & ~outline
    return (y0, x0), interior, filled


def _rasterise_nodule(
    nodule: LidcNodule, locator: _SliceLocator, shape_zyx: tuple[int, int, int], what: str
) -> tuple[Box, np.ndarray, np.ndarray, list[int]]:
    """(box, interior, filled) of a nodule with its holes applied, and each ROI's slice index."""
    pieces = []
    for roi in nodule.rois:
        k = locator.slice_of(roi, what)
        try:
            (y0, x0), interior, filled = rasterise_outline(roi.edge_xy, shape_zyx[1:])
        except ValueError as exc:
            raise InputError(locator.xml_path, f"{what}: {exc}; XML and series do not match") from None
        pieces.append((k, y0, x0, interior, filled, roi.inclusion))
    box: Box = (
        min(p[0] for p in pieces),
        max(0, min(p[1] for p in pieces)),
        max(0, min(p[2] for p in pieces)),
        max(p[0] for p in pieces) + 1,
        min(shape_zyx[1], max(p[1] + p[3].shape[0] for p in pieces)),
        min(shape_zyx[2], max(p[2] + p[3].shape[1] for p in pieces)),
    )
    interior = np.zeros(_box_shape(box), dtype=bool)
    filled = np.zeros_like(interior)
    # Inclusions first, then holes, so that the XML's ROI order does not matter.
    for want_inclusion in (True, False):
        for k, y0, x0, inner, full, inclusion in pieces:
            if inclusion != want_inclusion:
                continue
            # Clip the margin pixel where an outline touches the image border.
            ys, xs = max(y0, box[1]), max(x0, box[2])
            ye, xe = min(y0 + inner.shape[0], box[4]), min(x0 + inner.shape[1], box[5])
            src = (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
            dst = (k - box[0], slice(ys - box[1], ye - box[1]), slice(xs - box[2], xe - box[2]))
            if inclusion:
                interior[dst] |= inner[src]
                filled[dst] |= full[src]
            else:  # see module doc: the hole's outline follows the same convention as the nodule's
                interior[dst] &= ~full[src]
                filled[dst] &= ~inner[src]
    return box, interior, filled, [p[0] for p in pieces]


def _reader_outline(
    volume: Volume, locator: _SliceLocator, reader: LidcReader, nodule: LidcNodule
) -> ReaderOutline | None:
    what = f"reader {reader.reader_id}, nodule {nodule.nodule_id}"
    box, interior, filled, slices = _rasterise_nodule(nodule, locator, volume.shape_zyx, what)
    measured = interior if interior.any() else filled  # tiny outlines may have no strict inside
    if not measured.any():
        return None  # holes cover the whole outline: nothing was marked
    center = volume.voxel_to_world(np.argwhere(measured).mean(axis=0) + np.asarray(box[:3]))
    volume_mm3 = float(np.count_nonzero(measured)) * float(np.prod(volume.spacing_zyx))
    outline_zyx = np.vstack(
        [np.c_[np.full(len(roi.edge_xy), k), np.asarray(roi.edge_xy)[:, ::-1]] for k, roi in zip(slices, nodule.rois)]
    ).astype(np.float64)
    return ReaderOutline(
        reader_index=reader.session_index,
        reader_id=reader.reader_id,
        nodule_id=nodule.nodule_id,
        box=box,
        interior=interior,
        filled=filled,
        outline_world_xyz_mm=volume.voxel_to_world(outline_zyx),
        center_world_xyz_mm=(float(center[0]), float(center[1]), float(center[2])),
        diameter_mm=(6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0),
        volume_mm3=volume_mm3,
        characteristics=nodule.characteristics,
    )


# ----------------------------------------------------------------------------------- grouping


def _constrained_linkage(readers: list[int], pairs: list[tuple[tuple[float, float], int, int]]) -> list[list[int]]:
    """Group items joined by ``pairs`` (best first by their key), never two items of one reader.

    Plain connected components (pylidc) can chain two outlines of one reader into one "nodule" through a
    third reader's outline that touches both (two adjacent nodules, or one large outline over two small
    ones). A reader outlines a nodule once, so instead links are taken best-first (most overlap, then
    nearest) and a link that would put one reader in a group twice is refused: each outline joins the
    group it matches best."""
    parent = list(range(len(readers)))
    members: dict[int, set[int]] = {i: {r} for i, r in enumerate(readers)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, i, j in sorted(pairs):
        ri, rj = find(i), find(j)
        if ri == rj or members[ri] & members[rj]:
            continue
        parent[rj] = ri
        members[ri] |= members.pop(rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(readers)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def cluster_outlines(outlines: list[ReaderOutline], tol_mm: float) -> list[NoduleCluster]:
    """Group readers' outlines into physical nodules (see module doc and :func:`_constrained_linkage`)."""
    pairs: list[tuple[tuple[float, float], int, int]] = []
    lo = [o.outline_world_xyz_mm.min(axis=0) for o in outlines]
    hi = [o.outline_world_xyz_mm.max(axis=0) for o in outlines]
    trees: dict[int, cKDTree] = {}
    for i in range(len(outlines)):
        for j in range(i + 1, len(outlines)):
            a, b = outlines[i], outlines[j]
            if a.reader_index == b.reader_index:
                continue
            shared = _overlap_voxels(a, b)
            if shared:
                iou = shared / (np.count_nonzero(a.filled) + np.count_nonzero(b.filled) - shared)
                pairs.append(((0.0, -iou), i, j))
                continue
            if np.any(lo[i] - hi[j] > tol_mm) or np.any(lo[j] - hi[i] > tol_mm):
                continue  # outline boxes farther apart than tol: cannot link
            tree = trees.setdefault(j, cKDTree(b.outline_world_xyz_mm))
            gap = float(tree.query(a.outline_world_xyz_mm, k=1)[0].min())
            if gap <= tol_mm + 1e-6:
                pairs.append(((1.0, gap), i, j))
    groups = _constrained_linkage([o.reader_index for o in outlines], pairs)
    clusters = [NoduleCluster(tuple(sorted((outlines[i] for i in g), key=lambda o: o.reader_index))) for g in groups]
    return sorted(clusters, key=lambda c: c.center_world_xyz_mm[::-1])


def cluster_points(marks: list[PointMark], tol_mm: float) -> list[tuple[PointMark, ...]]:
    """Group point marks of different readers lying within ``tol_mm`` of each other (nearest first)."""
    if not marks:
        return []
    xyz = np.array([m.center_world_xyz_mm for m in marks])
    pairs = [
        ((1.0, float(np.linalg.norm(xyz[i] - xyz[j]))), i, j)
        for i, j in cKDTree(xyz).query_pairs(tol_mm + 1e-6)
        if marks[i].reader_index != marks[j].reader_index
    ]
    groups = _constrained_linkage([m.reader_index for m in marks], pairs)
    found = [tuple(sorted((marks[i] for i in g), key=lambda m: m.reader_index)) for g in groups]
    return sorted(found, key=lambda g: tuple(np.mean([m.center_world_xyz_mm for m in g], axis=0)[::-1]))


def lidc_findings(
    message: LidcReadMessage, volume: Volume, *, tol_mm: float | None = None, point_tol_mm: float = 5.0
) -> LidcFindings:
    """Rasterise every reader's marks on ``volume`` and group them into physical findings.

    ``tol_mm`` (default: the largest voxel spacing) links outlines; ``point_tol_mm`` links point marks:
    on LIDC-IDRI-0001/0002 different readers' marks of one finding lie <= 2.8 mm apart, and 5 mm leaves
    margin for that while staying well below a small nodule's typical distance to the next one. Raises
    :class:`InputError` naming the XML when it does not belong to the volume's series.
    """
    series_uid = volume.meta.get("series_instance_uid")
    if series_uid and str(series_uid) != message.series_instance_uid:
        raise InputError(
            message.path,
            f"annotates series {message.series_instance_uid}, but the scan is series {series_uid}",
        )
    tol = float(max(volume.spacing_zyx)) if tol_mm is None else float(tol_mm)
    locator = _SliceLocator(volume, message.path)
    outlines: list[ReaderOutline] = []
    points: dict[str, list[PointMark]] = {"small_nodule": [], "non_nodule": []}
    for reader in message.readers:
        for nodule in reader.nodules:
            outline = _reader_outline(volume, locator, reader, nodule)
            if outline is not None:
                outlines.append(outline)
        for finding in reader.small_nodules + reader.non_nodules:
            what = f"reader {reader.reader_id}, {finding.kind} {finding.finding_id}"
            idx = [(locator.slice_of(r, what), r.edge_xy[0][1], r.edge_xy[0][0]) for r in finding.rois]
            center = volume.voxel_to_world(np.mean(np.asarray(idx, dtype=np.float64), axis=0))
            xyz = (float(center[0]), float(center[1]), float(center[2]))
            mark = PointMark(reader.session_index, reader.reader_id, finding.finding_id, finding.kind, xyz)
            points[finding.kind].append(mark)
    return LidcFindings(
        xml_path=message.path,
        nodules=tuple(cluster_outlines(outlines, tol)),
        small_nodules=tuple(cluster_points(points["small_nodule"], point_tol_mm)),
        non_nodules=tuple(cluster_points(points["non_nodule"], point_tol_mm)),
    )


# ----------------------------------------------------------------------------------- labels


def _point_records(groups: tuple[tuple[PointMark, ...], ...], volume: Volume) -> tuple[PointFindingRecord, ...]:
    records = []
    for k, group in enumerate(groups, start=1):
        c = np.mean([m.center_world_xyz_mm for m in group], axis=0)
        v = volume.world_to_voxel(c)
        ids = tuple(m.reader_id for m in group)
        xyz, zyx = (float(c[0]), float(c[1]), float(c[2])), (float(v[0]), float(v[1]), float(v[2]))
        records.append(PointFindingRecord(k, group[0].kind, len(group), ids, xyz, zyx))
    return tuple(records)


def _nodule_record(
    k: int, cluster: NoduleCluster, box: Box, mask: np.ndarray, volume: Volume, method: str
) -> NoduleRecord:
    where = np.argwhere(mask)
    lo, hi = where.min(axis=0) + box[:3], where.max(axis=0) + 1 + np.asarray(box[:3])
    center = cluster.center_world_xyz_mm
    v = volume.world_to_voxel(center)
    return NoduleRecord(
        id=k,
        n_readers=cluster.n_readers,
        reader_ids=tuple(o.reader_id for o in cluster.outlines),
        center_world_xyz_mm=center,
        center_zyx=(float(v[0]), float(v[1]), float(v[2])),
        diameter_mm=cluster.diameter_mm,
        bbox_zyx=(int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2])),
        volume_mm3=float(np.count_nonzero(mask)) * float(np.prod(volume.spacing_zyx)),
        characteristics=cluster.characteristics(),
        consensus=method,
    )


def lidc_labels(
    findings: LidcFindings,
    volume: Volume,
    *,
    min_readers: int = 1,
    consensus: ConsensusMethod = "union",
    include_contour_pixels: bool | None = None,
) -> LidcLabels:
    """Instance mask and records of the nodules >= 3 mm marked by at least ``min_readers`` readers.

    ``consensus``/``include_contour_pixels``: see :meth:`NoduleCluster.consensus_mask`. Labels are
    ``1..len(nodules)`` in ``nodules`` order (by centre z, y, x). Where two nodules' masks overlap, the
    voxel keeps the label of the nodule with more readers (then the lower id); each record's box and
    volume are those of its own consensus mask. Nodules with fewer readers come back as
    ``excluded_nodules`` (LUNA16's "irrelevant findings" for ``min_readers=3``), numbered after the kept
    ones and absent from the mask.
    """
    if min_readers < 1:
        raise ValueError(f"min_readers must be >= 1, got {min_readers}")
    kept = [c for c in findings.nodules if c.n_readers >= min_readers]
    dtype = np.uint8 if len(kept) <= np.iinfo(np.uint8).max else np.uint16
    labels = np.zeros(volume.shape_zyx, dtype=dtype)
    records: list[NoduleRecord] = []
    masks = []
    for k, cluster in enumerate(kept, start=1):
        box, mask = cluster.consensus_mask(consensus, include_contour_pixels)
        records.append(_nodule_record(k, cluster, box, mask, volume, consensus))
        masks.append((box, mask))
    left = [c for c in findings.nodules if c.n_readers < min_readers]
    excluded = [
        _nodule_record(len(kept) + k, c, *c.consensus_mask(consensus, include_contour_pixels), volume, consensus)
        for k, c in enumerate(left, start=1)
    ]
    for k in sorted(range(len(kept)), key=lambda i: (-kept[i].n_readers, i)):
        box, mask = masks[k]
        region = labels[box[0] : box[3], box[1] : box[4], box[2] : box[5]]
        region[mask & (region == 0)] = k + 1
    settings = {
        "min_readers": min_readers,
        "consensus": consensus,
        "include_contour_pixels": (consensus == "union") if include_contour_pixels is None else include_contour_pixels,
        "center_and_diameter": "mean over readers of interior-voxel centroid and equal-volume sphere diameter (LUNA16)",
    }
    return LidcLabels(
        xml_path=findings.xml_path,
        instance_mask=volume.with_array(labels, kind="lidc_instance_mask"),
        nodules=tuple(records),
        excluded_nodules=tuple(excluded),
        small_nodules=_point_records(findings.small_nodules, volume),
        non_nodules=_point_records(findings.non_nodules, volume),
        settings=settings,
    )


def lidc_labels_for_series(
    series_dir: str | Path,
    volume: Volume,
    *,
    min_readers: int = 1,
    consensus: ConsensusMethod = "union",
    include_contour_pixels: bool | None = None,
    tol_mm: float | None = None,
) -> LidcLabels | None:
    """Labels for the CT series in ``series_dir`` read as ``volume``; ``None`` when the folder holds no
    LIDC CT annotation file for the volume's ``meta["series_instance_uid"]``."""
    message = find_lidc_xml(series_dir, volume.meta.get("series_instance_uid"))
    if message is None:
        return None
    findings = lidc_findings(message, volume, tol_mm=tol_mm)
    return lidc_labels(
        findings, volume, min_readers=min_readers, consensus=consensus, include_contour_pixels=include_contour_pixels
    )
