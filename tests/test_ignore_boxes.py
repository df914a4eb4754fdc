"""Excluded findings are ignored in the training loss (issue 19): the crops carry them as ignore boxes, moved with
the image, and the targets take no negative (RPN anchor, hard negative or RCNN background) near one.

Golden labels are worked out by hand from the boxes; the augmentation check paints the excluded finding into the
image and compares its box with where its voxels land; the training-step check counts from the targets the model
really computed, with the same crop without its ignore box as the control.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from nodulenet.data.cases import load_case
from nodulenet.data.config import AugmentConfig, CropConfig
from nodulenet.data.dataset import collate_crops
from nodulenet.data.sampling import CropSpec, make_crop
from nodulenet.model.targets import (assign_rpn_targets_batched, draw_rcnn_keys, near_ignore_boxes,
                                     sample_rcnn_batched)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GT = [0.0, 0.0, 0.0, 10.0, 10.0, 10.0]
IGNORE = [20.0, 20.0, 20.0, 50.0, 50.0, 50.0]  # a 30-voxel excluded finding


def _rpn_labels(anchors: torch.Tensor, ignore: torch.Tensor | None, ignore_valid: torch.Tensor | None) -> list:
    gt = torch.tensor([[GT], [GT]])
    return assign_rpn_targets_batched(anchors, gt, torch.ones(2, 1, dtype=torch.bool), ignore_boxes=ignore,
                                      ignore_valid=ignore_valid).labels.tolist()


def test_rpn_anchor_near_an_ignore_box_is_neither_positive_nor_negative() -> None:
    anchors = torch.tensor([
        GT,                                    # 0: the nodule itself: positive
        [33.0, 33.0, 33.0, 37.0, 37.0, 37.0],  # 1: centre inside, IoU 64/27000 = 0.002: negative by IoU alone
        [60.0, 60.0, 60.0, 70.0, 70.0, 70.0],  # 2: far from both: negative
        [40.0, 40.0, 40.0, 60.0, 60.0, 60.0],  # 3: centre 50 on the (exclusive) edge, IoU 1000/34000 = 0.029
        [18.0, 18.0, 18.0, 22.0, 22.0, 22.0],  # 4: centre 20 on the inclusive edge, IoU 8/27056
    ])
    assert _rpn_labels(anchors, None, None) == [[1, 0, 0, 0, 0]] * 2
    # Image 0 has the finding; image 1 has none, only a padding row, which covers anchor 2 and must not count;
    # image 0's padding row covers anchor 2 too.
    ignore = torch.tensor([[IGNORE, [55.0, 55.0, 55.0, 75.0, 75.0, 75.0]],
                           [[55.0, 55.0, 55.0, 75.0, 75.0, 75.0], [0.0] * 6]])
    valid = torch.tensor([[True, False], [False, False]])
    assert _rpn_labels(anchors, ignore, valid) == [[1, -1, 0, -1, -1], [1, 0, 0, 0, 0]]
    # A nodule's positive stays positive when an ignore box covers it.
    over_gt = torch.tensor([[[-5.0, -5.0, -5.0, 15.0, 15.0, 15.0]]] * 2)
    assert _rpn_labels(anchors, over_gt, torch.ones(2, 1, dtype=torch.bool)) == [[1, 0, 0, 0, 0]] * 2


def test_rcnn_never_samples_background_near_an_ignore_box() -> None:
    inside = [30.0, 30.0, 30.0, 40.0, 40.0, 40.0]  # centre 35, IoU 1000/27000 = 0.037 < bg_iou: background by IoU
    far = [60.0, 60.0, 60.0, 70.0, 70.0, 70.0]
    proposals = torch.tensor([[inside, far], [inside, far]])
    proposal_valid = torch.ones(2, 2, dtype=torch.bool)
    gt = torch.tensor([[GT], [[0.0] * 6]])
    gt_valid = torch.tensor([[True], [False]])  # image 1 has no nodule: its background is drawn from all proposals
    keys = draw_rcnn_keys(2, 3, 8, torch.Generator().manual_seed(0), torch.device("cpu"))

    def sample(ignore: torch.Tensor | None) -> list[list[tuple[list[float], int]]]:
        out = sample_rcnn_batched(proposals, proposal_valid, gt, gt_valid, keys, batch_size=8,
                                  ignore_boxes=ignore, ignore_valid=None if ignore is None else
                                  torch.ones(2, 1, dtype=torch.bool))
        return [[(out.proposals[b, s].tolist(), int(out.labels[b, s])) for s in range(8) if out.valid[b, s]]
                for b in range(2)]

    plain = sample(None)
    assert (inside, 0) in plain[0] and (inside, 0) in plain[1]  # control: without the box it is background
    ignored = sample(torch.tensor([[IGNORE], [IGNORE]]))
    # Image 0: the nodule (foreground) and 7 background slots, all the far proposal (drawn with replacement).
    assert ignored[0] == [(GT, 1)] + [(far, 0)] * 7
    # Image 1 (no nodule): the far proposal only, once (without replacement, as published).
    assert ignored[1] == [(far, 0)]
    # Large proposals that cover the finding from outside are near it by IoU.
    # (centre 50 outside, IoU 15625/136375 = 0.115 >= bg_iou 0.1)
    assert near_ignore_boxes(torch.tensor([[[25.0, 25.0, 25.0, 75.0, 75.0, 75.0]]]), torch.tensor([[IGNORE]]),
                             torch.ones(1, 1, dtype=torch.bool), 0.1).tolist() == [[True]]


@pytest.fixture(scope="module")
def case(phantom_root: Path):
    return load_case(phantom_root / "phantom-00001")


def _next_to_nodule(case) -> np.ndarray:
    """A point 16 voxels from the case's first nodule: a crop built on the nodule often holds it whole."""
    centre = np.asarray(case.nodules[0].center_zyx) + np.array([0.0, 13.0, -9.0])
    return np.clip(centre, 10, np.asarray(case.shape_zyx) - 11)


def _with_excluded(case, centre_zyx: np.ndarray, diameter_mm: float, image: np.ndarray | None = None):
    world = case.geometry.voxel_to_world(centre_zyx)
    changes = {"excluded_nodules": [{"center_world_xyz_mm": [float(v) for v in world], "diameter_mm": diameter_mm}]}
    if image is not None:
        changes["_image"] = image
    return dataclasses.replace(case, **changes)


def test_ignore_box_lands_where_the_excluded_findings_voxels_land(case) -> None:
    """Paint the excluded finding (a 14 mm ball) into a blank copy of the case, crop with flips, 90-degree turns,
    free rotations and zoom, and compare its ignore box with the painted voxels in the crop."""
    shape = np.asarray(case.shape_zyx)
    centre = _next_to_nodule(case)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1)
    radius_mm = 7.0
    ball = np.linalg.norm((grid - centre) * np.asarray(case.geometry.spacing_zyx), axis=-1) <= radius_mm
    image = np.where(ball, 255, 0).astype(np.uint8)
    painted = _with_excluded(case, centre, 2 * radius_mm, image)
    crop = CropConfig(crop_size_zyx=(48, 48, 48), positive_fraction=1.0)
    aug = AugmentConfig(intensity_probability=0.0)
    checked = scales = 0
    for k in range(40):
        sample = make_crop(painted, CropSpec("positive", 0, nodule_index=0), crop, aug, np.random.default_rng([7, k]))
        # Painted voxels: 255 -> +0.99, blank 0 -> -1, padding 170 -> +0.33; linear interpolation at the edges.
        voxels = np.argwhere(sample.image > 0.66)
        touches_edge = len(voxels) and (voxels.min() == 0 or np.any(voxels.max(0) == 47))
        if len(voxels) == 0:
            continue
        assert sample.ignore_boxes.shape == (1, 6), f"crop {k}: the finding is in the crop but has no ignore box"
        if touches_edge:
            continue
        box = sample.ignore_boxes[0].astype(np.float64)
        scale = sample.info["orientation"]["scale"]
        # Box coordinate = voxel index + 0.5, as for the nodules' mask boxes.
        np.testing.assert_allclose((box[:3] + box[3:]) / 2.0 - 0.5, voxels.mean(0), atol=0.35)
        half = (box[3:] - box[:3]) / 2.0 - crop.box_border_voxels / 2.0  # the radius in crop voxels
        np.testing.assert_allclose(half, radius_mm * scale, rtol=1e-5)
        extent = (voxels.max(0) - voxels.min(0) + 1) / 2.0
        # (the 0.66 threshold takes a little off each side of the interpolated ball)
        assert np.all(np.abs(extent - half) <= 1.5), (extent, half)
        checked += 1
        scales += scale != 1.0
    assert checked >= 15 and scales >= 10


def test_training_step_takes_no_negative_inside_an_excluded_finding(case) -> None:
    """A crop holding an excluded finding: the RPN targets the model computes label no anchor whose centre lies in
    it negative, and no RCNN background sample sits in it; the same crop without its ignore box does both."""
    from torch.profiler import ProfilerActivity, profile

    import nodulenet.model.nodulenet as assembly
    from nodulenet.model import NoduleNet, tiny_config
    from nodulenet.train.run_setup import to_targets

    excluded = _with_excluded(case, _next_to_nodule(case), 12.0)
    crop = CropConfig(crop_size_zyx=(64, 64, 64), positive_fraction=1.0)
    samples = []
    for k in range(30):
        s = make_crop(excluded, CropSpec("positive", 0, nodule_index=0), crop, AugmentConfig(),
                      np.random.default_rng([3, k]))
        if len(s.ignore_boxes) and np.all(s.ignore_boxes[0, :3] > 4) and np.all(s.ignore_boxes[0, 3:] < 60):
            samples.append(s)
        if len(samples) == 2:
            break
    assert len(samples) == 2, "no crop holds the excluded finding whole"
    batch = collate_crops(samples)

    seen: dict[str, list] = {"rpn": [], "rcnn": []}
    real_rpn, real_rcnn = assembly.assign_rpn_targets_batched, assembly.sample_rcnn_batched

    def rpn(anchors, *args, **kwargs):
        out = real_rpn(anchors, *args, **kwargs)
        seen["rpn"].append((anchors, out.labels))
        return out

    def rcnn(*args, **kwargs):
        out = real_rcnn(*args, **kwargs)
        seen["rcnn"].append(out)
        return out

    torch.manual_seed(0)
    model = NoduleNet(tiny_config())
    model.train()
    boxes = torch.from_numpy(np.stack([s.ignore_boxes[0] for s in samples]))  # [2, 6]
    counts = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assembly, "assign_rpn_targets_batched", rpn)
        mp.setattr(assembly, "sample_rcnn_batched", rcnn)
        for name, b in (("ignored", batch), ("control", dataclasses.replace(batch, ignore_boxes=[]))):
            seen["rpn"].clear()
            seen["rcnn"].clear()
            targets = to_targets(b, torch.device("cpu"))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                losses = model(batch.images, targets, mode="train", stages=("rpn", "rcnn"),
                               generator=torch.Generator().manual_seed(1))
            assert torch.isfinite(losses["total"])
            # The ignore boxes add no host synchronisation to the step (as tests/test_train_step_equality.py).
            assert not [e.key for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")]
            anchors, labels = seen["rpn"][0]
            centres = (anchors[:, :3] + anchors[:, 3:]) / 2.0
            inside = ((centres[None] >= boxes[:, None, :3]) & (centres[None] < boxes[:, None, 3:])).all(-1)  # [2, A]
            sampled = seen["rcnn"][0]
            bg = sampled.valid & (sampled.labels == 0)
            p_centres = (sampled.proposals[..., :3] + sampled.proposals[..., 3:]) / 2.0
            p_inside = ((p_centres >= boxes[:, None, :3]) & (p_centres < boxes[:, None, 3:])).all(-1)
            counts[name] = (int((inside & (labels == 0)).sum()), int((inside & (labels == -1)).sum()),
                            int((bg & p_inside).sum()), int(bg.sum()))
    neg_in, ignored_in, bg_in, n_bg = counts["ignored"]
    assert neg_in == 0 and ignored_in > 100
    assert bg_in == 0 and n_bg > 0
    control_neg_in = counts["control"][0]
    assert control_neg_in > 100, counts  # without the ignore box the finding's anchors are background
