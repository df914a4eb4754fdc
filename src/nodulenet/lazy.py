"""Package attributes imported on first use (PEP 562), so ``import nodulenet.io`` does not load SimpleITK/pydicom.

A package lists ``{attribute: module}`` (or builds it with :func:`by_module` from ``{module: attributes}``) and
sets ``__getattr__ = lazy_getattr(__name__, table)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` when ``package.name`` is first looked up."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def by_module(names: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{attribute: module}`` from ``{module: its attributes}`` (each module named once), in the given order."""
    return {name: module for module, attributes in names.items() for name in attributes}
