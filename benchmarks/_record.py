"""Shared by the benchmarks: describe the machine and record figures as JSON under benchmarks/results/.

Every benchmark prints its figures and calls :func:`record` so the numbers stay next to the machine that
produced them (CPU model, cores, memory, torch version, GPU if any).
"""

from __future__ import annotations

import json
import os
import resource
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nodulenet.machine import machine_info

__all__ = ["machine_info", "peak_rss_mib", "record"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def record(name: str, figures: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (figures + machine + UTC time) atomically and return its path."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "figures": figures,
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"recorded {path}")
    return path
