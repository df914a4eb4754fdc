"""The main window's two halves: :class:`ViewGrid` (the four views) and :class:`SidePanel` (detection controls,
the nodule table with its threshold slider, display settings). Widgets only; :class:`~.main_window.MainWindow`
connects them to the scan and the results.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QItemSelectionModel, QModelIndex, QSettings, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from nodulenet.app.reslice import VIEWS, WINDOW_PRESETS
from nodulenet.app.results_model import FINDING_ID_ROLE, FindingsFilterModel, FindingsTableModel
from nodulenet.app.slice_view import SliceView
from nodulenet.app.volume_view import VolumeView
from nodulenet.io.findings import NoduleFinding

SLIDER_STEPS = 1000  # the threshold slider moves in steps of 0.001


class ViewGrid(QWidget):
    """Axial | coronal over sagittal | 3D."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QGridLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.setSpacing(3)
        self.views: dict[str, SliceView] = {view: SliceView(view, self) for view in VIEWS}
        self.volume_view = VolumeView(self)
        layout.addWidget(self.views["axial"], 0, 0)
        layout.addWidget(self.views["coronal"], 0, 1)
        layout.addWidget(self.views["sagittal"], 1, 0)
        layout.addWidget(self.volume_view, 1, 1)
        for k in range(2):
            layout.setRowStretch(k, 1)
            layout.setColumnStretch(k, 1)


class SidePanel(QWidget):
    """Detection, the nodule table and display settings. ``threshold_changed(score)`` when the slider moves,
    ``finding_activated(id)`` when the user picks a row."""

    threshold_changed = Signal(float)
    finding_activated = Signal(int)

    def __init__(self, settings: QSettings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self.setMinimumWidth(540)
        self.setMaximumWidth(620)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.scan_label = QLabel("No scan open", self)
        self.scan_label.setWordWrap(True)
        layout.addWidget(self.scan_label)
        self.cursor_label = QLabel("", self)
        self.cursor_label.setObjectName("cursor_label")
        layout.addWidget(self.cursor_label)
        layout.addWidget(self._detection_group())
        layout.addWidget(self._findings_group(), stretch=1)
        layout.addWidget(self._display_group())

    # ---------------------------------------------------------------------------------------- detection

    def _detection_group(self) -> QGroupBox:
        group = QGroupBox("Detection", self)
        grid = QGridLayout(group)
        self.run_local = QPushButton("Run locally", group)
        self.run_server = QPushButton("On server...", group)
        self.run_ssh = QPushButton("Over SSH...", group)
        self.cancel = QPushButton("Cancel", group)
        self.cancel.setEnabled(False)
        for k, button in enumerate((self.run_local, self.run_server, self.run_ssh, self.cancel)):
            grid.addWidget(button, 0, k)
        self.detect_threshold_box = QDoubleSpinBox(group)
        self.detect_threshold_box.setRange(0.0, 1.0)
        self.detect_threshold_box.setSingleStep(0.05)
        self.detect_threshold_box.setDecimals(2)
        self.detect_threshold_box.setValue(float(self.settings.value("detect/threshold", 0.5)))
        self.detect_threshold_box.valueChanged.connect(lambda v: self.settings.setValue("detect/threshold", v))
        self.detect_threshold_box.setToolTip("Detections scoring at least this become findings (predict --threshold)")
        grid.addWidget(QLabel("Report findings scoring at least", group), 1, 0, 1, 3)
        grid.addWidget(self.detect_threshold_box, 1, 3)
        self.progress = QProgressBar(group)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.progress_label = QLabel("", group)
        grid.addWidget(self.progress, 2, 0, 1, 4)
        grid.addWidget(self.progress_label, 3, 0, 1, 4)
        return group

    @property
    def detect_threshold(self) -> float:
        return float(self.detect_threshold_box.value())

    def detection_started(self, mode: str) -> None:
        for button in (self.run_local, self.run_server, self.run_ssh):
            button.setEnabled(False)
        self.cancel.setEnabled(True)
        self.progress.setTextVisible(True)
        self.progress.setRange(0, 0)
        self.progress_label.setText(f"Detection ({mode}) starting ...")

    def show_progress(self, step: int, total: int, text: str) -> None:
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(step)
        else:
            self.progress.setRange(0, 0)  # busy: no known number of steps
        self.progress_label.setText(text)

    def detection_ended(self, text: str) -> None:
        for button in (self.run_local, self.run_server, self.run_ssh):
            button.setEnabled(True)
        self.cancel.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if text.endswith("done") else 0)
        self.progress.setTextVisible(False)
        self.progress_label.setText(text)

    # ----------------------------------------------------------------------------------------- findings

    def _findings_group(self) -> QGroupBox:
        group = QGroupBox("Nodules", self)
        box = QVBoxLayout(group)
        self.model = FindingsTableModel(group)
        self.proxy = FindingsFilterModel(group)
        self.proxy.setSourceModel(self.model)
        self.table = QTableView(group)
        self.table.setObjectName("nodule_table")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(1, Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.selectionModel().currentRowChanged.connect(self._row_changed)
        self.table.clicked.connect(lambda index: self._row_changed(index, QModelIndex()))
        box.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(QLabel("Show score at least", group))
        self.slider = QSlider(Qt.Orientation.Horizontal, group)
        self.slider.setObjectName("threshold_slider")
        self.slider.setRange(0, SLIDER_STEPS)
        self.slider.valueChanged.connect(self._slider_moved)
        row.addWidget(self.slider, stretch=1)
        self.threshold_label = QLabel("0.000", group)
        row.addWidget(self.threshold_label)
        box.addLayout(row)
        self.count_label = QLabel("no results", group)
        box.addWidget(self.count_label)
        self._selecting = False
        self._threshold = 0.0
        return group

    def set_findings(self, findings: Sequence[NoduleFinding], threshold: float | None) -> None:
        self.model.set_findings(findings)
        self._set_exact_threshold(threshold or 0.0)

    @property
    def threshold(self) -> float:
        return self._threshold

    def set_threshold(self, value: float) -> None:
        """Set the threshold exactly (the slider shows it to its 0.001 step) and tell the listeners."""
        self._set_exact_threshold(value)
        self.threshold_changed.emit(self._threshold)

    def _set_exact_threshold(self, value: float) -> None:
        self._threshold = min(max(float(value), 0.0), 1.0)
        self.slider.blockSignals(True)
        self.slider.setValue(int(round(self._threshold * SLIDER_STEPS)))
        self.slider.blockSignals(False)
        self._apply_threshold()

    def _slider_moved(self, value: int) -> None:
        self._threshold = value / SLIDER_STEPS
        self._apply_threshold()
        self.threshold_changed.emit(self._threshold)

    def _apply_threshold(self) -> None:
        self.proxy.set_threshold(self._threshold)
        self.threshold_label.setText(f"{self.threshold:.3f}")
        total = self.model.rowCount()
        self.count_label.setText(f"{self.proxy.rowCount()} of {total} finding(s) shown" if total else "no findings")

    def visible_ids(self) -> list[int]:
        return self.proxy.visible_ids()

    def _row_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if self._selecting or not current.isValid():
            return
        self.finding_activated.emit(int(current.siblingAtColumn(0).data(FINDING_ID_ROLE)))

    def select_row_of(self, finding_id: int) -> None:
        """Select a finding's row without re-emitting ``finding_activated``."""
        row = self.proxy.row_of(finding_id)
        if row is None:
            return
        self._selecting = True
        try:
            index = self.proxy.index(row, 0)
            self.table.selectionModel().setCurrentIndex(
                index, QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows)
            self.table.scrollTo(index)
        finally:
            self._selecting = False

    # ------------------------------------------------------------------------------------------ display

    def _display_group(self) -> QGroupBox:
        group = QGroupBox("Display", self)
        form = QFormLayout(group)
        self.preset = QComboBox(group)
        self.preset.addItems([*WINDOW_PRESETS, "Custom"])
        form.addRow("Window", self.preset)
        self.mask_style = QComboBox(group)
        for text, data in (("Outlines", "outline"), ("Filled", "fill"), ("Off", "off")):
            self.mask_style.addItem(text, data)
        form.addRow("Nodule masks", self.mask_style)
        checks = QHBoxLayout()
        self.boxes = QCheckBox("Boxes and scores", group)
        self.boxes.setChecked(True)
        self.crosshair = QCheckBox("Crosshair", group)
        self.crosshair.setChecked(True)
        checks.addWidget(self.boxes)
        checks.addWidget(self.crosshair)
        form.addRow("Overlays", checks)
        self.mode3d = QComboBox(group)
        self.mode3d.addItem("Lung and nodule surfaces", "surfaces")
        self.mode3d.addItem("Volume rendering", "volume")
        form.addRow("3D view", self.mode3d)
        return group

    def show_preset(self, name: str | None) -> None:
        self.preset.blockSignals(True)
        self.preset.setCurrentText(name if name in WINDOW_PRESETS else "Custom")
        self.preset.blockSignals(False)

    # ---------------------------------------------------------------------------------------------- text

    def set_scan_text(self, text: str) -> None:
        self.scan_label.setText(text)

    def set_cursor_text(self, text: str) -> None:
        self.cursor_label.setText(text)

    def make_disclaimer_label(self, text: str) -> QLabel:
        label = QLabel(f"<b>{text}</b>")
        label.setObjectName("disclaimer")
        label.setStyleSheet("color: #b71c1c; padding: 0 6px;")
        return label
