"""Frozen settings dataclasses <-> plain JSON/YAML dicts, strictly: the one (de)serialiser every config uses.

Every stage's settings (:class:`~nodulenet.model.NoduleNetConfig`, ``PrepareConfig``, ``TrainConfig`` with its
``crop`` and ``augment`` sections, ...) are frozen dataclasses written into run folders and checkpoints as JSON
and read back from user YAML. The rules are the same for all of them, so they live here once:

- **unknown keys are an error** naming the setting with its dotted path (``lung.dilaton_mm``) and listing the
  known ones, so a typo never passes silently;
- a missing key takes the field's default;
- JSON has no tuples: a list is turned back into a tuple (recursively) where the field's default is a tuple;
- a field whose default is itself a settings dataclass is read recursively from a nested mapping.

Only the standard library is used, so ``model/`` (torch only) can use it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from nodulenet.errors import InputError

T = TypeVar("T")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return settings_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def settings_to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-able dict of a settings dataclass (tuples as lists, nested settings as dicts)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, (list, tuple)) else value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def reject_unknown_keys(d: Mapping[str, Any], cls: type, what: str, source: str | Path | None = None,
                        prefix: str = "") -> None:
    """:class:`InputError` listing the keys of ``d`` that are not fields of ``cls`` (with their dotted path)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InputError(source, f"unknown {what}(s) {', '.join(prefix + u for u in unknown)}; "
                                 f"known: {', '.join(prefix + k for k in known)}")


def settings_from_dict(cls: type[T], d: Any, what: str, source: str | Path | None = None, prefix: str = "") -> T:
    """Build the settings dataclass ``cls`` from ``d`` by the rules above; errors are :class:`InputError`."""
    if not isinstance(d, Mapping):
        where = f"'{prefix.rstrip('.')}'" if prefix else f"a {what} config"
        raise InputError(source, f"{where} must be a mapping, got {type(d).__name__}")
    reject_unknown_keys(d, cls, what, source, prefix)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in d:
            continue
        value, default = d[f.name], _default(f)
        if dataclasses.is_dataclass(default) and not isinstance(value, type(default)):
            value = settings_from_dict(type(default), value or {}, what, source, f"{prefix}{f.name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = _tupled(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(source, f"invalid {what}: {exc}") from None
