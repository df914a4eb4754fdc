"""``nodulenet viewer [SCAN] [--results DIR]`` or ``nodulenet viewer --compare OUT``: the desktop viewer (registered by ``nodulenet.cli``).

Qt and VTK are the optional ``app`` extra and are imported only when the command runs (:mod:`nodulenet.app.launch`
checks they are there and that a display exists, in one line, exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def viewer_cmd(
    scan: Optional[Path] = typer.Argument(None, help="A scan to open: DICOM folder, .mhd, .nii/.nii.gz or .nrrd."),
    results: Optional[Path] = typer.Option(None, "--results", help="A predict output folder (or its nodules.json, "
                                           "or the `predict -o` folder holding it) to show; its scan is opened "
                                           "when SCAN is not given."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A folder `nodulenet compare` wrote: the prior "
                                           "and current scans side by side, crosshairs linked in registered space."),
) -> None:
    """Open the desktop viewer: scan views, detection (local, server, SSH), nodule table, export.
    Research software, not a medical device. Needs the optional "app" extra (PySide6 and VTK)."""
    from nodulenet.errors import InputError

    from nodulenet.app.launch import require_app_extra, run_viewer

    require_app_extra()
    if compare is not None:
        if scan is not None or results is not None:
            raise typer.BadParameter("--compare opens a comparison folder on its own: give no SCAN or --results")
        if not (compare / "comparison.json").is_file():
            raise InputError(compare, "has no comparison.json: give a folder `nodulenet compare` wrote")
        from nodulenet.app.launch import run_compare_viewer

        raise typer.Exit(run_compare_viewer(compare))
    if scan is not None and not scan.exists():
        raise InputError(scan, "does not exist")
    if results is not None:
        from nodulenet.io.findings import find_results_json

        results = find_results_json(results, scan)  # the scan's sub-folder of a `predict -o` folder; one-line error
    raise typer.Exit(run_viewer(scan, results))
