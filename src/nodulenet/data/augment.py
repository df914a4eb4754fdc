"""Geometric and intensity augmentation that moves the image, the nodule masks and their boxes together.

Conventions: arrays ``(z, y, x)``; voxel index ``k`` is the centre of voxel ``k``; boxes ``(z0, y0, x0, z1, y1, x1)``
voxels of the output crop, upper bounds exclusive; ``raw`` images are the prepared uint8 values, the network sees
``(raw - 128) / 128``.

A crop is ONE mapping from output voxels ``o`` to source voxels ``s`` of the prepared case::

    s = A @ o + offset,   A = Q / scale

with ``Q`` orthogonal: random flips on each axis, a multiple of 90 degrees and a free angle in the axial (y, x)
plane; ``scale`` > 1 makes things bigger. Why this is hand-written rather than a chain of MONAI transforms
(``RandFlipd``, ``RandRotate90d``, ``RandAffined``, ``RandZoomd`` + ``monai.apps.detection`` box transforms):

- one interpolation straight from the memory-mapped case: the crop reads only the source block it needs, nothing is
  resampled twice, and rotated corners are filled with real neighbouring tissue instead of padding;
- boxes are recomputed from each nodule's TRANSFORMED MASK, so they are exact after a free rotation (rotating a
  box's corners, as the detection box transforms do, gives a box larger than the rotated nodule);
- each nodule mask is resampled only over its own small output box (a few thousand voxels, not 128^3);
- every random draw comes from the caller's ``numpy.random.Generator`` seeded per sample, so a sample is the same
  whatever data-loader worker makes it (needed for exact ``--resume``); MONAI's transforms keep their random state
  inside each worker's copy of the transform.

MONAI is used in the tests as the independent reference for flips and 90-degree rotations.
Without a free rotation and at scale 1, ``A`` is a signed permutation and the image is cut and flipped exactly
(no interpolation, ~1 ms for 128^3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .config import AugmentConfig


@dataclass(frozen=True)
class CropTransform:
    """``source_index = matrix @ output_index + offset`` (see the module doc)."""

    matrix: np.ndarray  # [3, 3]
    offset: np.ndarray  # [3]
    out_shape: tuple[int, int, int]

    def to_source(self, points_out: np.ndarray) -> np.ndarray:
        return np.asarray(points_out, dtype=np.float64) @ self.matrix.T + self.offset

    def to_output(self, points_src: np.ndarray) -> np.ndarray:
        return (np.asarray(points_src, dtype=np.float64) - self.offset) @ np.linalg.inv(self.matrix).T

    @property
    def signed_permutation(self) -> tuple[list[int], list[int]] | None:
        """(source axis, sign) of each output axis when the crop is an exact cut-and-flip, else ``None``."""
        a = self.matrix
        if not np.allclose(np.abs(a), np.round(np.abs(a)), atol=1e-9) or not np.allclose(np.abs(a).sum(0), 1.0):
            return None
        if not np.allclose(self.offset, np.round(self.offset), atol=1e-6):
            return None
        perm = [int(np.argmax(np.abs(a[:, i]))) for i in range(3)]
        if sorted(perm) != [0, 1, 2]:
            return None
        return perm, [int(np.sign(a[perm[i], i])) for i in range(3)]


def orientation_matrix(flip_zyx: tuple[bool, bool, bool] = (False, False, False), quarter_turns: int = 0,
                       angle_deg: float = 0.0) -> np.ndarray:
    """Orthogonal ``Q`` (output -> source directions): flips, then ``quarter_turns`` x 90 deg, then ``angle_deg``,
    both rotations in the axial (y, x) plane. Quarter turns use exact integer entries."""
    flips = np.diag([-1.0 if f else 1.0 for f in flip_zyx])
    k = quarter_turns % 4
    c90, s90 = (1, 0, -1, 0)[k], (0, 1, 0, -1)[k]
    quarter = np.array([[1, 0, 0], [0, c90, -s90], [0, s90, c90]], dtype=np.float64)
    t = math.radians(angle_deg)
    free = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    if angle_deg == 0.0:
        free = np.eye(3)
    return free @ quarter @ flips


@dataclass(frozen=True)
class Orientation:
    """A drawn geometric augmentation (JSON-able through :meth:`to_dict`)."""

    flip_zyx: tuple[bool, bool, bool] = (False, False, False)
    quarter_turns: int = 0
    angle_deg: float = 0.0
    scale: float = 1.0

    @property
    def matrix(self) -> np.ndarray:
        return orientation_matrix(self.flip_zyx, self.quarter_turns, self.angle_deg) / self.scale

    def to_dict(self) -> dict[str, Any]:
        return {"flip_zyx": list(self.flip_zyx), "quarter_turns": self.quarter_turns,
                "angle_deg": round(self.angle_deg, 4), "scale": round(self.scale, 5)}


def draw_orientation(rng: np.random.Generator, aug: AugmentConfig,
                     scale_range: tuple[float, float] | None = None) -> Orientation:
    """Random flips / rotations / zoom as configured (identity when ``aug.enabled`` is False).

    ``scale_range`` replaces ``aug.scale_range`` (see :func:`nodule_scale_range`). Every draw is made whether or
    not it is used, so switching one transform off does not change the others' draws.
    """
    flips_u, quarter_u, rot_u, angle_u, scale_u, zoom_u = rng.random(3), rng.random(), rng.random(), rng.random(), \
        rng.random(), rng.random()
    if not aug.enabled:
        return Orientation()
    flips = tuple(bool(f and u < 0.5) for f, u in zip(aug.flip_zyx, flips_u))
    quarter = int(quarter_u * 4) if aug.rot90_axial else 0
    angle = (2.0 * angle_u - 1.0) * aug.rotate_axial_degrees if rot_u < aug.rotate_probability else 0.0
    lo, hi = scale_range if scale_range is not None else aug.scale_range
    scale = lo + (hi - lo) * zoom_u if scale_u < aug.scale_probability else 1.0
    return Orientation(flips, quarter, float(angle), float(scale))  # type: ignore[arg-type]


def nodule_scale_range(aug: AugmentConfig, size_voxels: float, smallest: float = 8.0, largest: float = 120.0
                       ) -> tuple[float, float]:
    """Zoom range for a crop around a nodule of ``size_voxels``: as the published code, a zoom may not shrink it
    below ``smallest`` or grow it beyond ``largest`` voxels, and 1 always stays allowed."""
    lo, hi = aug.scale_range
    size = max(float(size_voxels), 1e-6)
    return min(max(smallest / size, lo), 1.0), max(min(largest / size, hi), 1.0)


def place(orientation: Orientation, anchor_src_zyx: np.ndarray, anchor_out_zyx: np.ndarray,
          out_shape: tuple[int, int, int]) -> CropTransform:
    """The crop transform that puts source point ``anchor_src_zyx`` at output position ``anchor_out_zyx``.

    A pure cut-and-flip (no free angle, scale 1) is snapped to a whole-voxel offset so it stays exact; the anchor
    then lands within half a voxel of the asked position.
    """
    a = orientation.matrix
    offset = np.asarray(anchor_src_zyx, dtype=np.float64) - a @ np.asarray(anchor_out_zyx, dtype=np.float64)
    if orientation.angle_deg == 0.0 and orientation.scale == 1.0:
        offset = np.round(offset)
    return CropTransform(a, offset, tuple(int(s) for s in out_shape))  # type: ignore[arg-type]


def _region(image: np.ndarray, lo: np.ndarray, hi: np.ndarray, pad_value: float) -> np.ndarray:
    """``image[lo:hi]`` (any bounds, even outside the image) with ``pad_value`` where there is no image."""
    shape = np.asarray(image.shape)
    out = np.full(tuple(int(v) for v in hi - lo), pad_value, dtype=image.dtype)
    a, b = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.all(b > a):
        src = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        dst = tuple(slice(int(x - l), int(y - l)) for x, y, l in zip(a, b, lo))
        out[dst] = image[src]
    return out


def resample_image(image: np.ndarray, transform: CropTransform, pad_value: float) -> np.ndarray:
    """The output crop of ``image`` (float32, raw units); reads only the source block it needs."""
    shape = transform.out_shape
    exact = transform.signed_permutation
    if exact is not None:
        perm, signs = exact
        lo = np.zeros(3, dtype=np.int64)
        for i, (j, sgn) in enumerate(zip(perm, signs)):
            start = int(round(transform.offset[j]))
            lo[j] = start if sgn > 0 else start - (shape[i] - 1)
        size = np.array([shape[perm.index(j)] for j in range(3)])
        block = _region(image, lo, lo + size, pad_value)
        block = block[tuple(slice(None, None, -1) if signs[perm.index(j)] < 0 else slice(None) for j in range(3))]
        return np.ascontiguousarray(np.transpose(block, perm), dtype=np.float32)
    corners = np.array([[z, y, x] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1) for x in (0, shape[2] - 1)])
    src = transform.to_source(corners)
    # One voxel beyond what linear interpolation touches, so the region's own edge is never sampled.
    lo = np.floor(src.min(0)).astype(np.int64) - 1
    hi = np.ceil(src.max(0)).astype(np.int64) + 2
    lo_c, hi_c = np.clip(lo, 0, image.shape), np.clip(hi, 0, image.shape)
    if np.any(hi_c <= lo_c):
        return np.full(shape, pad_value, dtype=np.float32)
    block = np.asarray(image[tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c))])
    # Outside the clipped block is outside the case: mode="constant" fills it with the pad value, as padding.
    return ndimage.affine_transform(block, transform.matrix, offset=transform.offset - lo_c, output_shape=shape,
                                    order=1, mode="constant", cval=float(pad_value), output=np.float32)


def resample_mask(mask: np.ndarray, origin_zyx: tuple[int, int, int], transform: CropTransform
                  ) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """A nodule's tight source mask mapped into the crop (nearest neighbour, like the image's voxel grid).

    Returns the new tight mask and its origin in the crop, or ``None`` when no voxel of it is inside the crop.
    """
    shape = np.asarray(transform.out_shape)
    o = np.asarray(origin_zyx, dtype=np.float64)
    ext = np.asarray(mask.shape, dtype=np.float64)
    corners = np.array([[z, y, x] for z in (o[0] - 0.5, o[0] + ext[0] - 0.5) for y in (o[1] - 0.5, o[1] + ext[1] - 0.5)
                        for x in (o[2] - 0.5, o[2] + ext[2] - 0.5)])
    out = transform.to_output(corners)
    lo = np.maximum(np.floor(out.min(0)).astype(np.int64), 0)
    hi = np.minimum(np.ceil(out.max(0)).astype(np.int64) + 1, shape)
    if np.any(hi <= lo):
        return None
    offset = transform.offset + transform.matrix @ lo - o
    moved = ndimage.affine_transform(mask.astype(np.uint8), transform.matrix, offset=offset,
                                     output_shape=tuple(int(v) for v in hi - lo), order=0, mode="constant", cval=0)
    found = ndimage.find_objects(moved)
    if not found or found[0] is None:
        return None
    sl = found[0]
    return moved[sl].astype(bool), tuple(int(lo[i] + sl[i].start) for i in range(3))  # type: ignore[return-value]


def box_from_mask(mask_shape: tuple[int, ...], origin_zyx: tuple[int, int, int], border_voxels: float) -> np.ndarray:
    """Target box of a tight mask: its bounding box grown by ``border_voxels / 2`` on every side (published)."""
    lo = np.asarray(origin_zyx, dtype=np.float32)
    hi = lo + np.asarray(mask_shape, dtype=np.float32)
    half = np.float32(border_voxels / 2.0)
    return np.concatenate([lo - half, hi + half])


def augment_intensity(image: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    """Contrast scale, brightness shift and Gaussian noise on a normalised image (in place when it applies)."""
    apply_u, scale_u, shift_u = rng.random(), rng.random(), rng.random()
    noise_seed = int(rng.integers(2**63))
    if not aug.enabled or apply_u >= aug.intensity_probability:
        return image
    image *= np.float32(1.0 + (2.0 * scale_u - 1.0) * aug.intensity_scale)
    image += np.float32((2.0 * shift_u - 1.0) * aug.intensity_shift)
    if aug.noise_sigma > 0:
        image += np.random.default_rng(noise_seed).standard_normal(image.shape, dtype=np.float32) * np.float32(
            aug.noise_sigma)
    return image
