"""What one training run needs before and around its steps: the case folders, AMP mode, targets on the device,
the per-step random generator, the run log and the summary (shared by :mod:`.loop` and :mod:`.trainer`)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console

from nodulenet.data.cases import find_case_dirs
from nodulenet.data.dataset import CropBatch
from nodulenet.data.sampling import HardNegative
from nodulenet.data.splits import read_split
from nodulenet.errors import InputError
from nodulenet.io.config_files import read_config_file
from nodulenet.model.nodulenet import NoduleTargets

from .config import TrainConfig
from .distributed import DistInfo


@dataclass
class TrainSummary:
    out_dir: str
    status: str  # "finished" | "stopped" (max_steps reached)
    epochs_completed: int
    global_step: int
    samples_seen: int
    train_seconds: float
    samples_per_second: float
    best_cpm: float | None
    best_epoch: int | None
    last_checkpoint: str | None
    best_checkpoint: str | None
    model_file: str | None
    world_size: int
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_cases: list[dict[str, str]] = field(default_factory=list)
    weights_sha256_per_rank: list[str] = field(default_factory=list)
    n_skipped_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ cases


def resolve_case_dirs(config: TrainConfig) -> tuple[list[Path], list[Path], list[dict[str, str]]]:
    """Train and validation case folders, and the listed cases that have no folder (reported, not fatal)."""
    if not config.prepared_roots:
        raise InputError(None, "no prepared_roots given: name the folder(s) of prepared cases")
    dirs = find_case_dirs(config.prepared_roots)
    by_name: dict[str, Path] = {}
    for d in dirs:
        by_name.setdefault(d.name, d)
    train_ids: list[str] | None = None
    val_ids: list[str] = []
    source = "prepared_roots"
    if config.split_file:
        split = read_split(config.split_file)
        train_ids, val_ids, source = list(split.train), list(split.val), str(config.split_file)
    if config.train_cases is not None:
        train_ids, source = list(config.train_cases), "train_cases"
    if config.val_cases is not None:
        val_ids = list(config.val_cases)
    if train_ids is None:
        train_ids = [d.name for d in dirs if d.name not in set(val_ids)]
    both = sorted(set(train_ids) & set(val_ids))
    if both:
        raise InputError(config.split_file, f"{len(both)} case(s) are in both the training and validation sets, "
                                            f"e.g. {both[0]}")
    missing = [{"case_id": c, "file": source, "problem": "listed, but no such case folder under the prepared roots"}
               for c in [*train_ids, *val_ids] if c not in by_name]
    return ([by_name[c] for c in train_ids if c in by_name], [by_name[c] for c in val_ids if c in by_name], missing)


# ------------------------------------------------------------------------------------------ helpers


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if device.type == "cuda":
        if mode == "off":
            return None, False
        if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16, False
        return torch.float16, True
    if mode == "fp16":
        raise InputError(None, "amp=fp16 needs a GPU; on CPU use amp=bf16 or amp=off")
    # CPU: bf16 is fast only with AVX512-BF16 and slower than fp32 elsewhere, so "auto" stays fp32.
    return (torch.bfloat16, False) if mode == "bf16" else (None, False)


def to_targets(batch: CropBatch, device: torch.device) -> list[NoduleTargets]:
    ignore = batch.ignore_boxes or [None] * len(batch.boxes)
    return [NoduleTargets(b.to(device), [m.to(device) for m in masks], o.to(device),
                          None if g is None else g.to(device))
            for b, masks, o, g in zip(batch.boxes, batch.masks, batch.mask_origins, ignore)]


def step_generator(seed: int, global_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + global_step * 7919 + rank * 104_729) % (2**63 - 1))


class RunLog:
    """Readable ``train.log`` + console lines + TensorBoard scalars, all on rank 0 only."""

    def __init__(self, out: Path, info: DistInfo, console: Console, purge_step: int | None) -> None:
        self.enabled = info.is_main
        self.console = console
        self.logger = logging.getLogger(f"nodulenet.train.run.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.writer: Any = None
        if not self.enabled:
            return
        handler = logging.FileHandler(out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(handler)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge_step)
        except ImportError:
            self.logger.warning("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")

    def info(self, message: str, *args: Any, echo: bool = False) -> None:
        if self.enabled:
            self.logger.info(message, *args)
            if echo:
                self.console.print(message % args if args else message, highlight=False)

    def warning(self, message: str, *args: Any) -> None:
        if self.enabled:
            self.logger.warning(message, *args)
            self.console.print("[yellow]warning:[/] " + (message % args if args else message), highlight=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled and self.writer is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


def _load_hard_negatives(out: Path, name: str | None) -> list[HardNegative]:
    if not name:
        return []
    path = out / name
    try:
        return [HardNegative.from_dict(d) for d in json.loads(path.read_text())["hard_negatives"]]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"cannot read the mined hard negatives ({exc})") from None


# ------------------------------------------------------------------------------------------ the run


def common_prepare_config(case_dirs: Sequence[Path], log: Any) -> dict[str, Any] | None:
    """The preprocessing settings shared by all training cases (their ``config.json``), recorded in every
    checkpoint so that predict prepares a new scan exactly as training saw its cases; None (with a warning)
    when the cases were prepared with different settings."""
    found: dict[str, Any] | None = None
    for case_dir in case_dirs:
        settings = read_config_file(Path(case_dir) / "config.json", section="prepare")
        if found is None:
            found = settings
        elif settings != found:
            log.warning("training cases were prepared with different settings (%s differs); the checkpoints do "
                        "not record one preprocessing config", case_dir)
            return None
    return found
