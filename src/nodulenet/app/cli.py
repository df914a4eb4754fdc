"""``nodulenet viewer [SCAN] [--results DIR]``: the desktop viewer (registered by ``nodulenet.cli``).

Qt and VTK are the optional ``app`` extra and are imported only when the command runs; without them, or without a
display, the command says what to do in one line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import typer

INSTALL_HINT = 'pip install "nodulenet[app]"'


def require_app_extra() -> None:
    """Raise a one-line NoduleNetError when PySide6 or VTK is missing, or when there is no display to open."""
    from nodulenet.errors import NoduleNetError

    missing = [name for name, module in (("PySide6", "PySide6.QtWidgets"), ("VTK", "vtkmodules"))
               if _find_spec(module) is None]
    if missing:
        raise NoduleNetError(f"the viewer needs {' and '.join(missing)} (the optional app extra): {INSTALL_HINT}")
    headless = (sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
                and not os.environ.get("WAYLAND_DISPLAY") and not os.environ.get("QT_QPA_PLATFORM"))
    if headless:
        raise NoduleNetError("no display to open the viewer on (DISPLAY is not set): run it on a desktop, over "
                             "`ssh -X`, or under `xvfb-run`")


def _find_spec(module: str) -> object | None:
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return None


def viewer_cmd(
    scan: Optional[Path] = typer.Argument(None, help="A scan to open: DICOM folder, .mhd, .nii/.nii.gz or .nrrd."),
    results: Optional[Path] = typer.Option(None, "--results", help="A predict output folder (or its nodules.json, "
                                           "or the `predict -o` folder holding it) to show; its scan is opened "
                                           "when SCAN is not given."),
) -> None:
    """Open the desktop viewer: scan views, detection (local, server, SSH), nodule table, export.
    Research software, not a medical device. Needs the optional "app" extra (PySide6 and VTK)."""
    from nodulenet.errors import InputError

    require_app_extra()
    if scan is not None and not scan.exists():
        raise InputError(scan, "does not exist")
    if results is not None:
        from nodulenet.io.findings import find_results_json

        results = find_results_json(results, scan)  # the scan's sub-folder of a `predict -o` folder; one-line error
    raise typer.Exit(run_viewer(scan, results))


def run_viewer(scan: Path | None = None, results: Path | None = None, argv: list[str] | None = None) -> int:
    """Start the application (the ``nodulenet viewer`` command): open ``scan`` and/or ``results``, run until the
    window closes, return the exit code. A log goes to ``viewer.log`` beside the results folder."""
    import logging

    from PySide6.QtWidgets import QApplication

    from nodulenet.app.main_window import MainWindow, default_results_root

    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("NoduleNet viewer")
    app.setOrganizationName("NoduleNet")
    root = default_results_root()
    root.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=root.parent / "viewer.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info("viewer started (scan %s, results %s)", scan, results)
    window = MainWindow()
    window.show()
    if scan is not None:
        window.open_scan(scan, results=results)
    elif results is not None:
        window.load_results(results)
    return int(app.exec())
