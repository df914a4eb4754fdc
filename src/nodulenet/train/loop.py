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

from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from nodulenet.errors import InputError

from .checkpoint_files import LAST, TrainState, load_checkpoint, resume_parts
from .config import RESUMABLE_CHANGES, TrainConfig, config_differences
from .distributed import DistInfo, barrier, cleanup_distributed, setup_distributed
from .run_setup import TrainSummary, RunLog
from .trainer import CONFIG_FORMAT, RunContext, Trainer

__all__ = ["CONFIG_FORMAT", "TrainSummary", "Trainer", "train"]


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
    run_log = RunLog(out, info, console, state.global_step if checkpoint is not None else None)
    try:
        ctx = RunContext(out=out, info=info, run_log=run_log, console=console, show_progress=show_progress,
                         on_step=on_step)
        return Trainer(config, ctx, checkpoint, state, per_rank_batch).run()
    finally:
        run_log.close()
