"""Regenerate the viewer screenshots of the documentation: ``python -m nodulenet.app.screenshots OUTDIR``.

Drives the real application (:class:`~nodulenet.app.main_window.MainWindow`) the way a user does: open a scan,
run local detection with the shipped model, select a nodule, save the window as PNG:

- ``viewer_phantom.png``: the demo phantom (``nodulenet phantom --seed 0``: ``nodulenet demo``'s scan),
  the table at score >= 0.9, the finding nearest the phantom's largest nodule selected;
- ``viewer_lidc.png`` (with ``--lidc SERIES_DIR``): LIDC-IDRI-0001 at score >= 0.9, the finding nearest its
  LUNA16 nodule (23.4 mm at (56.21, 86.34, -115.87) mm, ``annotations.csv``) selected.
  LIDC-IDRI images: The Cancer Imaging Archive (TCIA), CC BY 3.0.
- ``viewer_compare.png``: the follow-up viewer (:mod:`.compare_window`) on ``nodulenet compare`` of the synthetic
  follow-up pair (seed 11, 180 days, shipped model), the grown nodule selected.

Needs a display; on a machine without one::

    xvfb-run -a -s "-screen 0 1600x1000x24" python -m nodulenet.app.screenshots docs/images \\
        --lidc "$NODULENET_TEST_DATA/LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>"
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LIDC_0001_NODULE_XYZ_MM = (56.21, 86.34, -115.87)  # LUNA16 annotations.csv, 23.4 mm
WINDOW_SIZE = (1500, 920)


class WaitTimeout(RuntimeError):
    """:func:`wait_for` gave up: what it waited for did not happen in time."""


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Run the Qt event loop until ``predicate()`` holds; :class:`WaitTimeout` after ``timeout_s``."""
    from PySide6.QtCore import QDeadlineTimer, QEventLoop, QTimer

    loop = QEventLoop()
    deadline = QDeadlineTimer(int(timeout_s * 1000))
    timer = QTimer()
    timer.setInterval(25)
    timer.timeout.connect(lambda: (predicate() or deadline.hasExpired()) and loop.quit())
    timer.start()
    if not predicate():
        loop.exec()
    timer.stop()
    if not predicate():
        raise WaitTimeout(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _detect(window: object, scan: Path, threshold: float) -> None:
    from nodulenet.app.main_window import MainWindow

    assert isinstance(window, MainWindow)
    opened: list[bool] = []
    window.scan_loaded.connect(lambda: opened.append(True))
    n_messages = len(window.messages)
    window.open_scan(scan)
    wait_for(lambda: bool(opened) or len(window.messages) > n_messages, 300, f"{scan} to open")
    window.scan_loaded.disconnect()
    if not opened:
        raise RuntimeError(window.messages[-1])
    window.panel.detect_threshold_box.setValue(threshold)
    outcome: list[str] = []
    window.detection_finished.connect(outcome.append)
    started = time.perf_counter()
    window.run_local_detection()
    wait_for(lambda: bool(outcome), 900, "detection")
    window.detection_finished.disconnect()
    if outcome != ["succeeded"]:
        raise RuntimeError(f"detection {outcome[0]}: {window.messages[-1:]}")
    wait_for(lambda: window.results is not None, 120, "the results")
    print(f"  {scan.name}: {len(window.results.findings.findings)} finding(s) in "  # type: ignore[union-attr]
          f"{time.perf_counter() - started:.0f} s")


def _select_nearest(window: object, point_xyz_mm: Sequence[float]) -> None:
    findings = window.results.findings.findings  # type: ignore[attr-defined]
    visible = set(window.panel.visible_ids())  # type: ignore[attr-defined]
    nearest = min((f for f in findings if f.id in visible),
                  key=lambda f: math.dist(f.center_world_xyz_mm, point_xyz_mm))
    window.select_finding(nearest.id)  # type: ignore[attr-defined]
    distance = math.dist(nearest.center_world_xyz_mm, point_xyz_mm)
    print(f"  selected finding {nearest.id} (score {nearest.score:.3f}), {distance:.1f} mm from the target")


def _shoot(window: object, path: Path) -> None:
    from PySide6.QtWidgets import QApplication

    for _ in range(5):  # let the 3D view and the table settle
        QApplication.processEvents()
        time.sleep(0.05)
    window.save_screenshot("window", path)  # type: ignore[attr-defined]
    print(f"wrote {path}")


def _compare_screenshot(work: Path, path: Path) -> Path:
    """``nodulenet compare`` on the synthetic follow-up pair, opened in the follow-up viewer, grown nodule selected."""
    from PySide6.QtWidgets import QApplication

    from nodulenet.app.compare_window import CompareWindow

    # In child processes: the pair's generator lives in followup/preprocess, which the app layer does not import.
    pair = work / "followup"
    subprocess.run([sys.executable, "-c", "import sys; from nodulenet.followup.synthetic import write_followup_pair; "
                    "write_followup_pair(sys.argv[1], 11, interval_days=180.0)", str(pair)],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "nodulenet", "compare", str(pair / "prior.nii.gz"),
                    str(pair / "current.nii.gz"), "-o", str(work / "compare"), "--interval-days", "180"],
                   check=True, capture_output=True, timeout=900)
    window = CompareWindow()
    window.resize(*WINDOW_SIZE)
    window.show()
    try:
        window.open_comparison(work / "compare")
        wait_for(lambda: window.loaded is not None or bool(window.messages), 300, "the comparison to open")
        if window.loaded is None:
            raise RuntimeError(window.messages[-1])
        nodules = window.loaded.comparison["nodules"]
        grown = max(range(len(nodules)), key=lambda r: nodules[r].get("volume_change_percent") or -math.inf)
        window.select_nodule(grown)
        for _ in range(5):  # let the table and views settle
            QApplication.processEvents()
            time.sleep(0.05)
        window.save_screenshot(path)
        print(f"wrote {path}")
    finally:
        window.close()
    return path


def make_screenshots(out_dir: Path, lidc_series: Path | None, work: Path) -> list[Path]:
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from nodulenet.app.main_window import MainWindow

    app = QApplication.instance() or QApplication(["nodulenet-screenshots"])
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat)
    written = []
    window = MainWindow(settings=settings, results_root=work / "results")
    window.resize(*WINDOW_SIZE)
    window.show()
    app.processEvents()
    try:
        # `nodulenet phantom` (the app layer does not import preprocess): the demo's scan, seed 0, defaults.
        subprocess.run([sys.executable, "-m", "nodulenet", "phantom", str(work / "phantom"), "--seed", "0"],
                       check=True, capture_output=True, timeout=300)
        truth = json.loads((work / "phantom" / "nodules.json").read_text())["nodules"]
        _detect(window, work / "phantom" / "scan.nii.gz", 0.5)
        window.set_threshold(0.9)
        largest = max(truth, key=lambda n: n["diameter_mm"])
        _select_nearest(window, largest["center_world_xyz_mm"])
        written.append(out_dir / "viewer_phantom.png")
        _shoot(window, written[-1])
        if lidc_series is not None:
            _detect(window, lidc_series, 0.5)
            window.set_threshold(0.9)
            _select_nearest(window, LIDC_0001_NODULE_XYZ_MM)
            written.append(out_dir / "viewer_lidc.png")
            _shoot(window, written[-1])
        written.append(_compare_screenshot(work, out_dir / "viewer_compare.png"))
    finally:
        window.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodulenet.app.screenshots", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the PNG files go (docs/images)")
    parser.add_argument("--lidc", type=Path, default=None, help="the LIDC-IDRI-0001 CT series folder")
    args = parser.parse_args(argv)
    from nodulenet.app.launch import require_app_extra
    from nodulenet.errors import NoduleNetError

    try:
        require_app_extra()
    except NoduleNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nodulenet-screenshots-") as work:
        make_screenshots(args.out_dir, args.lidc, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
