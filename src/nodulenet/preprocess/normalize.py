"""Hounsfield units -> uint8 network input, and padding of everything outside the lungs.

Conventions: arrays ``(z, y, x)``; the lung masks are on the same grid as the image.

The mapping is the published NoduleNet one (``HU2uint8`` in ``uci-cbcl/NoduleNet``)::

    u = clip((hu - hu_min) / (hu_max - hu_min), 0, 1) * 255,   stored as floor(u)   (numpy's astype truncation)

With the default window [-1200, 600]: -1200 -> 0, 600 -> 255, -300 -> floor(127.5) = 127, 0 (water) -> 170,
which is why 170 is the pad value: padded regions look like water, not like air or bone. NaN (never produced
by our readers, but possible in a float file) is treated as ``hu_min``.
"""

from __future__ import annotations

import numpy as np

from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig


def hu_to_uint8(hu: np.ndarray, hu_min: float = -1200.0, hu_max: float = 600.0) -> np.ndarray:
    """Window HU to ``[hu_min, hu_max]`` and map linearly to ``0..255`` (truncating), as a new uint8 array."""
    if not hu_max > hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be above hu_min ({hu_min})")
    # float32 halves the memory of float64 on a 40-million-voxel scan; exact window points (e.g. -300 ->
    # 0.5 * 255 = 127.5) are exactly representable, so the golden values do not depend on it.
    scaled = np.asarray(hu, dtype=np.float32) - np.float32(hu_min)
    scaled /= np.float32(hu_max - hu_min)
    np.nan_to_num(scaled, copy=False, nan=0.0)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= np.float32(255.0)
    return scaled.astype(np.uint8)  # truncation toward zero = floor for these non-negative values


def apply_lung_mask(
    image_u8: np.ndarray,
    kept: np.ndarray,
    lungs: np.ndarray | None = None,
    pad_value: int = 170,
    remove_bone: bool = False,
    bone_threshold: int = 210,
) -> np.ndarray:
    """Set voxels outside ``kept`` (the dilated lung mask) to ``pad_value``; optionally remove bone.

    Bone removal (``remove_bone``) only touches the dilation ring ``kept & ~lungs``: values above
    ``bone_threshold`` there (ribs, spine next to the lung) become ``pad_value``. It never touches the lungs
    themselves, where a bright voxel is a calcified nodule or a vessel, not bone.
    """
    if image_u8.shape != kept.shape:
        raise ValueError(f"image {image_u8.shape} and mask {kept.shape} must have the same shape")
    out = np.where(kept, image_u8, np.uint8(pad_value)).astype(np.uint8, copy=False)
    if remove_bone:
        if lungs is None:
            raise ValueError("remove_bone needs the undilated lung mask to know the dilation ring")
        ring = kept & (lungs == 0)
        out[ring & (out > bone_threshold)] = np.uint8(pad_value)
    return out


def normalize_ct(ct_hu: Volume, kept: np.ndarray, lungs: np.ndarray, config: PrepareConfig) -> Volume:
    """HU volume -> uint8 volume on the same grid, padded outside the kept lung region, per ``config``."""
    image = hu_to_uint8(ct_hu.array, config.hu_min, config.hu_max)
    image = apply_lung_mask(image, kept, lungs, config.pad_value, config.remove_bone, config.bone_threshold)
    return ct_hu.with_array(image)
