"""Checkpoint dicts: import of the published NoduleNet weights, and our own checkpoint format.

Everything here works on IN-MEMORY dicts (``model/`` never reads files): the caller ``torch.load``s the file
(``weights_only=True`` works for both formats: they hold only tensors, numbers, strings, lists and dicts) and
writes our dicts with ``torch.save`` through ``nodulenet.io.atomic.atomic_path``.

Published checkpoint (``uci-cbcl/NoduleNet``, e.g. ``200.ckpt``): ``{"epoch", "out_dir", "state_dict",
"optimizer"}``. Its ``state_dict`` uses the same names and shapes as :class:`~nodulenet.model.nodulenet.NoduleNet`
with the default config, except three mask-head layers its forward never uses (``mask_head.up1``, ``.back1``,
``.logits2``: 442,817 parameters), which :func:`import_published_state_dict` drops and reports. A ``module.``
prefix (``nn.DataParallel``) is stripped; BatchNorm ``num_batches_tracked`` buffers, absent from checkpoints
written by PyTorch < 0.4.1, are filled with 0 (they only matter for ``momentum=None``, not used here).

Our format (:func:`to_checkpoint_dict`)::

    {"format": "nodulenet-checkpoint", "format_version": 1, "nodulenet_version": "0.1.0",
     "config": NoduleNetConfig.to_dict(), "state_dict": {...}, "extra": {JSON-able}}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import NoduleNetConfig

if TYPE_CHECKING:
    from .nodulenet import NoduleNet

CHECKPOINT_FORMAT = "nodulenet-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
# Layers defined by the published MaskHead but never called in its forward.
PUBLISHED_DEAD_PREFIXES: tuple[str, ...] = ("mask_head.up1.", "mask_head.back1.", "mask_head.logits2.")
# The published eval pads its scans with raw 0 (utils.util.pad2factor), i.e. (0 - 128) / 128 for the network.
PUBLISHED_EVAL_PAD_VALUE = -1.0
_PREFIXES_TO_STRIP: tuple[str, ...] = ("module.",)
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """The weights do not fit the network: lists the missing, unexpected and mis-shaped keys."""


@dataclass
class ImportReport:
    """What :func:`import_published_state_dict` did to the published weights."""

    source_keys: int
    stripped_prefix: str | None
    dropped_dead_keys: list[str]
    dropped_dead_parameters: int
    filled_missing_buffers: list[str]
    converted_dtypes: list[str]
    epoch: int | None
    num_parameters: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"imported {self.source_keys} keys ({self.num_parameters:,} parameters kept)"]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.dropped_dead_keys:
            parts.append(
                f"dropped {len(self.dropped_dead_keys)} unused published keys "
                f"({self.dropped_dead_parameters:,} parameters: mask_head.up1/back1/logits2)"
            )
        if self.filled_missing_buffers:
            parts.append(f"filled {len(self.filled_missing_buffers)} missing num_batches_tracked buffers with 0")
        if self.converted_dtypes:
            parts.append(f"converted {len(self.converted_dtypes)} tensors to the model dtype")
        return "; ".join(parts + self.notes)


def _state_dict_of(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], int | None]:
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"expected a dict (a torch.load'ed checkpoint), got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        epoch = obj.get("epoch")
        return obj["state_dict"], int(epoch) if isinstance(epoch, (int, float)) else None
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, None
    raise CheckpointMismatchError(
        "not a NoduleNet checkpoint: no 'state_dict' entry and not a bare state dict of tensors "
        f"(top-level keys: {sorted(map(str, obj))[:_MAX_LISTED]})"
    )


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _match_state_dict(
    source: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Check names/shapes against ``expected``; return (state_dict, filled buffers, dtype conversions)."""
    missing = [k for k in expected if k not in source]
    filled = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in expected]
    misshaped = [
        f"{k} {tuple(source[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in source
        if k in expected and isinstance(source[k], Tensor) and tuple(source[k].shape) != tuple(expected[k].shape)
    ]
    not_tensors = [k for k in source if k in expected and not isinstance(source[k], Tensor)]
    if missing or unexpected or misshaped or not_tensors:
        lines = [f"{what} does not match the network:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", misshaped),
            ("values that are not tensors", not_tensors),
        ):
            if items:
                lines.append("  " + _listing(title, items))
        raise CheckpointMismatchError("\n".join(lines))
    out: dict[str, Tensor] = {}
    converted: list[str] = []
    for k, ref in expected.items():
        if k in filled:
            out[k] = torch.zeros(ref.shape, dtype=ref.dtype)  # not zeros_like: ``expected`` may be on "meta"
            continue
        t = source[k].detach()
        if t.dtype != ref.dtype:
            converted.append(f"{k}: {t.dtype} -> {ref.dtype}")
            t = t.to(ref.dtype)
        out[k] = t
    return out, filled, converted


def imported_published_config() -> NoduleNetConfig:
    """The configuration an imported published checkpoint runs with: the published network and its test-time
    post-processing (``tests/test_published_detections.py`` checks that ``predict`` then gives the published code's
    proposals, detections, scores, mask crops, masks and mask NMS on a fixed input).

    Three settings differ from :class:`NoduleNetConfig`'s defaults, which our own models keep: the published mask
    crops (``mask_crop_frame="published"``: its mask head was trained on them); no RPN top-n caps at test time (the
    published ``rpn_nms`` keeps every box above 0.5 through NMS; our caps of 6,000 / 1,000 bound the cost on
    uncertain models); and the pad value of the published eval, which pads a scan's far ends to a multiple of 16
    with raw 0 (``pad2factor``'s default; -1.0 after ``(raw - 128) / 128``), not the 170 of its training crops."""
    return dataclasses.replace(NoduleNetConfig(), mask_crop_frame="published", rpn_test_pre_nms_top_n=None,
                               rpn_test_post_nms_top_n=None, pad_value=PUBLISHED_EVAL_PAD_VALUE)


def import_published_state_dict(
    obj: Mapping[str, Any], config: NoduleNetConfig | None = None
) -> tuple[dict[str, Tensor], ImportReport]:
    """Map a published NoduleNet checkpoint onto our network's ``state_dict``.

    ``obj`` is the ``torch.load``ed dict (its ``state_dict`` entry holds the weights) or a bare state dict.
    Returns ``(state_dict, report)``; ``model.load_state_dict(state_dict)`` then loads strictly.
    Raises :class:`CheckpointMismatchError` listing missing / unexpected / mis-shaped keys when it does not fit
    ``config`` (default: the published configuration).
    """
    from .nodulenet import NoduleNet  # local: nodulenet imports this module's siblings, not this module

    config = config or NoduleNetConfig()
    raw, epoch = _state_dict_of(obj)
    stripped: str | None = None
    keys = [str(k) for k in raw]
    for prefix in _PREFIXES_TO_STRIP:
        if keys and all(k.startswith(prefix) for k in keys):
            raw = {k[len(prefix) :]: v for k, v in raw.items()}
            stripped = prefix
            break
    dead = [k for k in raw if k.startswith(PUBLISHED_DEAD_PREFIXES)]
    dead_params = sum(v.numel() for k, v in raw.items() if k in dead and isinstance(v, Tensor))
    kept = {k: v for k, v in raw.items() if k not in dead}

    with torch.device("meta"):  # shapes only: no memory, no init cost
        expected = NoduleNet(config).state_dict()
    state_dict, filled, converted = _match_state_dict(kept, expected, "published checkpoint")
    num_params = sum(v.numel() for k, v in state_dict.items() if not _is_buffer_name(k))
    report = ImportReport(
        source_keys=len(raw),
        stripped_prefix=stripped,
        dropped_dead_keys=sorted(dead),
        dropped_dead_parameters=int(dead_params),
        filled_missing_buffers=filled,
        converted_dtypes=converted,
        epoch=epoch,
        num_parameters=int(num_params),
    )
    return state_dict, report


def _is_buffer_name(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def to_checkpoint_dict(
    model: torch.nn.Module, config: NoduleNetConfig, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Our checkpoint as a dict for ``torch.save`` (tensors moved to CPU; ``extra`` must be JSON-able)."""
    from .. import __version__

    extra_dict = dict(extra or {})
    try:
        json.dumps(extra_dict)
    except TypeError as exc:
        raise ValueError(f"checkpoint 'extra' must be JSON-able (no pickled objects): {exc}") from exc
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "nodulenet_version": __version__,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra_dict,
    }


@dataclass
class LoadedCheckpoint:
    model: NoduleNet
    config: NoduleNetConfig
    extra: dict[str, Any]
    import_report: ImportReport | None  # set when the dict was a published checkpoint


def is_published_checkpoint(obj: Mapping[str, Any]) -> bool:
    """True for a published NoduleNet checkpoint (or bare state dict), False for ours."""
    return isinstance(obj, Mapping) and obj.get("format") != CHECKPOINT_FORMAT


def model_from_checkpoint_dict(d: Mapping[str, Any]) -> LoadedCheckpoint:
    """Build the network from our checkpoint dict, or from a published one (with the published config).

    Raises :class:`CheckpointMismatchError` when the weights do not fit, ``ValueError`` for a newer format.
    """
    from .nodulenet import NoduleNet

    if is_published_checkpoint(d):
        state_dict, report = import_published_state_dict(d)
        config = imported_published_config()
        model = NoduleNet(config)
        model.load_state_dict(state_dict)
        return LoadedCheckpoint(model=model, config=config, extra={}, import_report=report)
    version = d.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format_version {version!r} is not supported by this nodulenet "
            f"(supports <= {CHECKPOINT_FORMAT_VERSION}; written by nodulenet {d.get('nodulenet_version')!r})"
        )
    config = NoduleNetConfig.from_dict(dict(d["config"]))
    model = NoduleNet(config)
    state_dict, _, _ = _match_state_dict(d["state_dict"], model.state_dict(), "checkpoint")
    model.load_state_dict(state_dict)
    return LoadedCheckpoint(model=model, config=config, extra=dict(d.get("extra") or {}), import_report=None)
