"""Training checkpoints on disk: written atomically, loaded safely, resumable.

A training checkpoint is the model checkpoint dict of :func:`nodulenet.model.to_checkpoint_dict` (so ``nodulenet
predict`` and :func:`nodulenet.model.model_from_checkpoint_dict` load it as they are) plus the training state::

    {..., "extra": {"train_state": TrainState, "train_config": TrainConfig}, "optimizer": ..., "grad_scaler": ...}

Everything in it is tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it (no
pickled objects). Files: ``last.pt`` (every epoch, and every ``checkpoint_every_steps``), ``best.pt`` (best
validation CPM) and, at the end, ``model.pt`` (weights + config only: the file to ship).

Writing goes through :func:`nodulenet.io.atomic.atomic_path`: ``torch.save`` fills a temp file beside the target,
which is flushed to disk and renamed over it only when complete. A full disk or a kill midway leaves the previous
checkpoint untouched.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import atomic_path
# The one checkpoint reader (predict --weights reads files through it too), under the name training code uses.
from nodulenet.io.checkpoint_file import read_checkpoint_file as load_checkpoint  # noqa: F401 - re-export
from nodulenet.model.checkpoint import to_checkpoint_dict
from nodulenet.model.config import NoduleNetConfig

LAST = "last.pt"
BEST = "best.pt"
FINAL_MODEL = "model.pt"


class CheckpointWriteError(NoduleNetError):
    """A checkpoint could not be written (disk full, permissions); the previous file is intact."""


@dataclass
class TrainState:
    """Where a run is: the next epoch to run, batches already done in it, totals and the validation history."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    best_cpm: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    hard_negatives_file: str | None = None
    n_skipped_steps: int = 0  # steps whose loss was not finite (skipped on every rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def training_checkpoint_dict(model: torch.nn.Module, model_config: NoduleNetConfig, optimizer: torch.optim.Optimizer,
                             state: TrainState, train_config: dict[str, Any],
                             grad_scaler: Any | None = None,
                             prepare_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``prepare_config`` is the preprocessing the training cases were made with: predict repeats it exactly."""
    extra: dict[str, Any] = {"train_state": state.to_dict(), "train_config": train_config}
    if prepare_config is not None:
        extra["prepare_config"] = prepare_config
    d = to_checkpoint_dict(model, model_config, extra)
    d["optimizer"] = optimizer.state_dict()
    d["grad_scaler"] = grad_scaler.state_dict() if grad_scaler is not None else None
    return d


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through a temp file, fsync'ed, renamed over ``path`` only when complete."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise CheckpointWriteError(
            f"{path}: could not write the checkpoint ({exc.strerror or exc}); the previous {path.name}, if any, "
            "is intact") from exc
    return path


def resume_parts(obj: dict[str, Any], path: str | Path) -> tuple[TrainState, dict[str, Any]]:
    """The training state and config stored in a training checkpoint."""
    extra = obj.get("extra") or {}
    if "train_state" not in extra or "optimizer" not in obj:
        raise InputError(path, "holds model weights only (no optimizer / training state): it cannot be resumed; "
                               "use it as init_checkpoint to start a new run from these weights")
    return TrainState.from_dict(extra["train_state"]), dict(extra.get("train_config") or {})


def export_model(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write the weights + config of a training checkpoint without optimizer state (the file to ship)."""
    slim = {k: v for k, v in checkpoint.items() if k not in ("optimizer", "grad_scaler")}
    extra = dict(slim.get("extra") or {})
    state = extra.pop("train_state", None)
    if state is not None:
        extra["trained"] = {k: state.get(k) for k in ("epoch", "global_step", "samples_seen", "best_cpm",
                                                      "best_epoch", "train_seconds")}
    slim["extra"] = extra
    return save_checkpoint(slim, path)
