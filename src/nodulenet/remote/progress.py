"""Progress of an SSH run: rich bars on stderr, or one-line messages for a callback, and a log file.

``progress=True``: a byte bar for the upload and the download (with speed), a scan counter while the remote
``nodulenet predict`` runs, and every remote output line, prefixed ``host|``. ``progress=callable``: the same
as plain strings (the viewer shows them in its status bar), byte progress at most twice a second. Either way
``<out>/remote.log`` gets every message and remote line with a timestamp (transfers: one line when done).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_MB = 1e6


def _mb(n: float) -> str:
    return f"{n / _MB:.1f} MB"


class Reporter:
    """Where the runner's messages go (see the module docstring). A context manager: leaving it closes the log."""

    def __init__(self, progress: bool | Callable[[str], None], host: str, log_path: Path) -> None:
        self.callback: Callable[[str], None] | None = progress if callable(progress) else None
        self.rich = progress is True
        self.host = host
        self._log: IO[str] | None = open(log_path, "a", encoding="utf-8", buffering=1)
        self._console: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._kind = ""
        self._done = 0
        self._total = 0
        self._t0 = 0.0
        self._last_emit = 0.0

    def __enter__(self) -> Reporter:
        if self.rich:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        self._write(f"--- nodulenet predict --remote {self.host}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop_bar()
        if self._log is not None:
            self._log.close()
            self._log = None

    # ------------------------------------------------------------------------------------------ messages

    def _write(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def _print(self, text: str) -> None:
        if self._console is not None:
            from rich.markup import escape

            (self._bar.console if self._bar is not None else self._console).print(f"[dim]{escape(text)}[/]")

    def note(self, text: str) -> None:
        """A step of the run (connecting, work folder, warnings)."""
        self._write(text)
        self._print(text)
        if self.callback is not None:
            self.callback(text)

    def remote_line(self, line: str, *, is_result: bool = False) -> None:
        """One line of the remote ``nodulenet predict`` output; a result line advances the scan counter."""
        text = f"{self.host}| {line}"
        self._write(text)
        if self._console is not None:
            from rich.markup import escape

            target = self._bar.console if self._bar is not None else self._console
            target.print(f"[dim]{escape(self.host)}|[/] {escape(line)}")
        if self.callback is not None:
            self.callback(text)
        if is_result and self._bar is not None and self._kind == "remote":
            self._bar.advance(self._task)

    # ------------------------------------------------------------------------------------------ bars

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def start_remote(self, n_scans: int) -> None:
        self._stop_bar()
        self._kind = "remote"
        self.note(f"running nodulenet predict on {self.host} ({n_scans} scan(s))")
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]remote predict"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self._console, transient=False)
            self._task = self._bar.add_task("", total=n_scans)
            self._bar.start()

    def start_transfer(self, kind: str, total_bytes: int, description: str) -> None:
        """Begin the ``kind`` ("upload"/"download") byte bar."""
        self._stop_bar()
        self._kind, self._done, self._total = kind, 0, total_bytes
        self._t0 = self._last_emit = time.monotonic()
        self.note(f"{description}, {_mb(total_bytes)}")
        if self.rich:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._bar = Progress(TextColumn(f"[bold]{kind}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=self._console, transient=False)
            self._task = self._bar.add_task("", total=max(total_bytes, 1))
            self._bar.start()

    def advance_transfer(self, n_bytes: int) -> None:
        self._done += n_bytes
        if self._bar is not None:
            self._bar.advance(self._task, n_bytes)
        now = time.monotonic()
        if self.callback is not None and now - self._last_emit >= 0.5:
            self._last_emit = now
            pct = 100.0 * self._done / self._total if self._total else 100.0
            self.callback(f"{self._kind} {pct:.0f}% ({_mb(self._done)} of {_mb(self._total)})")

    def finish_transfer(self) -> None:
        seconds = max(time.monotonic() - self._t0, 1e-6)
        if self._bar is not None:
            self._bar.update(self._task, completed=max(self._total, 1))
        self._stop_bar()
        self.note(f"{self._kind} done: {_mb(self._done)} in {seconds:.1f} s ({self._done / _MB / seconds:.1f} MB/s)")
