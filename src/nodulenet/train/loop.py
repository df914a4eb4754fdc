"""``train``: the training loop (single process, or DDP under torchrun), resumable to the exact step.

Conventions: images ``[B, 1, Z, Y, X]`` normalised ``(raw - 128) / 128``; boxes ``(z0, y0, x0, z1, y1, x1)`` voxels,
upper bounds exclusive; epochs and steps counted from 0; ``batch_size`` is the global batch.

Outputs in ``out_dir`` (rank 0 writes; every file atomically except the append-only log and TensorBoard events):
``config.json`` (resolved settings, devices, case lists, skipped cases), ``train.log`` (readable log),
``tensorboard/`` (losses per head, lr, gradient norm, loader wait, validation CPM), ``last.pt`` / ``best.pt``
(training checkpoints, :mod:`.checkpoint_files`), ``history.json`` (validation results), ``hard_negatives/``,
``skipped_cases.json``, and at the end ``model.pt`` (weights to ship), ``summary.json`` and ``MODEL_CARD.md``.

Exact resume: the model is initialised from ``seed``; crop ``i`` of epoch ``e`` depends only on ``(seed, e, i)``; the
order of an epoch only on ``(seed, e)``; the model's own sampling (anchors, RCNN proposals) uses a generator seeded
by ``(seed, global step, rank)``. A checkpoint stores weights, optimizer, AMP scaler and the position in the epoch,
so training resumed from ``last.pt`` repeats the exact batches that followed it (identical weights on CPU).

The run itself is :class:`~nodulenet.train.trainer.Trainer` (setup, train step, end of epoch, finish); this module
resolves the settings, the resume point and the processes, and holds the helpers the trainer uses.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console

from nodulenet.data.cases import find_case_dirs
from nodulenet.data.dataset import CropBatch
from nodulenet.data.sampling import HardNegative
from nodulenet.data.splits import read_split
from nodulenet.errors import InputError
from nodulenet.io.config_files import read_config_file
from nodulenet.model.nodulenet import NoduleTargets

from .checkpoint_files import LAST, TrainState, load_checkpoint, resume_parts
from .config import RESUMABLE_CHANGES, TrainConfig, config_differences
from .distributed import DistInfo, barrier, cleanup_distributed, setup_distributed
from .trainer import CONFIG_FORMAT, RunContext, Trainer

__all__ = ["CONFIG_FORMAT", "TrainSummary", "Trainer", "train"]


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
    return [NoduleTargets(b.to(device), [m.to(device) for m in masks], o.to(device))
            for b, masks, o in zip(batch.boxes, batch.masks, batch.mask_origins)]


def step_generator(seed: int, global_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + global_step * 7919 + rank * 104_729) % (2**63 - 1))


class _RunLog:
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


def train(
    config: TrainConfig | None,
    out_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    show_progress: bool = True,
    console: Console | None = None,
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Train NoduleNet on prepared cases into ``out_dir`` (see the module doc).

    ``resume``: ``True`` continues from ``out_dir/last.pt``, a path from that checkpoint; ``config`` may then be
    ``None`` (the stored settings are used) or must equal them except for runtime settings (workers, logging,
    ``max_steps``). ``on_step(state, losses)`` is called after every optimiser step (and its checkpoint) with this
    rank's losses of the step, e.g. by tests and benchmarks.
    """
    out = Path(out_dir)
    console = console or Console(stderr=True)
    info = setup_distributed()
    try:
        return _train(config, out, resume, show_progress, console, on_step, info)
    finally:
        cleanup_distributed(info)


def _resolve_resume(config: TrainConfig | None, out: Path, resume: bool | str | Path
                    ) -> tuple[TrainConfig, dict[str, Any] | None, TrainState]:
    if not resume:
        if config is None:
            raise InputError(None, "a training config is needed (only a resumed run can take its stored settings)")
        if (out / LAST).exists():
            raise InputError(out, f"already holds a run ({LAST}); resume it with --resume or choose another --out")
        return config, None, TrainState()
    path = out / LAST if resume is True else Path(resume)
    checkpoint = load_checkpoint(path)
    state, stored_dict = resume_parts(checkpoint, path)
    stored = TrainConfig.from_dict(stored_dict, source=path)
    if config is None:
        return stored, checkpoint, state
    changed = [k for k in config_differences(stored, config) if k.split(".")[0] not in RESUMABLE_CHANGES]
    if changed:
        raise InputError(path, f"the run was started with other settings for {changed}; resume without them "
                               "(the stored ones are used) or start a new run")
    return config, checkpoint, state


def _train(config: TrainConfig | None, out: Path, resume: bool | str | Path, show_progress: bool, console: Console,
           on_step: Callable[[TrainState, dict[str, float]], None] | None, info: DistInfo) -> TrainSummary:
    config, checkpoint, state = _resolve_resume(config, out, resume)
    if config.threads:
        torch.set_num_threads(config.threads)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    if config.batch_size % info.world_size:
        raise InputError(None, f"batch_size {config.batch_size} is not divisible by the {info.world_size} processes")
    per_rank_batch = config.batch_size // info.world_size
    run_log = _RunLog(out, info, console, state.global_step if checkpoint is not None else None)
    try:
        ctx = RunContext(out=out, info=info, run_log=run_log, console=console, show_progress=show_progress,
                         on_step=on_step)
        return Trainer(config, ctx, checkpoint, state, per_rank_batch).run()
    finally:
        run_log.close()
