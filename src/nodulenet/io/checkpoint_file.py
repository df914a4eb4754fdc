"""Read a PyTorch checkpoint file safely: the one reader for ``predict --weights``, training resume and import.

``torch.load(weights_only=True)`` accepts tensors, numbers, strings, lists and dicts and refuses pickled Python
objects, so a checkpoint from a stranger cannot run code. Every way a file can be unusable (absent, a folder,
damaged, pickled objects, not a dict) becomes one :class:`InputError` naming the file, whichever command read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict in ``path`` (CPU tensors); :class:`InputError` naming the file when it cannot be used."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(path, "checkpoint file does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file (e.g. model.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickled objects; say so instead of printing torch's long advice.
        raise InputError(path, f"not a plain checkpoint (it holds pickled Python objects, refused for safety: "
                               f"{str(exc).splitlines()[0][:200]})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises anything from IndexError to RuntimeError on garbage
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(path, f"not a PyTorch checkpoint file ({first_line})") from None
    if not isinstance(obj, Mapping):
        raise InputError(path, f"not a NoduleNet checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return dict(obj)
