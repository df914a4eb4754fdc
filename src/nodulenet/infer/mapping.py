"""Map detections from the preprocessed (1 mm, cropped) grid back to the ORIGINAL scan.

Conventions (DESIGN.md, ``nodulenet.model.box_ops``): boxes ``(z0, y0, x0, z1, y1, x1)``, end exclusive, in the
CORNER frame (voxel ``i`` spans ``[i, i + 1)``, so a box centre ``c`` is at voxel INDEX ``c - 0.5``). Indices
``(z, y, x)``; world ``(x, y, z)`` DICOM LPS mm.

The preprocessed grid shares origin and direction with the scan in canonical orientation (the scan itself for
the usual axial DICOM) up to a per-axis scale and a crop (:class:`~nodulenet.preprocess.resample.CaseTransform`)::

    canonical_index = (preprocessed_index + crop_start) * scale,   scale = new spacing / canonical spacing

and the canonical grid is the original one re-indexed (a transpose and flips, exact) or, for an oblique scan,
resampled (:class:`~nodulenet.io.orientation.Reorientation`). Every mapping here is that affine map, applied to
voxel-centre indices: box corners go through it as the index half a voxel inside them (``corner - 0.5``) and come
back out as corners (``+ 0.5``); all eight corners are mapped, since a flipped or rotated axis swaps them.

Masks stay CROP-LOCAL all the way: each detection's probability crop is resampled (trilinear, then > 0.5) onto
just the block of canonical voxels its crop covers, never onto a full-size volume per detection, and re-indexed
onto the original grid; for an oblique scan it is resampled straight onto the block of original voxels it covers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nodulenet.io.findings import NoduleMask
from nodulenet.preprocess.resample import CaseTransform

MASK_PROBABILITY_THRESHOLD = 0.5  # the published binarisation of mask probabilities


@dataclass(frozen=True)
class MappedDetection:
    """One detection on the original scan (fields as in the module docstring)."""

    score: float
    box_preprocessed: tuple[float, float, float, float, float, int | float]
    box_original: tuple[float, float, float, float, float, float]  # corner frame, fractional original voxels
    box_zyx: tuple[int, int, int, int, int, int]  # original voxels whose centres lie in the box (clipped)
    center_zyx: tuple[float, float, float]  # box centre, fractional original voxel index
    center_world_xyz_mm: tuple[float, float, float]
    size_mm_zyx: tuple[float, float, float]  # box extent in mm
    mask: NoduleMask | None


def box_to_original(box: np.ndarray, transform: CaseTransform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(box in original corner frame, centre as original index, centre in world mm) of a preprocessed box."""
    box = np.asarray(box, dtype=np.float64)
    corners = np.array(list(itertools.product(*[(box[a], box[3 + a]) for a in range(3)])))
    mapped = transform.preprocessed_to_original_index(corners - 0.5) + 0.5
    lo, hi = mapped.min(axis=0), mapped.max(axis=0)
    centre_pre = (box[:3] + box[3:]) / 2.0 - 0.5
    centre = transform.preprocessed_to_original_index(centre_pre)
    world = transform.preprocessed_to_world(centre_pre)
    return np.concatenate([lo, hi]), centre, world


def integer_box(box_corner: np.ndarray, shape_zyx: tuple[int, int, int]) -> tuple[int, int, int, int, int, int]:
    """Voxels whose centres lie inside a corner-frame box, clipped to the grid; at least the centre voxel."""
    box_corner = np.asarray(box_corner, dtype=np.float64)
    lo = np.ceil(box_corner[:3] - 0.5).astype(np.int64)
    hi = np.floor(box_corner[3:] - 0.5).astype(np.int64) + 1
    centre = np.floor((box_corner[:3] + box_corner[3:]) / 2.0).astype(np.int64)
    shape = np.asarray(shape_zyx, dtype=np.int64)
    centre = np.clip(centre, 0, shape - 1)
    lo = np.clip(np.minimum(lo, centre), 0, shape - 1)
    hi = np.clip(np.maximum(hi, centre + 1), 1, shape)
    return tuple(int(v) for v in (*lo, *hi))  # type: ignore[return-value]


def _mask_on_canonical(probs: np.ndarray, crop_box: tuple[int, ...], transform: CaseTransform,
                       threshold: float) -> NoduleMask | None:
    """The crop's mask on the canonical grid (the original one when the scan needed no reorientation)."""
    crop_lo = np.asarray(crop_box[:3], dtype=np.float64) + np.asarray(transform.crop_start_zyx, dtype=np.float64)
    crop_hi = crop_lo + np.asarray(probs.shape, dtype=np.float64)  # resampled indices, exclusive
    scale = np.asarray(transform.scale_zyx, dtype=np.float64)
    shape = np.asarray(transform.canonical.shape_zyx, dtype=np.int64)
    # Canonical index o covers resampled position o / scale; keep o with o / scale in [lo - 0.5, hi - 0.5].
    eps = 1e-9
    out_lo = np.maximum(np.ceil((crop_lo - 0.5) * scale - eps).astype(np.int64), 0)
    out_hi = np.minimum(np.floor((crop_hi - 0.5) * scale + eps).astype(np.int64) + 1, shape)
    if np.any(out_hi <= out_lo):
        return None
    out_shape = tuple(int(v) for v in out_hi - out_lo)
    # Output index q -> crop index (q + out_lo) / scale - crop_lo: a diagonal affine map (scipy takes the diagonal).
    resampled = ndimage.affine_transform(
        probs, 1.0 / scale, offset=out_lo / scale - crop_lo, output_shape=out_shape, order=1, mode="nearest",
    )
    binary = resampled > threshold
    if not binary.any():
        return None
    return NoduleMask(binary, tuple(int(v) for v in out_lo)).tight()  # type: ignore[arg-type]


def _mask_on_oblique_original(probs: np.ndarray, crop_box: tuple[int, ...], transform: CaseTransform,
                              threshold: float) -> NoduleMask | None:
    """The crop's mask resampled straight onto the original voxels of an oblique (resampled) scan: one trilinear
    interpolation, as for an axis-aligned scan, instead of a second resampling of an already binary mask."""
    assert transform.orientation is not None
    crop_lo = np.asarray(crop_box[:3], dtype=np.float64) + np.asarray(transform.crop_start_zyx, dtype=np.float64)
    size = np.asarray(probs.shape, dtype=np.float64)
    scale = np.asarray(transform.scale_zyx, dtype=np.float64)
    # Original index q -> canonical c = M q + t -> crop index p = c / scale - crop_lo.
    m, t = transform.orientation.input_to_canonical_affine()
    matrix = m / scale[:, None]
    offset = t / scale - crop_lo
    # The original voxels whose centres can fall inside the crop: the box of its corners, mapped back.
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in size])))
    back = transform.orientation.canonical_to_input_index((corners + crop_lo) * scale)
    shape = np.asarray(transform.original.shape_zyx, dtype=np.int64)
    out_lo = np.maximum(np.ceil(back.min(axis=0) - 1e-9).astype(np.int64), 0)
    out_hi = np.minimum(np.floor(back.max(axis=0) + 1e-9).astype(np.int64) + 1, shape)
    if np.any(out_hi <= out_lo):
        return None
    out_shape = tuple(int(v) for v in out_hi - out_lo)
    resampled = ndimage.affine_transform(probs, matrix, offset=matrix @ out_lo + offset, output_shape=out_shape,
                                         order=1, mode="nearest")
    # mode="nearest" extends edge values half a voxel past the outer centres (as above); beyond that is outside.
    grid = np.indices(out_shape, dtype=np.float64).reshape(3, -1).T + out_lo
    p = grid @ matrix.T + offset
    inside = np.all((p >= -0.5) & (p <= size - 0.5), axis=1).reshape(out_shape)
    binary = (resampled > threshold) & inside
    if not binary.any():
        return None
    return NoduleMask(binary, tuple(int(v) for v in out_lo)).tight()  # type: ignore[arg-type]


def mask_to_original(probs: np.ndarray, crop_box: tuple[int, ...], transform: CaseTransform,
                     threshold: float = MASK_PROBABILITY_THRESHOLD) -> NoduleMask | None:
    """Resample one crop-local probability mask onto the original grid; None if no original voxel is inside.

    ``crop_box`` is the integer preprocessed box the crop covers. Original voxels are sampled where their centre
    falls within the crop's voxels (half a voxel past the outer centres: edge values extend there).
    """
    probs = np.asarray(probs, dtype=np.float32)
    orientation = transform.orientation
    if orientation is not None and orientation.resampled:
        return _mask_on_oblique_original(probs, crop_box, transform, threshold)
    mask = _mask_on_canonical(probs, crop_box, transform, threshold)
    if mask is None or orientation is None:
        return mask
    return NoduleMask(*orientation.crop_to_input(mask.array, mask.offset_zyx))


def map_detection(box: np.ndarray, score: float, transform: CaseTransform, mask_probs: np.ndarray | None = None,
                  mask_box: tuple[int, ...] | None = None) -> MappedDetection:
    """Everything about one preprocessed detection, on the original scan."""
    box = np.asarray(box, dtype=np.float64)
    box_orig, centre, world = box_to_original(box, transform)
    size_mm = (box[3:] - box[:3]) * np.asarray(transform.resampled.spacing_zyx)
    if transform.orientation is not None:  # in the original's axis order (nearest axes for an oblique scan)
        size_mm = size_mm[np.argsort(transform.orientation.axes)]
    mask = None
    if mask_probs is not None and mask_box is not None:
        mask = mask_to_original(mask_probs, mask_box, transform)
    return MappedDetection(
        score=float(score),
        box_preprocessed=tuple(float(v) for v in box),  # type: ignore[arg-type]
        box_original=tuple(float(v) for v in box_orig),  # type: ignore[arg-type]
        box_zyx=integer_box(box_orig, transform.original.shape_zyx),
        center_zyx=tuple(float(v) for v in centre),  # type: ignore[arg-type]
        center_world_xyz_mm=tuple(float(v) for v in world),  # type: ignore[arg-type]
        size_mm_zyx=tuple(float(v) for v in size_mm),  # type: ignore[arg-type]
        mask=mask,
    )
