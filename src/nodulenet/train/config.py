"""Settings of a training run: one frozen dataclass, defaults = the published NoduleNet schedule.

Published (``uci-cbcl/NoduleNet`` ``config.py``): SGD, momentum 0.9, weight decay 1e-4, lr 0.01, x0.1 after 50 % and
again after 80 % of 200 epochs, batch 16, RPN alone first, RCNN from epoch 65 (32.5 %), mask head from epoch 80 (40 %),
128^3 positive crops. Not published, added here: AdamW, AMP, gradient clipping, negative and hard-negative crops,
validation FROC, DDP. ``batch_size`` is the GLOBAL batch (split over DDP processes), so a run means the same thing
on one GPU or eight.

Config files are YAML or JSON with the keys of :meth:`TrainConfig.to_dict` (``crop``, ``augment`` and ``model_config``
nested); ``overrides`` use dotted keys (``crop.positive_fraction=0.7``). Unknown keys are errors, not ignored.
Every run writes the resolved config as JSON next to its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from nodulenet.data.config import AugmentConfig, CropConfig
from nodulenet.errors import InputError
from nodulenet.io.config_files import apply_dotted_overrides, parse_override, load_settings  # noqa: F401
from nodulenet.model.config import NoduleNetConfig, published_config, tiny_config
from nodulenet.settings_dict import settings_from_dict, settings_to_dict

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "off", "bf16", "fp16")
BASE_MODELS = {"published": published_config, "tiny": tiny_config}
DEFAULT_LR = {"sgd": 0.01, "adamw": 0.001}
# Settings that may differ when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = frozenset({"workers", "pin_memory", "log_every_steps", "max_steps",
                               "index_cache_dir", "prepared_roots", "threads"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (see the module doc)."""

    # ---- data ----
    prepared_roots: tuple[str, ...] = ()  # folders of prepared case folders (or case folders themselves)
    split_file: str | None = None  # fold_<i>.json from `nodulenet make-splits`: train + val case ids
    train_cases: tuple[str, ...] | None = None  # explicit case ids (override the split's)
    val_cases: tuple[str, ...] | None = None
    index_cache_dir: str | None = None  # default <out>/case_index
    crop: CropConfig = field(default_factory=CropConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # ---- model ----
    model: str = "published"  # base network: "published" or "tiny" (quarter width)
    model_width: float = 1.0  # channel multiplier on top of the base (e.g. 0.5 for a ~17 MB demo model)
    model_config: dict[str, Any] = field(default_factory=dict)  # NoduleNetConfig fields to override
    init_checkpoint: str | None = None  # start from these weights (ours or the published checkpoint)
    # ---- optimisation ----
    epochs: int = 200
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float | None = None  # default 0.01 for SGD (published), 0.001 for AdamW
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.8)  # fractions of the epochs after which lr *= lr_gamma
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # linear warm-up of the lr over the first optimiser steps
    rcnn_start_fraction: float = 0.325  # RCNN head trained from this fraction of the epochs (published 65/200)
    mask_start_fraction: float = 0.4  # mask head from here (published 80/200)
    grad_clip_norm: float | None = 10.0  # clip the global gradient norm; None = off (published)
    amp: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU
    sync_bn: bool = False  # SyncBatchNorm across DDP processes (GPU only)
    seed: int = 0
    # ---- runtime ----
    workers: int = 4  # data-loader worker processes per training process
    pin_memory: bool = True
    threads: int | None = None  # torch intra-op threads of the training process (None: torch's default)
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0  # also write last.pt every N optimiser steps (0: at the end of epochs only)
    max_steps: int | None = None  # stop after this many optimiser steps in all (smoke runs, benchmarks)
    # ---- validation and hard negatives ----
    val_every_epochs: int = 5
    val_max_cases: int | None = None
    hard_negative_every_epochs: int = 0  # mine false positives of the training cases every N epochs (0: never)
    hard_negative_per_case: int = 10
    hard_negative_min_score: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.model not in BASE_MODELS:
            problems.append(f"model must be one of {tuple(BASE_MODELS)}, got {self.model!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0 or self.log_every_steps < 1:
            problems.append("epochs and batch_size must be >= 1, workers >= 0, log_every_steps >= 1")
        if not 0 < self.model_width <= 4:
            problems.append("model_width must be within (0, 4]")
        if not 0 <= self.rcnn_start_fraction <= self.mask_start_fraction <= 1:
            problems.append("need 0 <= rcnn_start_fraction <= mask_start_fraction <= 1 (the mask head uses RCNN "
                            "detections)")
        if self.lr is not None and self.lr <= 0:
            problems.append("lr must be > 0")
        if any(not 0 < m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            problems.append("lr_milestones must be increasing fractions within (0, 1)")
        if self.val_every_epochs < 0 or self.hard_negative_every_epochs < 0 or self.checkpoint_every_steps < 0:
            problems.append("val_every_epochs, hard_negative_every_epochs, checkpoint_every_steps must be >= 0")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            problems.append("grad_clip_norm must be > 0 or null")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1 or null")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))
        # Validate the model settings now, not after the cases are loaded.
        self.model_network_config()

    @property
    def base_lr(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.optimizer])

    def model_network_config(self) -> NoduleNetConfig:
        """The network's config: base model, width multiplier, then ``model_config`` overrides."""
        base = BASE_MODELS[self.model]()
        if self.model_width != 1.0:
            base = base.scaled(self.model_width, name=f"{base.name}-width{self.model_width:g}")
        if not self.model_config:
            return base
        return NoduleNetConfig.from_dict({**base.to_dict(), **self.model_config})

    def to_dict(self) -> dict[str, Any]:
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
        if not isinstance(d, dict):
            raise InputError(source, f"a training config must be a mapping, got {type(d).__name__}")
        kwargs = dict(d)
        if kwargs.get("amp") is False:  # YAML 1.1 reads a bare `off` as false
            kwargs["amp"] = "off"
        for name in ("prepared_roots", "train_cases", "val_cases", "lr_milestones"):
            value = kwargs.get(name)
            if value is not None:
                kwargs[name] = (value,) if isinstance(value, str) else tuple(value)
        return settings_from_dict(cls, kwargs, "training setting", source)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted keys replaced (``{"epochs": 5, "crop.crop_size_zyx": [64, 64, 64]}``)."""
        d = apply_dotted_overrides(self.to_dict(), overrides, "training", open_sections=("model_config",))
        return TrainConfig.from_dict(d)


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML/JSON file (a run's ``config.json`` works: its ``train`` entry is read), then
    dotted overrides."""
    return load_settings(TrainConfig(), TrainConfig.from_dict, path, "train", overrides)


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ (for refusing a resume that would change the run)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(prefix.rstrip("."))

    walk(a.to_dict(), b.to_dict(), "")
    return out
