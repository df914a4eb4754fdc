"""Errors a user can act on.

Every error raised because of bad input names the file (or folder) and says what is wrong with it, so
the CLI can print one line instead of a traceback from deep inside numpy or SimpleITK.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NoduleNetError(Exception):
    """Base class for errors the CLI reports as one clear message (exit code 2)."""


class InputError(NoduleNetError, ValueError):
    """A file or folder given by the user cannot be used; ``path`` names it, ``problem`` says why."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class OutputFolderError(NoduleNetError):
    """An output folder cannot be created or written (its parent is a file, no permission, a read-only or
    virtual file system); nothing was written."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@contextmanager
def text_file_errors(path: Path, expected: str | None = None) -> Iterator[None]:
    """Reading ``path`` as UTF-8 text inside this block: a missing, unreadable or binary file is one
    :class:`InputError` line (``expected`` names the file kind wanted, for the binary case)."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file" + (f" (expected {expected})" if expected else "")) from None
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
