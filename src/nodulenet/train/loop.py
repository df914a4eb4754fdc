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
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from torch.nn.parallel import DistributedDataParallel

import nodulenet
from nodulenet.data.cases import PreparedCase, find_case_dirs, load_cases
from nodulenet.data.dataset import CropBatch, CropDataset, ResumableDistributedSampler, make_loader
from nodulenet.data.sampling import HardNegative
from nodulenet.data.splits import read_split
from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.model.checkpoint import CheckpointMismatchError, model_from_checkpoint_dict
from nodulenet.model.nodulenet import NoduleNet, NoduleTargets

from nodulenet.io.config_files import read_config_file

from .checkpoint_files import (BEST, FINAL_MODEL, LAST, TrainState, export_model, load_checkpoint, resume_parts,
                               save_checkpoint, training_checkpoint_dict)
from .config import RESUMABLE_CHANGES, TrainConfig, config_differences
from .distributed import (DistInfo, all_ranks_true, barrier, broadcast_buffers, cleanup_distributed, gather_objects,
                          mean_over_ranks, setup_distributed, weights_digest)
from .schedule import learning_rate, make_optimizer, set_learning_rate, stage_start_epochs, stages_for_epoch
from .validate import mine_hard_negatives, validate

CONFIG_FORMAT = "nodulenet-train-config"


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
        return _run(config, out, checkpoint, state, per_rank_batch, show_progress, console, on_step, info, run_log)
    finally:
        run_log.close()


def _run(config: TrainConfig, out: Path, checkpoint: dict[str, Any] | None, state: TrainState, per_rank_batch: int,
         show_progress: bool, console: Console, on_step: Callable[[TrainState, dict[str, float]], None] | None, info: DistInfo,
         run_log: _RunLog) -> TrainSummary:
    t_setup = time.perf_counter()
    train_dirs, val_dirs, missing = resolve_case_dirs(config)
    cache_dir = config.index_cache_dir or str(out / "case_index")
    train_report = load_cases(train_dirs, lung_point_stride=config.crop.lung_point_stride, cache_dir=cache_dir)
    val_report = load_cases(val_dirs, lung_point_stride=config.crop.lung_point_stride, cache_dir=cache_dir)
    skipped = missing + [p.to_dict() for p in (*train_report.problems, *val_report.problems)]
    for s in skipped:
        run_log.warning("skipped case %s: %s: %s", s["case_id"], s["file"], s["problem"])
    prepare_config = common_prepare_config([c.case_dir for c in train_report.cases], run_log)
    if not train_report.cases:
        raise InputError(config.prepared_roots[0], "no usable training case (see the skipped cases above)")
    val_cases: list[PreparedCase] = val_report.cases[: config.val_max_cases] if config.val_max_cases else \
        val_report.cases

    dataset = CropDataset(train_report.cases, config.crop, config.augment, config.seed,
                          _load_hard_negatives(out, state.hard_negatives_file))
    sampler = ResumableDistributedSampler(dataset, info.world_size, info.rank, config.seed)
    steps_per_epoch = sampler.num_samples // per_rank_batch
    if steps_per_epoch == 0:
        raise InputError(None, f"{len(dataset)} crops per epoch give no full batch of {per_rank_batch} per process: "
                               "lower batch_size or raise crop.samples_per_epoch")
    loader_kwargs = dict(batch_size=per_rank_batch, workers=config.workers,
                         pin_memory=config.pin_memory and info.device.type == "cuda")

    torch.manual_seed(config.seed)  # same initial weights on every rank and every rerun
    model_config = config.model_network_config()
    model = NoduleNet(model_config)
    if config.init_checkpoint and checkpoint is None:
        try:
            model.load_state_dict(model_from_checkpoint_dict(load_checkpoint(config.init_checkpoint)).model.state_dict())
        except (CheckpointMismatchError, RuntimeError) as exc:
            raise InputError(config.init_checkpoint, f"does not fit the configured network: {exc}") from None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
    model.to(info.device)
    if config.sync_bn and info.distributed:
        if info.device.type != "cuda":
            run_log.warning("sync_bn needs GPUs; ignored on CPU")
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(config, model)
    amp_dtype, needs_scaler = resolve_amp(config.amp, info.device)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("grad_scaler"):
            scaler.load_state_dict(checkpoint["grad_scaler"])
    # find_unused_parameters: in the RPN-only epochs the RCNN and mask heads get no gradient.
    net: torch.nn.Module = DistributedDataParallel(
        model, device_ids=[info.device] if info.device.type == "cuda" else None, find_unused_parameters=True
    ) if info.distributed else model

    def autocast() -> Any:
        return torch.autocast(info.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    resolved = {
        "device": str(info.device), "world_size": info.world_size, "backend": info.backend,
        "per_process_batch": per_rank_batch, "crops_per_epoch": len(dataset), "steps_per_epoch": steps_per_epoch,
        "stage_start_epochs": stage_start_epochs(config), "base_lr": config.base_lr,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "validation": "whole prepared cases, LUNA16 FROC/CPM (n_bootstrap=0)" if val_cases else "none",
    }
    if info.is_main:
        write_json_atomic(out / "config.json", {
            "format": CONFIG_FORMAT, "nodulenet_version": nodulenet.__version__, "torch_version": torch.__version__,
            # orig_argv keeps "python -m nodulenet train ..." (argv[0] would be the path of __main__.py).
            "command": " ".join(shlex.quote(a) for a in getattr(sys, "orig_argv", sys.argv)),
            "train": config.to_dict(), "model": model_config.to_dict(), "resolved": resolved,
            "cases": {"train": [c.case_id for c in train_report.cases], "val": [c.case_id for c in val_cases]},
            "n_train_nodules": train_report.n_nodules, "skipped_cases": skipped,
        })
        write_json_atomic(out / "skipped_cases.json", skipped)
    run_log.info("%s %s: %d training cases (%d nodules), %d validation cases, %d skipped; %s",
                 "resumed at epoch %d step %d" % (state.epoch, state.step_in_epoch) if checkpoint else "started",
                 out, len(train_report.cases), train_report.n_nodules, len(val_cases), len(skipped),
                 json.dumps(resolved), echo=show_progress)

    def save_last() -> None:
        if info.is_main:
            save_checkpoint(training_checkpoint_dict(model, model_config, optimizer, state, config.to_dict(), scaler,
                                                     prepare_config),
                            out / LAST)

    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    progress = Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                        console=console, disable=not (show_progress and info.is_main))
    status = "finished"
    running: dict[str, list[float]] = {}
    wait_seconds = compute_seconds = 0.0
    t_run = time.perf_counter()
    run_log.info("setup took %.1f s", t_run - t_setup)
    with progress:
        task = progress.add_task(f"epoch {state.epoch}", total=total_steps, completed=min(state.global_step,
                                                                                          total_steps), status="")
        while state.epoch < config.epochs and status == "finished":
            epoch = state.epoch
            stages = stages_for_epoch(config, epoch)
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.set_start(state.step_in_epoch * per_rank_batch)
            net.train()
            progress.update(task, description=f"epoch {epoch} [{'+'.join(stages)}]")
            t_wait = time.perf_counter()
            for batch in make_loader(dataset, sampler, **loader_kwargs):
                if state.step_in_epoch >= steps_per_epoch:
                    break
                t_step = time.perf_counter()
                wait_seconds += t_step - t_wait
                lr = learning_rate(config, epoch, state.global_step)
                set_learning_rate(optimizer, lr)
                images = batch.images.to(info.device, non_blocking=True)
                with autocast():
                    losses = net(images, to_targets(batch, info.device), mode="train", stages=stages,
                                 generator=step_generator(config.seed, state.global_step, info.rank))
                total = losses["total"]
                optimizer.zero_grad(set_to_none=True)
                grad_norm = float("nan")
                if all_ranks_true(bool(torch.isfinite(total.detach()).item()), info):
                    (scaler.scale(total) if scaler is not None else total).backward()
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if config.grad_clip_norm is not None:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm))
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                else:
                    # DDP waits for a backward after every training forward: run one that changes nothing.
                    (total.nan_to_num(0.0, 0.0, 0.0) * 0.0).backward()
                    optimizer.zero_grad(set_to_none=True)
                    state.n_skipped_steps += 1
                    run_log.warning("step %d: loss not finite on some rank (%s); step skipped", state.global_step,
                                    {k: float(v) for k, v in losses.items()})
                state.global_step += 1
                state.step_in_epoch += 1
                state.samples_seen += config.batch_size
                compute_seconds += time.perf_counter() - t_step
                step_losses = {k: float(v.detach()) for k, v in losses.items()}
                for k, v in step_losses.items():
                    running.setdefault(k, []).append(v)
                running.setdefault("grad_norm", []).append(grad_norm)
                if state.global_step % config.log_every_steps == 0 or state.step_in_epoch == steps_per_epoch:
                    means = mean_over_ranks({k: sum(v) / len(v) for k, v in running.items()}, info)
                    running.clear()
                    busy = wait_seconds + compute_seconds
                    run_log.scalars({**{f"loss/{k}": v for k, v in means.items() if k != "grad_norm"},
                                     "train/grad_norm": means.get("grad_norm", float("nan")), "train/lr": lr,
                                     "train/loader_wait_fraction": wait_seconds / busy if busy else 0.0,
                                     "train/samples_per_second": state.samples_seen / max(
                                         state.train_seconds + time.perf_counter() - t_run, 1e-9)},
                                    state.global_step)
                    run_log.info("epoch %d step %d (global %d) lr %.2e %s", epoch, state.step_in_epoch,
                                 state.global_step, lr, " ".join(f"{k} {v:.4f}" for k, v in sorted(means.items())))
                    progress.update(task, status=f"loss {means.get('total', float('nan')):.3f}")
                progress.update(task, advance=1)
                if config.checkpoint_every_steps and state.global_step % config.checkpoint_every_steps == 0:
                    state.train_seconds += time.perf_counter() - t_run
                    t_run = time.perf_counter()
                    save_last()
                if on_step is not None:
                    on_step(state, step_losses)
                if config.max_steps and state.global_step >= config.max_steps:
                    status = "stopped"
                    break
                t_wait = time.perf_counter()
            if status == "stopped" and state.step_in_epoch < steps_per_epoch:
                state.train_seconds += time.perf_counter() - t_run
                save_last()
                break
            # ---- end of epoch: hard negatives, validation, checkpoints
            state.epoch, state.step_in_epoch = epoch + 1, 0
            # Each rank's BatchNorm statistics moved with its own last batch: take rank 0's, as checkpoints do.
            broadcast_buffers(model, info)
            if (config.hard_negative_every_epochs and config.crop.hard_negative_fraction > 0
                    and state.epoch % config.hard_negative_every_epochs == 0 and state.epoch < config.epochs):
                mined = mine_hard_negatives(model, train_report.cases, info, stages, config.hard_negative_per_case,
                                            config.hard_negative_min_score, autocast())
                dataset.set_hard_negatives(mined)
                name = f"hard_negatives/epoch_{state.epoch:04d}.json"
                if info.is_main:
                    write_json_atomic(out / name, {"epoch": state.epoch, "stages": list(stages),
                                                   "hard_negatives": [h.to_dict() for h in mined]})
                state.hard_negatives_file = name
                run_log.info("mined %d hard negatives after epoch %d", len(mined), epoch, echo=show_progress)
            is_last = state.epoch == config.epochs
            if val_cases and config.val_every_epochs and (state.epoch % config.val_every_epochs == 0 or is_last):
                result = validate(model, val_cases, info, stages, autocast())
                result.update(epoch=epoch, global_step=state.global_step)
                state.history.append(result)
                cpm = result.get("cpm")
                run_log.scalars({"val/cpm": cpm if cpm is not None else float("nan"),
                                 **{f"val/sensitivity_at_{k}_fps": v
                                    for k, v in (result.get("sensitivities_at") or {}).items()}}, state.global_step)
                run_log.info("validation after epoch %d: CPM %s on %d cases (%d nodules, %d candidates) in %.1f s",
                             epoch, "n/a" if cpm is None else f"{cpm:.4f}", result["n_cases"], result["n_nodules"],
                             result["n_candidates"], result["seconds"], echo=show_progress)
                if info.is_main:
                    write_json_atomic(out / "history.json", state.history)
                if cpm is not None and (state.best_cpm is None or cpm > state.best_cpm):
                    state.best_cpm, state.best_epoch = cpm, epoch
                    if info.is_main:
                        save_checkpoint(training_checkpoint_dict(model, model_config, optimizer, state,
                                                                 config.to_dict(), scaler, prepare_config),
                                        out / BEST)
            state.train_seconds += time.perf_counter() - t_run
            t_run = time.perf_counter()
            save_last()
    if state.epoch >= config.epochs:
        status = "finished"
    broadcast_buffers(model, info)
    digests = gather_objects(weights_digest(model), info)
    model_file = None
    if info.is_main and status == "finished":
        source = out / BEST if (out / BEST).exists() else out / LAST
        model_file = str(export_model(load_checkpoint(source), out / FINAL_MODEL))
    summary = TrainSummary(
        out_dir=str(out), status=status, epochs_completed=state.epoch, global_step=state.global_step,
        samples_seen=state.samples_seen, train_seconds=round(state.train_seconds, 2),
        samples_per_second=round(state.samples_seen / state.train_seconds, 3) if state.train_seconds else 0.0,
        best_cpm=state.best_cpm, best_epoch=state.best_epoch,
        last_checkpoint=str(out / LAST), best_checkpoint=str(out / BEST) if (out / BEST).exists() else None,
        model_file=model_file, world_size=info.world_size, history=state.history, skipped_cases=skipped,
        weights_sha256_per_rank=digests, n_skipped_steps=state.n_skipped_steps,
    )
    if info.is_main:
        write_json_atomic(out / "summary.json", summary.to_dict())
        if status == "finished":
            from .model_card import write_model_card

            write_model_card(out)
    run_log.info("%s after %d steps (%d epochs) in %.0f s: %.2f samples/s; best CPM %s", status, state.global_step,
                 state.epoch, state.train_seconds, summary.samples_per_second,
                 "n/a" if state.best_cpm is None else f"{state.best_cpm:.4f}", echo=show_progress)
    return summary
