"""Crop plans per epoch, reproducible samples, the resumable distributed sampler, lung-centred crops."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nodulenet.data.cases import load_case
from nodulenet.data.config import AugmentConfig, CropConfig
from nodulenet.data.dataset import CropDataset, ResumableDistributedSampler, collate_crops, make_loader
from nodulenet.data.sampling import CropSpec, HardNegative, epoch_plan, split_counts
from nodulenet.io.image_files import read_image


@pytest.fixture(scope="module")
def cases(phantom_root: Path) -> list:
    return [load_case(phantom_root / "phantom-00001"), load_case(phantom_root / "phantom-00003")]


def test_split_counts_largest_remainder() -> None:
    # Hand-computed: 10 x (.5, .3, .2, 0) = 5, 3, 2, 0; 7 x thirds = 2.33 each, the one left over goes first in order.
    assert split_counts(10, {"positive": 0.5, "random": 0.3, "lung": 0.2, "hard_negative": 0.0}) == \
        {"positive": 5, "random": 3, "lung": 2, "hard_negative": 0}
    assert split_counts(7, {"positive": 1 / 3, "random": 1 / 3, "lung": 1 / 3, "hard_negative": 0.0}) == \
        {"positive": 3, "random": 2, "lung": 2, "hard_negative": 0}


def test_epoch_plan_visits_every_nodule_once_and_keeps_the_ratio(cases: list) -> None:
    crop = CropConfig(positive_fraction=0.6, random_fraction=0.2, lung_fraction=0.1, hard_negative_fraction=0.1)
    n_nodules = sum(len(c.nodules) for c in cases)
    n = int(round(n_nodules / 0.6))
    plan = epoch_plan(cases, crop, n, seed=0, epoch=0, n_hard_negatives=5)
    kinds = Counter(s.kind for s in plan)
    assert kinds == split_counts(n, crop.fractions)
    visited = Counter((s.case_index, s.nodule_index) for s in plan if s.kind == "positive")
    assert set(visited.values()) == {1} and len(visited) == n_nodules
    assert epoch_plan(cases, crop, n, 0, 0, 5) == plan and epoch_plan(cases, crop, n, 0, 1, 5) != plan
    # Hand-computed for 6 nodules -> 10 crops: .6/.2/.1/.1 -> 6, 2, 1, 1; with nothing mined yet the
    # hard-negative share goes to lung crops: 6, 2, 2.
    assert n_nodules == 6 and kinds == {"positive": 6, "random": 2, "lung": 1, "hard_negative": 1}
    assert Counter(s.kind for s in epoch_plan(cases, crop, n, 0, 0, 0)) == {"positive": 6, "random": 2, "lung": 2}


def test_samples_depend_only_on_seed_epoch_and_index(cases: list) -> None:
    crop = CropConfig(crop_size_zyx=(48, 48, 48), positive_fraction=0.5, lung_fraction=0.5)
    ds = CropDataset(cases, crop, AugmentConfig(), seed=7)
    a = ds[3]
    _ = ds[1]  # another sample in between changes nothing
    b = ds[3]
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    other = CropDataset(cases, crop, AugmentConfig(), seed=7)
    np.testing.assert_array_equal(other[3].image, a.image)
    ds.set_epoch(1)
    assert not np.array_equal(ds[3].image, a.image)


def test_lung_crops_are_centred_in_the_lungs(cases: list) -> None:
    crop = CropConfig(crop_size_zyx=(48, 48, 48), positive_fraction=0.0, lung_fraction=1.0, samples_per_epoch=12)
    ds = CropDataset(cases, crop, AugmentConfig(), seed=1)
    lungs = {c.case_id: read_image(c.case_dir / "lung_mask.nrrd").array for c in cases}
    for i in range(len(ds)):
        s = ds[i]
        assert s.kind == "lung"
        z, y, x = np.round(s.info["anchor_zyx"]).astype(int)
        # The anchor is a lung voxel of the coarse grid plus < stride jitter: lung or its dilation margin.
        assert lungs[s.case_id][z, y, x] in (1, 2, 3)
        p = np.asarray(s.info["anchor_out_zyx"])
        assert np.all(p >= 12 - 0.5) and np.all(p <= 48 - 12 - 0.5)  # placed inside the margin


def test_hard_negative_crop_holds_its_point(cases: list) -> None:
    crop = CropConfig(crop_size_zyx=(48, 48, 48), positive_fraction=0.5, hard_negative_fraction=0.5)
    hn = HardNegative(cases[1].case_id, (40.0, 50.0, 60.0), 0.9)
    ds = CropDataset(cases, crop, AugmentConfig(), seed=1, hard_negatives=[hn])
    hard = [ds[i] for i, s in enumerate(ds.plan) if s.kind == "hard_negative"]
    assert hard and all(s.case_id == hn.case_id and s.info["anchor_zyx"] == [40.0, 50.0, 60.0] for s in hard)


def test_resumable_sampler_skips_exactly_what_was_used() -> None:
    data = list(range(23))
    full = list(ResumableDistributedSampler(data, 1, 0, seed=5))
    assert sorted(full) == data
    s = ResumableDistributedSampler(data, 1, 0, seed=5)
    s.set_start(8)
    assert list(s) == full[8:] and len(s) == 15
    ranks = [list(ResumableDistributedSampler(data, 2, r, seed=5)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12  # torch pads to equal shares
    assert set(ranks[0]) | set(ranks[1]) == set(data)
    s.set_epoch(1)
    s.set_start(0)
    assert list(s) != full


def test_loader_with_workers_gives_the_same_batches(cases: list) -> None:
    crop = CropConfig(crop_size_zyx=(32, 32, 32), samples_per_epoch=6, positive_fraction=0.5, random_fraction=0.5)
    ds = CropDataset(cases, crop, AugmentConfig(), seed=2)
    batches = []
    for workers in (0, 2):
        sampler = ResumableDistributedSampler(ds, 1, 0, seed=2)
        batches.append([b for b in make_loader(ds, sampler, batch_size=2, workers=workers, pin_memory=False)])
    assert len(batches[0]) == 3
    for b0, b1 in zip(*batches):
        assert torch.equal(b0.images, b1.images) and b0.case_ids == b1.case_ids
        assert all(torch.equal(x, y) for x, y in zip(b0.boxes, b1.boxes))
    batch = collate_crops([ds[0], ds[1]])
    assert batch.images.shape == (2, 1, 32, 32, 32) and batch.images.dtype == torch.float32


def test_no_negative_or_hard_negative_crop_is_anchored_on_an_excluded_finding(cases: list) -> None:
    """An LIDC nodule marked by fewer readers (or a LUNA16 annotations_excluded.csv row) is ignored in training:
    no lung, random or hard-negative crop takes a point within its radius as its anchor."""
    import dataclasses

    from nodulenet.data.sampling import make_crop

    case = cases[0]
    # The case's biggest nodule becomes an excluded finding 30 mm across (a ground-glass nodule 2 readers drew).
    big = max(case.nodules, key=lambda n: n.mask.sum())
    centre_zyx = np.asarray(big.center_zyx)
    centre_world = case.geometry.voxel_to_world(centre_zyx)
    radius_mm = 15.0
    spacing = np.asarray(case.geometry.spacing_zyx)
    # Half the lung points the sampler draws from are inside the finding: a sampler that did not look would
    # anchor about half its lung crops on it.
    dist = np.linalg.norm((case.lung_points_zyx - centre_zyx) * spacing, axis=1)
    inside, outside = case.lung_points_zyx[dist < radius_mm - 4], case.lung_points_zyx[dist >= radius_mm + 4]
    assert len(inside) >= 20 and len(outside) >= 20
    points = np.concatenate([inside[:200], outside[: min(len(inside), 200)]])
    excluded_case = dataclasses.replace(
        case, nodules=[n for n in case.nodules if n.id != big.id], lung_points_zyx=points,
        excluded_nodules=[{"center_world_xyz_mm": [float(v) for v in centre_world], "diameter_mm": 2 * radius_mm}])
    crop = CropConfig(crop_size_zyx=(32, 32, 32), positive_fraction=0.0, lung_fraction=1.0, samples_per_epoch=1)
    aug = AugmentConfig()
    on_it = HardNegative(case.case_id, tuple(float(v) for v in centre_zyx), 0.97)  # type: ignore[arg-type]
    anchors = []
    for k in range(120):
        kind = ("lung", "random", "hard_negative")[k % 3]
        spec = CropSpec(kind, 0, hard_negative_index=0 if kind == "hard_negative" else -1)
        sample = make_crop(excluded_case, spec, crop, aug, np.random.default_rng([5, k]),
                           hard_negative=on_it if kind == "hard_negative" else None)
        anchors.append((kind, np.asarray(sample.info["anchor_zyx"])))
        if kind == "hard_negative":  # its mined point is on the excluded finding: a lung anchor replaces it
            assert sample.kind == "hard_negative" and sample.info["anchor_kind"] == "lung"
    for kind, anchor in anchors:
        distance = np.linalg.norm(case.geometry.voxel_to_world(anchor) - centre_world)
        assert distance >= radius_mm, f"a {kind} crop anchored {distance:.1f} mm from the excluded finding's centre"
    # Control: the same draws on the case WITHOUT the exclusion do land on it (so the check above can fail).
    plain = dataclasses.replace(excluded_case, excluded_nodules=[])
    hits = 0
    for k in range(0, 120, 3):
        sample = make_crop(plain, CropSpec("lung", 0), crop, aug, np.random.default_rng([5, k]))
        hits += np.linalg.norm(case.geometry.voxel_to_world(np.asarray(sample.info["anchor_zyx"])) - centre_world) \
            < radius_mm
    assert hits >= 10
