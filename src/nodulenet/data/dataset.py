"""PyTorch side of the training data: the crop dataset, a resumable distributed sampler, batching and loaders.

Conventions: images ``[B, 1, Z, Y, X]`` float32 normalised ``(raw - 128) / 128``; boxes ``(z0, y0, x0, z1, y1, x1)``
float voxels of the crop, upper bounds exclusive; each nodule's mask is a tight bool crop placed at its origin
(``mask_origins``, crop voxels), the form :class:`nodulenet.model.NoduleTargets` takes.

Reproducibility: sample ``i`` of epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e, i])``; the order of
an epoch comes from :class:`ResumableDistributedSampler` (torch's ``DistributedSampler``, seeded by ``seed`` and
``e``), which can also skip the samples a killed run already used. So a resumed run sees exactly the batches the
uninterrupted run would have seen, with any number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .cases import PreparedCase
from .config import AugmentConfig, CropConfig
from .sampling import CropSample, CropSpec, HardNegative, epoch_plan, make_crop, samples_per_epoch


class CropDataset(Dataset):
    """Training crops over prepared cases; ``len`` = crops per epoch; call :meth:`set_epoch` before each epoch.

    The epoch's plan is rebuilt lazily in whichever process needs it (data-loader workers get a copy of the
    dataset when an epoch's iterator starts, so the epoch number travels with it).
    """

    def __init__(self, cases: Sequence[PreparedCase], crop: CropConfig, augment: AugmentConfig, seed: int,
                 hard_negatives: Sequence[HardNegative] = ()) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.crop = crop
        self.augment = augment
        self.seed = int(seed)
        self.n_samples = samples_per_epoch(self.cases, crop)
        self._case_index = {c.case_id: i for i, c in enumerate(self.cases)}
        self.hard_negatives: list[HardNegative] = []
        self.set_hard_negatives(hard_negatives)
        self.epoch = 0
        self._plan: list[CropSpec] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._plan = None
        self.epoch = int(epoch)

    def set_hard_negatives(self, hard_negatives: Sequence[HardNegative]) -> None:
        """Mined false positives to build hard-negative crops around (those of unknown cases are dropped)."""
        self.hard_negatives = [h for h in hard_negatives if h.case_id in self._case_index]
        self._plan = None

    @property
    def plan(self) -> list[CropSpec]:
        if self._plan is None:
            self._plan = epoch_plan(self.cases, self.crop, self.n_samples, self.seed, self.epoch,
                                    len(self.hard_negatives))
        return self._plan

    def __len__(self) -> int:
        return self.n_samples

    def sample(self, index: int) -> CropSample:
        spec = self.plan[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        hard = None
        case_index = spec.case_index
        if spec.kind == "hard_negative":
            hard = self.hard_negatives[spec.hard_negative_index]
            case_index = self._case_index[hard.case_id]
        sample = make_crop(self.cases[case_index], spec, self.crop, self.augment, rng, hard)
        sample.info["index"] = int(index)
        sample.info["epoch"] = self.epoch
        return sample

    def __getitem__(self, index: int) -> CropSample:
        return self.sample(int(index))


@dataclass
class CropBatch:
    """A collated batch. ``pin_memory`` lets ``DataLoader(pin_memory=True)`` page-lock it for fast GPU copies."""

    images: torch.Tensor  # [B, 1, Z, Y, X]
    boxes: list[torch.Tensor]  # per image [G, 6]
    masks: list[list[torch.Tensor]]  # per image, per nodule: uint8 tight mask
    mask_origins: list[torch.Tensor]  # per image [G, 3] int64
    case_ids: list[str]
    kinds: list[str]
    infos: list[dict[str, Any]]
    ignore_boxes: list[torch.Tensor] = field(default_factory=list)  # per image [K, 6]: excluded findings

    def pin_memory(self) -> CropBatch:
        self.images = self.images.pin_memory()
        return self

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_crops(samples: Sequence[CropSample]) -> CropBatch:
    return CropBatch(
        images=torch.from_numpy(np.stack([s.image for s in samples]))[:, None],
        boxes=[torch.from_numpy(s.boxes) for s in samples],
        masks=[[torch.from_numpy(m.astype(np.uint8)) for m in s.masks] for s in samples],
        mask_origins=[torch.from_numpy(s.mask_origins) for s in samples],
        case_ids=[s.case_id for s in samples],
        kinds=[s.kind for s in samples],
        infos=[s.info for s in samples],
        ignore_boxes=[torch.from_numpy(s.ignore_boxes) for s in samples],
    )


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, one share per rank) that can start part-way into an epoch.

    ``start_index`` counts samples of THIS rank already consumed; torch's sampler cannot skip them, so a resumed run
    would repeat (or, reshuffled, replace) the first batches of its epoch. Works without a process group when
    ``num_replicas`` and ``rank`` are given (single process: ``num_replicas=1, rank=0``).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start_index = 0

    def set_start(self, start_index: int) -> None:
        self.start_index = max(0, int(start_index))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


def _worker_init(worker_id: int) -> None:
    # Each worker is one process among many on the same cores: one intra-op thread avoids oversubscription.
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, sampler: ResumableDistributedSampler, batch_size: int, workers: int,
                pin_memory: bool) -> DataLoader:
    """A loader over ``sampler`` with full batches only (BatchNorm and DDP want equal batch sizes)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_crops,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=_worker_init if workers > 0 else None,
        # Not persistent: each epoch's workers must copy the dataset WITH its new epoch number.
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def normalised_case_image(case: PreparedCase) -> torch.Tensor:
    """The whole prepared image as the network input ``[1, 1, Z, Y, X]`` (for validation and mining)."""
    raw = torch.from_numpy(np.asarray(case.image, dtype=np.float32))
    return ((raw - 128.0) / 128.0)[None, None]
