"""Errors a user can act on.

Every error raised because of bad input names the file (or folder) and says what is wrong with it, so
the CLI can print one line instead of a traceback from deep inside numpy or SimpleITK.
"""

from __future__ import annotations

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
