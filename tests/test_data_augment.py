"""Augmentation moves image, masks and boxes together.

Golden references: MONAI's ``Flip``/``Rotate90`` image transforms and ``flip_boxes``/``rot90_boxes`` box operations
(an independent implementation) for the exact transforms; for free rotation and zoom, the bright sphere in the
transformed IMAGE is the truth that the transformed mask and box must sit on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nodulenet.data.augment import (
    Orientation,
    augment_intensity,
    box_from_mask,
    orientation_matrix,
    place,
    resample_image,
    resample_mask,
)
from nodulenet.data.cases import CaseNodule, PreparedCase
from nodulenet.data.config import AugmentConfig, CropConfig
from nodulenet.data.nrrd_mmap import RawNrrdLayout
from nodulenet.data.sampling import CropSpec, make_crop
from nodulenet.io.volume import Geometry

SHAPE = (72, 80, 76)
CENTER = (37.3, 41.6, 35.2)  # off the voxel grid on purpose
RADIUS = 6.5
CROP = (48, 48, 48)


def sphere_case() -> PreparedCase:
    """A uint8 volume with one bright sphere (200 on 40) and its mask, as a PreparedCase held in memory."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    inside = (z - CENTER[0]) ** 2 + (y - CENTER[1]) ** 2 + (x - CENTER[2]) ** 2 <= RADIUS**2
    image = np.where(inside, 200, 40).astype(np.uint8)
    idx = np.argwhere(inside)
    lo, hi = idx.min(0), idx.max(0) + 1
    nodule = CaseNodule(1, inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), tuple(int(v) for v in lo),
                        (0.0, 0.0, 0.0), 2 * RADIUS)
    lung_points = np.argwhere(~inside)[::97].astype(np.int16)
    return PreparedCase("sphere", Path("."), "sphere", Geometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
                        RawNrrdLayout(Path("memory"), 0, "u1", SHAPE), [nodule], [], lung_points, _image=image)


def paste(mask: np.ndarray, origin: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    o = np.asarray(origin)
    out[o[0]:o[0] + mask.shape[0], o[1]:o[1] + mask.shape[1], o[2]:o[2] + mask.shape[2]] = mask
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


EXACT = [
    Orientation(),
    Orientation(flip_zyx=(True, False, False)),
    Orientation(flip_zyx=(False, True, False)),
    Orientation(flip_zyx=(False, False, True)),
    Orientation(quarter_turns=1),
    Orientation(quarter_turns=2),
    Orientation(quarter_turns=3),
    Orientation(flip_zyx=(True, True, False), quarter_turns=1),
    Orientation(flip_zyx=(True, False, True), quarter_turns=3),
]


@pytest.mark.parametrize("orientation", EXACT, ids=lambda o: f"flip{o.flip_zyx}-q{o.quarter_turns}")
def test_exact_transforms_match_monai(orientation: Orientation) -> None:
    from monai.apps.detection.transforms.box_ops import flip_boxes, rot90_boxes
    from monai.transforms import Flip, Rotate90

    case = sphere_case()
    lo = np.array([10, 12, 9])  # the crop block in the source, before any flip/rotation
    block_center = lo + (np.asarray(CROP) - 1) / 2.0
    transform = place(orientation, block_center, (np.asarray(CROP) - 1) / 2.0, CROP)
    assert transform.signed_permutation is not None  # the exact (no interpolation) path
    mine = resample_image(case.image, transform, 170.0)
    nodule = case.nodules[0]
    moved = resample_mask(nodule.mask, nodule.mask_origin_zyx, transform)
    assert moved is not None
    my_box = box_from_mask(moved[0].shape, moved[1], 0.0)

    # MONAI on the untransformed block: our Q = R90 @ F means "rotate, then flip" as image operations, and our
    # quarter turn k (y -> x direction of the source) is np.rot90 with -k on axes (y, x) - derived by hand from
    # orientation_matrix: out[z, y, x] = src[z, S-1-x, y] for k = 1.
    block = case.image[lo[0]:lo[0] + CROP[0], lo[1]:lo[1] + CROP[1], lo[2]:lo[2] + CROP[2]].astype(np.float32)
    ref = torch.from_numpy(block)[None]
    k = (-orientation.quarter_turns) % 4
    ref = Rotate90(k=k, spatial_axes=(1, 2))(ref)
    flip_axes = [a for a, f in enumerate(orientation.flip_zyx) if f]
    if flip_axes:
        ref = Flip(spatial_axis=flip_axes)(ref)
    np.testing.assert_array_equal(mine, np.asarray(ref[0]))

    src_box = np.asarray([[*(np.asarray(nodule.mask_origin_zyx) - lo),
                           *(np.asarray(nodule.mask_origin_zyx) - lo + np.asarray(nodule.mask.shape))]], dtype=np.float64)
    ref_box = rot90_boxes(src_box, CROP, k=k, axes=(1, 2))
    if flip_axes:
        ref_box = flip_boxes(ref_box, CROP, flip_axes=flip_axes)
    np.testing.assert_array_equal(my_box, ref_box[0])
    # And the mask is exactly the bright voxels of the transformed image.
    np.testing.assert_array_equal(paste(*moved, CROP), mine > 120)


FREE = [
    Orientation(angle_deg=37.0),
    Orientation(angle_deg=-121.5, flip_zyx=(True, False, True)),
    Orientation(scale=0.75),
    Orientation(scale=1.25, quarter_turns=1),
    Orientation(angle_deg=63.0, scale=1.2, flip_zyx=(False, True, True), quarter_turns=2),
    Orientation(angle_deg=170.0, scale=0.8, flip_zyx=(True, True, True)),
]


@pytest.mark.parametrize("orientation", FREE, ids=lambda o: f"a{o.angle_deg}-s{o.scale}")
def test_free_rotation_and_zoom_keep_mask_and_box_on_the_nodule(orientation: Orientation) -> None:
    case = sphere_case()
    target = np.array([20.0, 27.5, 23.25])
    transform = place(orientation, np.asarray(CENTER), target, CROP)
    assert transform.signed_permutation is None
    image = resample_image(case.image, transform, 0.0)  # pad 0: outside the volume must not look bright
    nodule = case.nodules[0]
    moved = resample_mask(nodule.mask, nodule.mask_origin_zyx, transform)
    assert moved is not None
    mask = paste(*moved, CROP)
    bright = image > 120.0  # half way between the sphere (200) and its background (40)
    assert dice(mask, bright) > 0.9
    box = box_from_mask(moved[0].shape, moved[1], 0.0)
    idx = np.argwhere(bright)
    np.testing.assert_allclose(box[:3], idx.min(0), atol=1.0)
    np.testing.assert_allclose(box[3:], idx.max(0) + 1, atol=1.0)
    # The sphere's centre goes where it was placed; its size scales with the zoom (hand-computed golden values).
    np.testing.assert_allclose(idx.mean(0), target, atol=0.5)
    np.testing.assert_allclose(box[3:] - box[:3], 2 * RADIUS * orientation.scale, atol=2.0)


def test_every_random_crop_keeps_masks_on_the_nodule() -> None:
    case = sphere_case()
    crop = CropConfig(crop_size_zyx=CROP, positive_margin_voxels=4, positive_fraction=0.5, random_fraction=0.25,
                      lung_fraction=0.25, pad_value=0)
    aug = AugmentConfig(intensity_probability=0.0)
    kinds = {"positive": 0, "random": 0, "lung": 0}
    for i in range(24):
        kind = ("positive", "positive", "random", "lung")[i % 4]
        sample = make_crop(case, CropSpec(kind, 0, 0), crop, aug, np.random.default_rng(i))
        raw = sample.image * 128.0 + 128.0
        bright = raw > 120.0
        if kind == "positive":
            assert len(sample.masks) == 1
            o = sample.info["orientation"]
            s = o["scale"]
            b = sample.boxes[0]
            # Nodule inside the crop by the margin (its bright voxels), box = mask bbox grown by 4 per side.
            idx = np.argwhere(bright)
            assert idx.min() >= 4 - 1 and np.all(idx.max(0) <= np.asarray(CROP) - 4)
            assert 0.75 <= s <= 1.25
            np.testing.assert_allclose(b[3:] - b[:3], np.asarray(sample.masks[0].shape) + 8)
        for m, origin in zip(sample.masks, sample.mask_origins):
            pasted = paste(m, tuple(origin), CROP)
            # Nodules cut by the crop border are compared where they are inside.
            assert dice(pasted, bright) > 0.85, (kind, i, sample.info)
        if not sample.masks:
            assert bright.sum() < 30  # no nodule in the crop: no bright blob either (a few border voxels at most)
        kinds[kind] += 1
    assert kinds == {"positive": 12, "random": 6, "lung": 6}


def test_box_border_is_half_on_each_side() -> None:
    # Mask bbox [3, 5, 7] .. [3+4, 5+6, 7+2) grown by 8/2 = 4 voxels per side (published bbox_border = 8).
    np.testing.assert_array_equal(box_from_mask((4, 6, 2), (3, 5, 7), 8), [-1, 1, 3, 11, 15, 13])


def test_orientation_matrix_is_orthogonal_and_quarter_turns_are_integers() -> None:
    for k in range(4):
        q = orientation_matrix((True, False, True), k, 0.0)
        np.testing.assert_array_equal(q, np.round(q))
        np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    q = orientation_matrix((False, False, False), 0, 30.0)
    np.testing.assert_allclose(q[1:, 1:], [[np.cos(np.pi / 6), -0.5], [0.5, np.cos(np.pi / 6)]])


def test_intensity_shift_scale_and_noise() -> None:
    base = np.linspace(-1, 1, 4096, dtype=np.float32).reshape(16, 16, 16)
    shift_only = AugmentConfig(intensity_probability=1.0, intensity_scale=0.0, noise_sigma=0.0, intensity_shift=0.1)
    out = augment_intensity(base.copy(), np.random.default_rng(3), shift_only)
    d = out - base
    assert np.ptp(d) < 1e-6 and 0 < abs(float(d.mean())) <= 0.1
    noise_only = AugmentConfig(intensity_probability=1.0, intensity_scale=0.0, intensity_shift=0.0, noise_sigma=0.05)
    out = augment_intensity(base.copy(), np.random.default_rng(3), noise_only)
    assert abs(float((out - base).std()) - 0.05) < 0.003
    again = augment_intensity(base.copy(), np.random.default_rng(3), noise_only)
    np.testing.assert_array_equal(out, again)
    off = augment_intensity(base.copy(), np.random.default_rng(3), AugmentConfig(enabled=False))
    np.testing.assert_array_equal(off, base)
