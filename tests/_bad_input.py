"""The check every bad-input test of ``nodulenet predict`` makes: exit 2, one ``failed <path>: <problem>`` line
holding every expected text, no traceback, and nothing in the output folder but the run's config and summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def assert_one_clean_failure(result: Any, out: Path, expected: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``result`` of a Typer ``CliRunner`` predict run into ``out``; returns ``summary.json``'s content."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    failed_lines = [line for line in result.output.splitlines() if line.startswith("failed ")]
    assert len(failed_lines) == 1, result.output
    assert all(text in failed_lines[0] for text in expected), failed_lines[0]
    # nothing half-written: no scan folder, no temp files; only the run's config and summary
    assert sorted(p.name for p in out.iterdir()) == ["predict_config.json", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (0, 1)
    assert summary["scans"][0]["traceback"] is None
    return summary
