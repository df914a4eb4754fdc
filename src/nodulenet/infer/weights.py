"""Find and load the weights ``nodulenet predict`` runs with: a user's checkpoint or the shipped demo model.

Accepted files (both read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts;
never a pickled object):

- our checkpoint (``nodulenet.model.to_checkpoint_dict``: ``format``, ``config``, ``state_dict``, ``extra``), as
  written by ``nodulenet train`` (``model.pt``, ``best.pt``, ``last.pt``);
- the published ``uci-cbcl/NoduleNet`` checkpoint (``{"epoch", "state_dict", ...}``, published configuration).

The preprocessing a model was trained with is read from the checkpoint's ``extra`` (``prepare_config``, or
``prepare``, a :meth:`PrepareConfig.to_dict` dict, possibly nested as in a prepared case's ``config.json``).
A checkpoint that records none (the published one) gets :class:`PrepareConfig` defaults, which reproduce the
published preprocessing; :attr:`LoadedModel.prepare_source` says which applied.

Without ``--weights`` the model shipped inside the package (``nodulenet/weights/demo.pt``) is used. When it is
not installed the error says so and how to pass ``--weights``: a network with random weights is never used
silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.checkpoint_file import read_checkpoint_file
from nodulenet.preprocess.config import PrepareConfig

SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED_WEIGHTS_NAME = "demo.pt"
# Keys of a checkpoint's ``extra`` that may hold the preprocessing config, in order of preference.
PREPARE_CONFIG_KEYS = ("prepare_config", "prepare")


class NoShippedModelError(NoduleNetError):
    """``--weights`` was not given and the package holds no shipped demo model."""


@dataclass
class LoadedModel:
    """A network ready for inference, with everything needed to reproduce its input and describe it."""

    model: Any  # nodulenet.model.NoduleNet (typed loosely so importing this module does not import torch)
    net_config: Any  # nodulenet.model.NoduleNetConfig
    prepare_config: PrepareConfig
    prepare_source: str  # "checkpoint" or "defaults (the checkpoint records none)"
    weights_path: Path
    weights_sha256: str
    config_sha256: str
    shipped: bool
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(getattr(self.net_config, "name", "NoduleNet"))


def shipped_weights_path(weights_dir: Path | None = None) -> Path:
    """The shipped demo model's file; :class:`NoShippedModelError` (with the remedy) when it is absent."""
    folder = Path(weights_dir) if weights_dir is not None else SHIPPED_WEIGHTS_DIR
    path = folder / SHIPPED_WEIGHTS_NAME
    if not path.is_file():
        raise NoShippedModelError(
            f"no shipped model is installed (looked for {path}). Pass --weights PATH with a NoduleNet checkpoint: "
            "a model.pt/best.pt written by 'nodulenet train', or the published uci-cbcl/NoduleNet .ckpt file."
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config_dict: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(config_dict), sort_keys=True).encode()).hexdigest()


def prepare_config_from_extra(extra: Mapping[str, Any], path: Path) -> PrepareConfig | None:
    """The :class:`PrepareConfig` a checkpoint records, or None when it records none."""
    for key in PREPARE_CONFIG_KEYS:
        value = extra.get(key)
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(value.get("prepare"), Mapping):
            value = value["prepare"]  # a prepared case's config.json, copied whole
        if not isinstance(value, Mapping):
            raise InputError(path, f"checkpoint extra[{key!r}] must be a preprocessing config mapping")
        # Written by this package's PrepareConfig.to_dict; overlay only concerns case folders.
        return PrepareConfig.from_dict(dict(value), source=path)
    return None


def load_model(weights: str | Path | None = None, device: str = "cpu", *,
               weights_dir: Path | None = None) -> LoadedModel:
    """Load ``weights`` (or the shipped demo model when None) onto ``device``, in eval mode.

    Raises :class:`InputError` naming the file for anything wrong with it (unreadable, not a checkpoint,
    weights that do not match the configuration it records) and :class:`NoShippedModelError` when no
    weights were given and none are shipped.
    """
    from nodulenet.model import CheckpointMismatchError, model_from_checkpoint_dict

    shipped = weights is None
    path = shipped_weights_path(weights_dir) if shipped else Path(weights)  # type: ignore[arg-type]
    obj = read_checkpoint_file(path)
    try:
        loaded = model_from_checkpoint_dict(obj)
    except CheckpointMismatchError as exc:
        raise InputError(path, f"the weights do not match the network configuration: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a usable NoduleNet checkpoint: {exc}") from None
    extra = dict(loaded.extra or {})
    prepare = prepare_config_from_extra(extra, path)
    notes = []
    if loaded.import_report is not None:
        notes.append(f"published checkpoint: {loaded.import_report.summary()}")
    if prepare is None:
        prepare = PrepareConfig()
        source = "defaults (the checkpoint records none)"
    else:
        source = "checkpoint"
    model = loaded.model.to(device).eval()
    return LoadedModel(
        model=model,
        net_config=loaded.config,
        prepare_config=prepare,
        prepare_source=source,
        weights_path=path.resolve(),
        weights_sha256=file_sha256(path),
        config_sha256=config_sha256(loaded.config.to_dict()),
        shipped=shipped,
        extra=extra,
        notes=notes,
    )
