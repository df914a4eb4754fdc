"""``Trainer``: one training run in four parts - setup, the train step, the end of an epoch, and the finish.

:func:`nodulenet.train.loop.train` makes one and calls :meth:`Trainer.run`. The parts are methods so that each can
be read (and timed) on its own: ``__init__`` (cases, data, network, optimiser, the resolved ``config.json``),
:meth:`train_step` (one batch: forward, backward, optimiser; the part the speed work targets), :meth:`end_of_epoch`
(hard negatives, validation, checkpoints) and :meth:`finish` (weights agreed across ranks, ``model.pt``,
``summary.json``, the model card). Conventions and outputs: see :mod:`nodulenet.train.loop`.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from torch.nn.parallel import DistributedDataParallel

import nodulenet
from nodulenet.data.cases import PreparedCase, load_cases
from nodulenet.data.dataset import CropBatch, CropDataset, ResumableDistributedSampler, make_loader
from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.model.checkpoint import CheckpointMismatchError, model_from_checkpoint_dict
from nodulenet.model.nodulenet import NoduleNet

from .checkpoint_files import (BEST, FINAL_MODEL, LAST, TrainState, export_model, load_checkpoint,
                               save_checkpoint, training_checkpoint_dict)
from .config import TrainConfig
from .distributed import (DistInfo, all_ranks_true, broadcast_buffers, gather_objects, mean_over_ranks,
                          weights_digest)
from .schedule import (fill_momentum_buffers, learning_rate, make_optimizer, set_learning_rate, stage_start_epochs,
                       stages_for_epoch)
from .validate import mine_hard_negatives, validate

if TYPE_CHECKING:
    from .run_setup import TrainSummary

CONFIG_FORMAT = "nodulenet-train-config"


@dataclass
class RunContext:
    """What a run is given from outside: where it writes, how it reports, which process it is."""

    out: Path
    info: DistInfo
    run_log: Any  # run_setup.RunLog
    console: Console
    show_progress: bool = True
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None


class Trainer:
    """One training run (see the module doc). ``checkpoint`` and ``state`` come from a resumed run or are fresh."""

    def __init__(self, config: TrainConfig, ctx: RunContext, checkpoint: dict[str, Any] | None, state: TrainState,
                 per_rank_batch: int) -> None:
        from .run_setup import _load_hard_negatives, common_prepare_config, resolve_case_dirs, resolve_amp

        self.config, self.ctx, self.state, self.per_rank_batch = config, ctx, state, per_rank_batch
        info, run_log, out = ctx.info, ctx.run_log, ctx.out
        t_setup = time.perf_counter()
        train_dirs, val_dirs, missing = resolve_case_dirs(config)
        cache_dir = config.index_cache_dir or str(out / "case_index")
        self.train_report = load_cases(train_dirs, lung_point_stride=config.crop.lung_point_stride,
                                       cache_dir=cache_dir)
        val_report = load_cases(val_dirs, lung_point_stride=config.crop.lung_point_stride, cache_dir=cache_dir)
        self.skipped = missing + [p.to_dict() for p in (*self.train_report.problems, *val_report.problems)]
        for s in self.skipped:
            run_log.warning("skipped case %s: %s: %s", s["case_id"], s["file"], s["problem"])
        self.prepare_config = common_prepare_config([c.case_dir for c in self.train_report.cases], run_log)
        if not self.train_report.cases:
            raise InputError(config.prepared_roots[0], "no usable training case (see the skipped cases above)")
        self.val_cases: list[PreparedCase] = (val_report.cases[: config.val_max_cases] if config.val_max_cases
                                              else val_report.cases)

        self.dataset = CropDataset(self.train_report.cases, config.crop, config.augment, config.seed,
                                   _load_hard_negatives(out, state.hard_negatives_file))
        # Seeded by (seed, epoch): every rank draws the same permutation and takes its own share, so a rerun (or a
        # resumed run) sees the same batches on every rank.
        self.sampler = ResumableDistributedSampler(self.dataset, info.world_size, info.rank, config.seed)
        self.steps_per_epoch = self.sampler.num_samples // per_rank_batch
        if self.steps_per_epoch == 0:
            raise InputError(None, f"{len(self.dataset)} crops per epoch give no full batch of {per_rank_batch} per "
                                   "process: lower batch_size or raise crop.samples_per_epoch")
        self.loader_kwargs = dict(batch_size=per_rank_batch, workers=config.workers,
                                  pin_memory=config.pin_memory and info.device.type == "cuda")

        torch.manual_seed(config.seed)  # same initial weights on every rank and every rerun
        self.model_config = config.model_network_config()
        model = NoduleNet(self.model_config)
        if config.init_checkpoint and checkpoint is None:
            try:
                model.load_state_dict(
                    model_from_checkpoint_dict(load_checkpoint(config.init_checkpoint)).model.state_dict())
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
        self.model = model
        self.optimizer = make_optimizer(config, model)
        self.amp_dtype, needs_scaler = resolve_amp(config.amp, info.device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            fill_momentum_buffers(self.optimizer)
            if self.scaler is not None and checkpoint.get("grad_scaler"):
                self.scaler.load_state_dict(checkpoint["grad_scaler"])
        # find_unused_parameters: in the RPN-only epochs the RCNN and mask heads get no gradient.
        self.net: torch.nn.Module = DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None, find_unused_parameters=True
        ) if info.distributed else model

        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.running: dict[str, list[float]] = {}
        self.last_grad_norm = float("nan")
        self.wait_seconds = self.compute_seconds = 0.0
        self._write_config(checkpoint is not None)
        self.t_run = time.perf_counter()
        run_log.info("setup took %.1f s", self.t_run - t_setup)

    # ------------------------------------------------------------------ setup helpers
    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.info.device.type, dtype=self.amp_dtype)

    def _write_config(self, resumed: bool) -> None:
        config, info, state = self.config, self.ctx.info, self.state
        resolved = {
            "device": str(info.device), "world_size": info.world_size, "backend": info.backend,
            "per_process_batch": self.per_rank_batch, "crops_per_epoch": len(self.dataset),
            "steps_per_epoch": self.steps_per_epoch, "stage_start_epochs": stage_start_epochs(config),
            "base_lr": config.base_lr,
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "validation": "whole prepared cases, LUNA16 FROC/CPM (n_bootstrap=0)" if self.val_cases else "none",
        }
        if info.is_main:
            write_json_atomic(self.ctx.out / "config.json", {
                "format": CONFIG_FORMAT, "nodulenet_version": nodulenet.__version__,
                "torch_version": torch.__version__,
                # orig_argv keeps "python -m nodulenet train ..." (argv[0] would be the path of __main__.py).
                "command": " ".join(shlex.quote(a) for a in getattr(sys, "orig_argv", sys.argv)),
                "train": config.to_dict(), "model": self.model_config.to_dict(), "resolved": resolved,
                "cases": {"train": [c.case_id for c in self.train_report.cases],
                          "val": [c.case_id for c in self.val_cases]},
                "n_train_nodules": self.train_report.n_nodules, "skipped_cases": self.skipped,
            })
            write_json_atomic(self.ctx.out / "skipped_cases.json", self.skipped)
        self.ctx.run_log.info(
            "%s %s: %d training cases (%d nodules), %d validation cases, %d skipped; %s",
            "resumed at epoch %d step %d" % (state.epoch, state.step_in_epoch) if resumed else "started",
            self.ctx.out, len(self.train_report.cases), self.train_report.n_nodules, len(self.val_cases),
            len(self.skipped), json.dumps(resolved), echo=self.ctx.show_progress)

    def _checkpoint_dict(self) -> dict[str, Any]:
        return training_checkpoint_dict(self.model, self.model_config, self.optimizer, self.state,
                                        self.config.to_dict(), self.scaler, self.prepare_config)

    def save_last(self) -> None:
        if self.ctx.info.is_main:
            save_checkpoint(self._checkpoint_dict(), self.ctx.out / LAST)

    def _clock(self) -> None:
        """Add the time since the last mark to the run's training seconds (checkpoints carry it)."""
        now = time.perf_counter()
        self.state.train_seconds += now - self.t_run
        self.t_run = now

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainSummary:
        config, state = self.config, self.state
        progress = Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                            console=self.ctx.console, disable=not (self.ctx.show_progress and self.ctx.info.is_main))
        status = "finished"
        with progress:
            task = progress.add_task(f"epoch {state.epoch}", total=self.total_steps,
                                     completed=min(state.global_step, self.total_steps), status="")
            while state.epoch < config.epochs and status == "finished":
                epoch = state.epoch
                stages = stages_for_epoch(config, epoch)
                progress.update(task, description=f"epoch {epoch} [{'+'.join(stages)}]")
                status = self._train_epoch(epoch, stages, progress, task)
                if status == "stopped" and state.step_in_epoch < self.steps_per_epoch:
                    self._clock()
                    self.save_last()
                    break
                self.end_of_epoch(epoch, stages)
        return self.finish("finished" if state.epoch >= config.epochs else status)

    def _train_epoch(self, epoch: int, stages: tuple[str, ...], progress: Progress, task: Any) -> str:
        config, state = self.config, self.state
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(state.step_in_epoch * self.per_rank_batch)
        self.net.train()
        t_wait = time.perf_counter()
        for batch in make_loader(self.dataset, self.sampler, **self.loader_kwargs):
            if state.step_in_epoch >= self.steps_per_epoch:
                break
            t_step = time.perf_counter()
            self.wait_seconds += t_step - t_wait
            lr = learning_rate(config, epoch, state.global_step)
            step_losses = self.train_step(batch, stages, lr)
            self.compute_seconds += time.perf_counter() - t_step
            self._log_step(epoch, lr, step_losses, progress, task)
            if config.checkpoint_every_steps and state.global_step % config.checkpoint_every_steps == 0:
                self._clock()
                self.save_last()
            if self.ctx.on_step is not None:
                self.ctx.on_step(state, step_losses)
            if config.max_steps and state.global_step >= config.max_steps:
                return "stopped"
            t_wait = time.perf_counter()
        return "finished"

    def train_step(self, batch: CropBatch, stages: tuple[str, ...], lr: float) -> dict[str, float]:
        """One optimiser step on ``batch``; returns this rank's losses as floats (``last_grad_norm``: the clipped
        gradient norm, NaN without clipping or when the step was skipped).

        The forward and backward are queued without waiting on the device; the step reads values back once, at
        its end, to log the losses and to skip the update when a loss is not finite on some rank (the backward
        runs regardless, which DDP needs on every rank after a training forward).
        """
        from .run_setup import step_generator, to_targets

        config, state, info = self.config, self.state, self.ctx.info
        set_learning_rate(self.optimizer, lr)
        images = batch.images.to(info.device, non_blocking=True)
        with self.autocast():
            losses = self.net(images, to_targets(batch, info.device), mode="train", stages=stages,
                              generator=step_generator(config.seed, state.global_step, info.rank))
        total = losses["total"]
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        names = list(losses)
        values = torch.stack([losses[k].detach().float() for k in names]).tolist()  # the step's one read-back
        step_losses = dict(zip(names, values))
        grad_norm = float("nan")
        if all_ranks_true(all(v == v and abs(v) != float("inf") for v in values), info):
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if config.grad_clip_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip_norm))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            state.n_skipped_steps += 1
            self.ctx.run_log.warning("step %d: loss not finite on some rank (%s); step skipped", state.global_step,
                                     step_losses)
        state.global_step += 1
        state.step_in_epoch += 1
        state.samples_seen += config.batch_size
        self.last_grad_norm = grad_norm
        return step_losses

    def _log_step(self, epoch: int, lr: float, step_losses: dict[str, float], progress: Progress, task: Any) -> None:
        state, config = self.state, self.config
        for k, v in step_losses.items():
            self.running.setdefault(k, []).append(v)
        self.running.setdefault("grad_norm", []).append(self.last_grad_norm)
        if state.global_step % config.log_every_steps == 0 or state.step_in_epoch == self.steps_per_epoch:
            means = mean_over_ranks({k: sum(v) / len(v) for k, v in self.running.items()}, self.ctx.info)
            self.running.clear()
            busy = self.wait_seconds + self.compute_seconds
            elapsed = state.train_seconds + time.perf_counter() - self.t_run
            self.ctx.run_log.scalars({**{f"loss/{k}": v for k, v in means.items() if k != "grad_norm"},
                                      "train/grad_norm": means.get("grad_norm", float("nan")), "train/lr": lr,
                                      "train/loader_wait_fraction": self.wait_seconds / busy if busy else 0.0,
                                      "train/samples_per_second": state.samples_seen / max(elapsed, 1e-9)},
                                     state.global_step)
            self.ctx.run_log.info("epoch %d step %d (global %d) lr %.2e %s", epoch, state.step_in_epoch,
                                  state.global_step, lr,
                                  " ".join(f"{k} {v:.4f}" for k, v in sorted(means.items())))
            progress.update(task, status=f"loss {means.get('total', float('nan')):.3f}")
        progress.update(task, advance=1)

    def end_of_epoch(self, epoch: int, stages: tuple[str, ...]) -> None:
        """Hard negatives, validation (and ``best.pt``), ``last.pt``."""
        config, state, info, out, run_log = self.config, self.state, self.ctx.info, self.ctx.out, self.ctx.run_log
        state.epoch, state.step_in_epoch = epoch + 1, 0
        # Each rank's BatchNorm statistics moved with its own last batch: take rank 0's, as checkpoints do.
        broadcast_buffers(self.model, info)
        if (config.hard_negative_every_epochs and config.crop.hard_negative_fraction > 0
                and state.epoch % config.hard_negative_every_epochs == 0 and state.epoch < config.epochs):
            mined = mine_hard_negatives(self.model, self.train_report.cases, info, stages,
                                        config.hard_negative_per_case, config.hard_negative_min_score,
                                        self.autocast())
            self.dataset.set_hard_negatives(mined)
            name = f"hard_negatives/epoch_{state.epoch:04d}.json"
            if info.is_main:
                write_json_atomic(out / name, {"epoch": state.epoch, "stages": list(stages),
                                               "hard_negatives": [h.to_dict() for h in mined]})
            state.hard_negatives_file = name
            run_log.info("mined %d hard negatives after epoch %d", len(mined), epoch, echo=self.ctx.show_progress)
        is_last = state.epoch == config.epochs
        if self.val_cases and config.val_every_epochs and (state.epoch % config.val_every_epochs == 0 or is_last):
            self._validate(epoch, stages)
        self._clock()
        self.save_last()

    def _validate(self, epoch: int, stages: tuple[str, ...]) -> None:
        state, info, out, run_log = self.state, self.ctx.info, self.ctx.out, self.ctx.run_log
        result = validate(self.model, self.val_cases, info, stages, self.autocast())
        result.update(epoch=epoch, global_step=state.global_step)
        state.history.append(result)
        cpm = result.get("cpm")
        run_log.scalars({"val/cpm": cpm if cpm is not None else float("nan"),
                         **{f"val/sensitivity_at_{k}_fps": v
                            for k, v in (result.get("sensitivities_at") or {}).items()}}, state.global_step)
        run_log.info("validation after epoch %d: CPM %s on %d cases (%d nodules, %d candidates) in %.1f s",
                     epoch, "n/a" if cpm is None else f"{cpm:.4f}", result["n_cases"], result["n_nodules"],
                     result["n_candidates"], result["seconds"], echo=self.ctx.show_progress)
        if info.is_main:
            write_json_atomic(out / "history.json", state.history)
        if cpm is not None and (state.best_cpm is None or cpm > state.best_cpm):
            state.best_cpm, state.best_epoch = cpm, epoch
            if info.is_main:
                save_checkpoint(self._checkpoint_dict(), out / BEST)

    def finish(self, status: str) -> TrainSummary:
        """Weights agreed across ranks, ``model.pt`` (finished runs), ``summary.json``, the model card."""
        from .run_setup import TrainSummary

        state, info, out = self.state, self.ctx.info, self.ctx.out
        broadcast_buffers(self.model, info)
        digests = gather_objects(weights_digest(self.model), info)
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
            model_file=model_file, world_size=info.world_size, history=state.history, skipped_cases=self.skipped,
            weights_sha256_per_rank=digests, n_skipped_steps=state.n_skipped_steps,
        )
        if info.is_main:
            write_json_atomic(out / "summary.json", summary.to_dict())
            if status == "finished":
                from .model_card import write_model_card

                write_model_card(out)
        self.ctx.run_log.info("%s after %d steps (%d epochs) in %.0f s: %.2f samples/s; best CPM %s", status,
                              state.global_step, state.epoch, state.train_seconds, summary.samples_per_second,
                              "n/a" if state.best_cpm is None else f"{state.best_cpm:.4f}",
                              echo=self.ctx.show_progress)
        return summary
