"""Shared by the benchmarks: where the real data is, its LIDC-IDRI series folders, and median timing.

``DATA`` is ``$NODULENET_TEST_DATA`` (as for the tests), else the project's ``shared/data`` next to the
checkout. Timing takes the median of wall and CPU seconds over repeats: CPU seconds are the steadier figure
on a shared machine, wall seconds the one a user waits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DATA = Path(os.environ.get("NODULENET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def lidc_series(patient: str, data: Path = DATA) -> Path:
    """The one annotated series folder of ``patient`` (the folder that holds its readers' XML)."""
    found = [p.parent for p in (data / "LIDC-IDRI" / patient).glob("*/*/*.xml")]
    if len(found) != 1:
        raise SystemExit(f"expected one annotated series under {data / 'LIDC-IDRI' / patient}, found {len(found)}")
    return found[0]


def median_seconds(fn: Callable[[], T], repeats: int) -> tuple[float, float, T]:
    """Run ``fn`` ``repeats`` times: (median wall s, median CPU s, the last run's value)."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), value


def add_heldout_phantom_arguments(parser: argparse.ArgumentParser, *, first_seed: int, name: str,
                                  weights_help: str, out_help: str) -> None:
    """The arguments of a run on held-out phantoms: ``--n`` phantoms from seed ``--first-seed`` (see
    :func:`heldout_seeds`), the model ``--weights``, a folder ``--out`` to keep, ``--threads`` and the name of
    the JSON record ``--name``."""
    parser.add_argument("--n", type=int, default=10, help="number of held-out phantoms")
    parser.add_argument("--first-seed", type=int, default=first_seed)
    parser.add_argument("--weights", type=Path, default=None, help=weights_help)
    parser.add_argument("--out", type=Path, default=None, help=out_help)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=name, help="name of the JSON record")


def heldout_seeds(args: argparse.Namespace) -> list[int]:
    """The phantom seeds of :func:`add_heldout_phantom_arguments`: ``--first-seed`` and the ``--n - 1`` after it."""
    return list(range(args.first_seed, args.first_seed + args.n))
