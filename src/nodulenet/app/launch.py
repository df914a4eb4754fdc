"""Start the desktop viewer (for ``nodulenet viewer``, :mod:`nodulenet.commands.viewer`) and check it can start.

Qt and VTK are the optional ``app`` extra and are imported only when the command runs; without them, or without a
display, the command says what to do in one line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

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


def run_compare_viewer(folder: Path, argv: list[str] | None = None) -> int:
    """``nodulenet viewer --compare OUT``: the follow-up viewer (:mod:`nodulenet.app.compare_window`) on a folder
    ``nodulenet compare`` wrote; runs until the window closes."""
    from PySide6.QtWidgets import QApplication

    from nodulenet.app.compare_window import CompareWindow

    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("NoduleNet follow-up viewer")
    window = CompareWindow()
    window.show()
    window.open_comparison(folder)
    return int(app.exec())
