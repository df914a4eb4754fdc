"""The follow-up viewer: the prior and the current scan side by side, crosshairs linked in registered space.

Opened with ``nodulenet viewer --compare OUT`` on a folder ``nodulenet compare`` wrote: it reads
``comparison.json``, both exams' result folders (``nodules.json`` and label map, :func:`.loading.read_results`),
the scans they name, and the registration ``current_to_prior.tfm`` (an ITK transform mapping current-scan points to
prior-scan points, world LPS mm).

Layout: two axial :class:`~nodulenet.app.slice_view.SliceView` (prior left, current right) with the nodules' outlines
and boxes, and under them the comparison table (status, type, both mean diameters, volume change, doubling time,
Lung-RADS). Putting the crosshair somewhere in one view (click, drag, or scrolling its slices) moves the other
view's crosshair to the same anatomical point: voxel -> world of that scan -> through the registration -> world of
the other scan -> voxel. Selecting a row puts each view on that nodule in its own scan; a nodule seen on one scan
only puts the other view on the registered point.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QMainWindow, QMessageBox, QSplitter,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from nodulenet.app.loading import BackgroundCall, LoadedResults, read_results
from nodulenet.app.qt_compat import guard_none_refcount
from nodulenet.app.reslice import WINDOW_PRESETS, PatientAxes
from nodulenet.app.slice_view import SliceView
from nodulenet.errors import InputError
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

SIDES = ("prior", "current")
COLUMNS = ("Status", "Type", "Prior mm", "Current mm", "Volume %", "VDT d", "Lung-RADS")


@dataclass
class LoadedExam:
    volume: Volume
    results: LoadedResults
    axes: PatientAxes


@dataclass
class LoadedComparison:
    folder: Path
    comparison: dict[str, Any]
    exams: dict[str, LoadedExam]
    current_to_prior: Any  # SimpleITK.Transform
    prior_to_current: Any

    def map_point(self, from_side: str, xyz_mm: Any) -> np.ndarray:
        """A world point (LPS mm) of one exam's scan at the same anatomy in the other's."""
        transform = self.prior_to_current if from_side == "prior" else self.current_to_prior
        return np.asarray(transform.TransformPoint(tuple(float(v) for v in xyz_mm)), dtype=np.float64)


def load_comparison(folder: str | Path) -> LoadedComparison:
    """Read a ``nodulenet compare`` output folder (module doc); a missing or foreign file is an InputError."""
    import SimpleITK as sitk

    from nodulenet.followup.compare_api import SCHEMA, TRANSFORM_FILE
    from nodulenet.io.scan import read_scan

    folder = Path(folder)
    json_path = folder / "comparison.json" if folder.is_dir() else folder
    if not json_path.is_file():
        raise InputError(folder, "has no comparison.json: open a folder `nodulenet compare` wrote")
    try:
        comparison = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(json_path, f"cannot be read as JSON ({exc})") from None
    if comparison.get("schema") != SCHEMA:
        raise InputError(json_path, f"schema {comparison.get('schema')!r} is not {SCHEMA!r}")
    transform_path = json_path.parent / comparison.get("registration", {}).get("transform_file", TRANSFORM_FILE)
    if not transform_path.is_file():
        raise InputError(json_path.parent, f"has no registration transform ({transform_path.name}): run "
                                           "`nodulenet compare` again to write it")
    current_to_prior = sitk.ReadTransform(str(transform_path))
    exams = {}
    for side in SIDES:
        record = comparison[side]
        volume = read_scan(record["scan"], record.get("series_instance_uid"))
        results = read_results(record["result_dir"], volume)
        exams[side] = LoadedExam(volume, results, PatientAxes.from_geometry(volume.geometry))
    return LoadedComparison(json_path.parent, comparison, exams, current_to_prior, current_to_prior.GetInverse())


def _cell(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


class CompareWindow(QMainWindow):
    """Two exams side by side (module doc). ``open_comparison`` reads in a thread; ``comparison_loaded`` then."""

    comparison_loaded = Signal()
    message_shown = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        guard_none_refcount()  # PySide6 6.12 on Python 3.11 would abort the viewer within minutes (qt_compat)
        self.setWindowTitle("NoduleNet follow-up viewer (research software, not a medical device)")
        self.loaded: LoadedComparison | None = None
        self.messages: list[str] = []
        self._call: BackgroundCall | None = None
        self._syncing = False
        self.views = {side: SliceView("axial", self) for side in SIDES}
        self.titles = {side: QLabel(side.capitalize(), self) for side in SIDES}
        pair = QWidget(self)
        row = QHBoxLayout(pair)
        for side in SIDES:
            column = QVBoxLayout()
            column.addWidget(self.titles[side])
            column.addWidget(self.views[side], 1)
            row.addLayout(column, 1)
            self.views[side].setObjectName(f"{side}_axial_view")
            self.views[side].cursor_moved.connect(lambda _zyx, s=side: self._follow(s))
            self.views[side].slice_changed.connect(lambda _i, s=side: self._follow(s))
        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.exam_label = QLabel("Open a folder `nodulenet compare` wrote", self)
        self.exam_label.setWordWrap(True)
        splitter = QSplitter(Qt.Orientation.Vertical, self)
        splitter.addWidget(pair)
        bottom = QWidget(self)
        below = QVBoxLayout(bottom)
        below.addWidget(self.exam_label)
        below.addWidget(self.table)
        splitter.addWidget(bottom)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        self.setCentralWidget(splitter)
        self.resize(1500, 920)

    # -------------------------------------------------------------------------------------------- loading

    def open_comparison(self, folder: str | Path) -> None:
        self.statusBar().showMessage(f"Reading {folder} ...")
        self._call = BackgroundCall(load_comparison, Path(folder), parent=self)
        self._call.succeeded.connect(self.set_comparison)
        self._call.failed.connect(self.show_error)
        self._call.start()

    def show_error(self, message: str) -> None:
        self.messages.append(message)
        self.statusBar().showMessage(message)
        self.message_shown.emit(message)
        logger.warning("%s", message)
        if self.isVisible():
            box = QMessageBox(QMessageBox.Icon.Warning, "NoduleNet", message, parent=self)
            box.setModal(False)
            box.show()

    def set_comparison(self, loaded: LoadedComparison) -> None:
        self.loaded = loaded
        c = loaded.comparison
        width, level = WINDOW_PRESETS["Lung"]
        for side in SIDES:
            exam = loaded.exams[side]
            view = self.views[side]
            view.set_volume(exam.volume.array, exam.axes)
            view.set_overlays(exam.results.labels, exam.results.findings.findings)
            view.set_window(width, level)
            date = c[side].get("study_date") or "no study date"
            self.titles[side].setToolTip(str(c[side]["scan"]))
            self.titles[side].setText(f"{side.capitalize()}: {date}, {len(exam.results.findings.findings)} "
                                      f"nodule(s), {Path(c[side]['scan']).name}")
        self._fill_table(c)
        exam = c["lung_rads"]["exam"]
        self.exam_label.setText(f"Interval {c['interval_days']:.0f} days ({c['interval_source']}). Lung-RADS "
                                f"{c['lung_rads']['version']} exam category {exam['category']}: {exam['rule']}. "
                                f"{c['notice']}")
        centre = tuple((s - 1) / 2.0 for s in loaded.exams["current"].volume.shape_zyx)
        self.views["current"].set_cursor(centre)
        self._follow("current")
        self.statusBar().showMessage(f"Opened {loaded.folder}", 8000)
        self.comparison_loaded.emit()

    def _fill_table(self, c: dict[str, Any]) -> None:
        self.table.setRowCount(len(c["nodules"]))
        for r, n in enumerate(c["nodules"]):
            side = n["current"] or n["prior"]
            values = (n["status"], side["nodule_type"], _cell((n["prior"] or {}).get("mean_diameter_mm")),
                      _cell((n["current"] or {}).get("mean_diameter_mm")),
                      _cell(n.get("volume_change_percent"), "{:+.0f}"),
                      _cell(n.get("volume_doubling_time_days"), "{:.0f}"),
                      "-" if not n.get("lung_rads") else n["lung_rads"]["category"])
            for col, text in enumerate(values):
                self.table.setItem(r, col, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    # ------------------------------------------------------------------------------------- crosshairs

    def cursor_world(self, side: str) -> np.ndarray:
        """The crosshair of one view as a world point of its scan (LPS mm)."""
        return np.asarray(self.loaded.exams[side].volume.voxel_to_world(self.views[side].cursor),  # type: ignore
                          dtype=np.float64)

    def set_cursor_world(self, side: str, xyz_mm: Any) -> None:
        """Put one view's crosshair (and slice) on a world point of its scan."""
        exam = self.loaded.exams[side]  # type: ignore[union-attr]
        zyx = np.clip(exam.volume.world_to_voxel(xyz_mm), 0, np.asarray(exam.volume.shape_zyx) - 1)
        view = self.views[side]
        view.set_cursor(tuple(float(v) for v in zyx))
        view.ensure_visible(view.cursor)

    def _follow(self, side: str) -> None:
        """The other view follows ``side``'s crosshair through the registration."""
        if self._syncing or self.loaded is None or self.views[side].cursor is None:
            return
        other = SIDES[1 - SIDES.index(side)]
        self._syncing = True
        try:
            self.set_cursor_world(other, self.loaded.map_point(side, self.cursor_world(side)))
        finally:
            self._syncing = False

    def select_nodule(self, row: int) -> None:
        """Select a table row: each view on that nodule in its own scan (the registered point where it is absent)."""
        self.table.selectRow(row)

    def _row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.loaded is None:
            return
        n = self.loaded.comparison["nodules"][rows[0].row()]
        points = {side: None if n[side] is None else n[side]["center_world_xyz_mm"] for side in SIDES}
        for side in SIDES:
            other = SIDES[1 - SIDES.index(side)]
            if points[side] is None:
                points[side] = self.loaded.map_point(other, points[other])
        self._syncing = True
        try:
            for side in SIDES:
                self.set_cursor_world(side, points[side])
                finding = n[side]["finding_id"] if n[side] else None
                self.views[side].set_selected(finding)
        finally:
            self._syncing = False

    def save_screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.grab().save(str(path)):
            raise InputError(path, "could not be written")
        return path


__all__ = ["CompareWindow", "LoadedComparison", "load_comparison"]
