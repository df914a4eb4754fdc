"""``nodulenet compare PRIOR CURRENT -o OUT``: follow-up reading of two exams (registered by ``nodulenet.cli``).

A thin wrapper over :func:`nodulenet.followup.compare_api.compare_scans`; see that module for what it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def compare_cmd(
    prior: Path = typer.Argument(..., help="The earlier exam: a scan (DICOM folder, .mhd, .nii.gz, .nrrd) or a "
                                           "folder `nodulenet predict` wrote for it."),
    current: Path = typer.Argument(..., help="The later exam, likewise."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: comparison.json, comparison.html (and "
                                                      "prior/, current/ when scans are given)."),
    interval_days: Optional[float] = typer.Option(None, "--interval-days", help="Days between the exams (default: "
                                                  "from the DICOM StudyDates; needed when a scan has none)."),
    force: bool = typer.Option(False, "--force", help="Compare scans whose PatientIDs differ."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint for scans given as images "
                                           "(default: the shipped demo model)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Nodules scoring at least this are compared."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Compare a prior and a current CT: new, resolved and persistent nodules, growth, volume doubling time,
    Lung-RADS v2022 (a decision aid, not a diagnosis). Research software, not a medical device."""
    from rich.console import Console
    from rich.table import Table

    from nodulenet.followup.compare_api import CompareOptions, compare_scans
    from nodulenet.predict_api import PredictOptions

    options = CompareOptions(interval_days=interval_days, force=force,
                             predict=PredictOptions(weights=weights, threshold=threshold, device=device))
    result = compare_scans(prior, current, out, options)
    c = result.comparison
    table = Table(title=f"Follow-up over {c['interval_days']:.0f} days ({c['interval_source']})")
    for column in ("status", "type", "prior mm", "current mm", "volume %", "VDT d", "Lung-RADS"):
        table.add_column(column)
    for n in c["nodules"]:
        side = n["current"] or n["prior"]
        table.add_row(n["status"], side["nodule_type"],
                      "-" if n["prior"] is None else f"{n['prior']['mean_diameter_mm']:.1f}",
                      "-" if n["current"] is None else f"{n['current']['mean_diameter_mm']:.1f}",
                      "-" if n.get("volume_change_percent") is None else f"{n['volume_change_percent']:+.0f}",
                      "-" if n.get("volume_doubling_time_days") is None else f"{n['volume_doubling_time_days']:.0f}",
                      "-" if not n.get("lung_rads") else n["lung_rads"]["category"])
    console = Console(width=max(Console().width, 120))
    console.print(table)
    exam = c["lung_rads"]["exam"]
    console.print(f"Lung-RADS v2022 exam category {exam['category']} ({exam['rule']}); a decision aid, not a "
                  "diagnosis.", highlight=False)
    written = [result.json_path, result.html_path, *([result.sr_path] if result.sr_path else [])]
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False, soft_wrap=True)
