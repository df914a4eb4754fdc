"""Read a settings file (YAML or JSON) into a dict, for every stage's ``load_*_config``.

A stage's own output ``config.json`` nests its settings under one key (``prepare``, ``train``), so a user
can hand the file of an earlier run back in; ``section`` names that key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from nodulenet.errors import InputError


def read_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """The mapping in ``path`` (``.json`` as JSON, anything else as YAML); ``data[section]`` when the file is a
    run's ``config.json`` holding that section. Errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(p, f"cannot read the config file ({exc.strerror or exc})") from None
    is_json = p.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(p, f"not valid {'JSON' if is_json else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(p, f"expected a mapping of settings, found a {type(data).__name__}")
    if section is not None and isinstance(data.get(section), dict):
        return data[section]
    return data


class _Settings(Protocol):
    def with_overrides(self, overrides: dict[str, Any]) -> Any: ...


S = TypeVar("S", bound=_Settings)


def load_settings(defaults: S, reader: Any, path: str | Path | None, section: str,
                  overrides: dict[str, Any] | None) -> S:
    """Every stage's ``load_*_config``: ``defaults``, then the file at ``path`` read by ``reader(dict, source=)``
    (a run's own ``config.json`` works: its ``section`` entry is read), then dotted ``overrides``."""
    config = defaults
    if path is not None:
        config = reader(read_config_file(path, section=section), source=Path(path))
    if overrides:
        config = config.with_overrides(overrides)
    return config


def apply_dotted_overrides(
    settings: dict[str, Any], overrides: dict[str, Any], what: str, open_sections: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Set ``{"lung.dilation_mm": 5}``-style keys in the nested ``settings`` dict (in place; returned).

    A key must name an existing setting (a typo is an error, not a silently ignored option), except below a
    section listed in ``open_sections`` (free-form mappings). ``what`` names the settings in the message.
    """
    for key, value in overrides.items():
        parts = key.split(".")
        target = settings
        for part in parts[:-1]:
            if part not in target or not isinstance(target[part], dict):
                raise InputError(None, f"unknown {what} setting {key!r}")
            target = target[part]
        if parts[-1] not in target and parts[0] not in open_sections:
            raise InputError(None, f"unknown {what} setting {key!r}")
        target[parts[-1]] = value
    return settings


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of one ``--set``; the value is read as YAML (numbers, lists, null, true). Errors are one line."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(None, f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines with a caret drawing; its `problem` is the one that matters.
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(None, f"--set {key}: cannot read the value {value!r} as YAML ({problem})") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Repeated ``--set KEY=VALUE`` options as ``{"lung.dilation_mm": 5, ...}`` (a later KEY wins)."""
    return dict(parse_override(pair) for pair in pairs)
