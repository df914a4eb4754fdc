"""HU -> uint8 normalisation and padding outside the lung mask.

Golden values are computed by hand from the published formula ``floor(clip((hu + 1200) / 1800, 0, 1) * 255)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.normalize import apply_lung_mask, hu_to_uint8, normalize_ct


@pytest.mark.parametrize(
    ("hu", "expected"),
    [
        (-1200.0, 0),  # window bottom
        (600.0, 255),  # window top
        (-300.0, 127),  # 900 / 1800 * 255 = 127.5, truncated like numpy's astype(uint8) in the published code
        (0.0, 170),  # water: 1200 / 1800 * 255 = 170 exactly, the published pad value
        (100.0, 184),  # 1300 / 1800 * 255 = 184.17
        (-1199.0, 0),  # 1 / 1800 * 255 = 0.14
        (-3024.0, 0),  # scanner padding clips to 0
        (3071.0, 255),  # metal / maximum CT value clips to 255
        (float("nan"), 0),  # NaN counts as the window bottom
    ],
)
def test_hu_to_uint8_golden_values(hu: float, expected: int) -> None:
    out = hu_to_uint8(np.array([[[hu]]], dtype=np.float32))
    assert out.dtype == np.uint8
    assert int(out[0, 0, 0]) == expected


def test_hu_to_uint8_matches_the_published_float64_formula_on_every_integer_hu() -> None:
    hu = np.arange(-1400, 801, dtype=np.int16).reshape(1, 1, -1)
    published = (np.clip((hu.astype(np.float64) + 1200.0) / 1800.0, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(hu_to_uint8(hu), published)


def test_hu_to_uint8_custom_window() -> None:
    hu = np.array([[[-1000.0, 0.0, 400.0, 1000.0]]])
    # window [-1000, 400]: (hu + 1000) / 1400 * 255 -> 0, 182.14, 255, 255
    np.testing.assert_array_equal(hu_to_uint8(hu, -1000.0, 400.0)[0, 0], [0, 182, 255, 255])
    with pytest.raises(ValueError):
        hu_to_uint8(hu, 100.0, 100.0)


def test_apply_lung_mask_pads_outside_and_removes_bone_only_in_the_ring() -> None:
    image = np.array([[[50, 230, 240, 230]]], dtype=np.uint8)
    lungs = np.array([[[1, 1, 0, 0]]], dtype=np.uint8)  # voxel 1: a calcified nodule inside the lung
    kept = np.array([[[True, True, True, False]]])  # voxel 2: rib in the dilation ring; voxel 3 outside
    np.testing.assert_array_equal(apply_lung_mask(image, kept, lungs)[0, 0], [50, 230, 240, 170])
    with_bone = apply_lung_mask(image, kept, lungs, pad_value=170, remove_bone=True, bone_threshold=210)
    np.testing.assert_array_equal(with_bone[0, 0], [50, 230, 170, 170])
    with pytest.raises(ValueError):
        apply_lung_mask(image, kept, None, remove_bone=True)


def test_normalize_ct_keeps_geometry_and_uses_config() -> None:
    ct = Volume(np.array([[[-300.0, 0.0]]], dtype=np.float32), (1.0, 1.0, 1.0), (5.0, 6.0, 7.0))
    cfg = PrepareConfig(pad_value=0)
    out = normalize_ct(ct, np.array([[[True, False]]]), np.array([[[1, 0]]], dtype=np.uint8), cfg)
    assert out.geometry == ct.geometry
    np.testing.assert_array_equal(out.array[0, 0], [127, 0])
