"""The benchmark's memory between runs: ``OUT/benchmark_state.json`` and the readable ``OUT/benchmark.log``.

The state records the settings of the run (so ``--resume`` refuses to continue with other ones) and which stages
are finished: ``prepare``, then per fold ``train`` and ``predict``, then ``evaluate``. It is rewritten atomically
after every stage, so a run killed at any point resumes after the last finished stage. Inside a stage the stage's
own resumability does the rest: prepared cases are skipped (``done.json``), training continues from ``last.pt``,
predicted scans are skipped (their ``candidates.json`` / ``nodules.json``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nodulenet
from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic

STATE_FILE = "benchmark_state.json"
LOG_FILE = "benchmark.log"
STATE_FORMAT = "nodulenet-benchmark/1"
# Settings that may change on --resume: they decide how fast, not what is computed.
RUNTIME_SETTINGS = frozenset({"workers", "gpus", "threads", "progress"})


@dataclass
class BenchmarkState:
    """What is finished (see the module doc); ``path`` is ``OUT/benchmark_state.json``."""

    path: Path
    dataset: str
    settings: dict[str, Any]
    stages: dict[str, Any] = field(default_factory=dict)

    def done(self, key: str) -> bool:
        return bool(self.stages.get(key, {}).get("status") == "done")

    def finish(self, key: str, **info: Any) -> None:
        self.stages[key] = {"status": "done", "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"format": STATE_FORMAT, "nodulenet_version": nodulenet.__version__,
                                      "dataset": self.dataset, "settings": self.settings, "stages": self.stages})


def open_state(out: Path, dataset: str, settings: dict[str, Any], resume: bool) -> BenchmarkState:
    """A fresh state for a new run, or the stored one for ``resume`` (same dataset and settings required)."""
    path = out / STATE_FILE
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        state = BenchmarkState(path, dataset, settings)
        state.save()
        return state
    if not resume:
        raise InputError(out, f"already holds a benchmark run ({STATE_FILE}); continue it with --resume or "
                              "choose another -o")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the benchmark state ({exc})") from None
    if stored.get("format") != STATE_FORMAT or stored.get("dataset") != dataset:
        raise InputError(path, f"not a {dataset} benchmark state (format {stored.get('format')!r}, "
                               f"dataset {stored.get('dataset')!r})")
    old = stored.get("settings", {})
    changed = sorted(k for k in set(old) | set(settings) if k not in RUNTIME_SETTINGS and old.get(k) != settings.get(k))
    if changed:
        raise InputError(path, f"the run was started with other settings for {changed}; resume with the same "
                               "ones or choose another -o")
    return BenchmarkState(path, dataset, {**old, **settings}, dict(stored.get("stages", {})))


def open_log(out: Path) -> logging.Logger:
    """A logger appending to ``OUT/benchmark.log`` (close it with :func:`close_log`)."""
    log = logging.getLogger(f"nodulenet.benchmark.run.{out.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def close_log(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


@contextmanager
def benchmark_log(out: Path) -> Iterator[logging.Logger]:
    """``OUT/benchmark.log`` for the duration of a run; a run that stops on an error says so there last."""
    log = open_log(out)
    try:
        yield log
    except BaseException as exc:
        log.error("stopped: %s: %s", type(exc).__name__, exc)
        raise
    finally:
        close_log(log)


class StageAnnouncer:
    """Numbers the stages of a run ("[3/8] fold 0: predict ...") in the log and, with progress, on the console;
    remembers the ones skipped as already done."""

    def __init__(self, log: logging.Logger, n_stages: int, console: Any = None) -> None:
        self.log, self.n_stages, self.console = log, n_stages, console
        self.step = 0
        self.skipped: list[str] = []

    def __call__(self, what: str, done: bool) -> None:
        self.step += 1
        line = f"[{self.step}/{self.n_stages}] {what}" + (" - already done, skipped" if done else "")
        self.log.info(line)
        if self.console is not None:
            self.console.rule(line, style="dim" if done else "bold")
        if done:
            self.skipped.append(what)
