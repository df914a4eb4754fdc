"""The viewer's main window: three 2D views and a 3D view of the scan, the nodule table, detection and export.

Layout: axial, coronal, sagittal (:class:`~nodulenet.app.slice_view.SliceView`) and 3D
(:class:`~nodulenet.app.volume_view.VolumeView`) in a 2 x 2 grid; on the right the detection controls, the
nodule table (:mod:`.results_model`) with its score threshold slider, and the display settings. All views share
one crosshair, a voxel ``(z, y, x)`` of the scan: clicking in a view moves it, selecting a nodule moves it to the
nodule's centre.

Nothing slow runs in the GUI thread: scans and results are read in threads (:mod:`.loading`), detection runs in a
child process or a client thread (:mod:`.detection`). A problem is shown in a message box and the status bar, and
the window keeps running. The methods a user's actions call (``open_scan``, ``load_results``,
``run_local_detection``, ``run_on_server``, ``run_over_ssh``, ``select_finding``, ``set_threshold``,
``export_results``, ``save_screenshot``) are public, for scripts and tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, QStandardPaths, Qt, Signal
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent, QImage, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMainWindow, QMessageBox, QSplitter

from nodulenet.app.detection import DetectionJob, LocalDetection, ServerDialog, SshDialog
from nodulenet.app.loading import BackgroundCall, LoadedResults, OpenedScan, ScanOpener, read_results
from nodulenet.app.panels import SidePanel, ViewGrid
from nodulenet.app.qt_compat import guard_none_refcount
from nodulenet.app.reslice import WINDOW_PRESETS, PatientAxes
from nodulenet.io.findings import ScanFindings, find_results_json
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

DISCLAIMER = "Research software, not a medical device"
SCAN_FILTER = "CT scans (*.nii.gz *.nii *.mhd *.mha *.nrrd *.nhdr *.dcm);;All files (*)"


def default_results_root() -> Path:
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppLocalDataLocation)
    return Path(base or Path.home() / ".nodulenet-viewer") / "results"


class MainWindow(QMainWindow):
    """The NoduleNet viewer. ``settings``: where remembered values live (default: the user's QSettings);
    ``results_root``: where local detection writes (one folder per run)."""

    scan_loaded = Signal()
    results_loaded = Signal()
    detection_finished = Signal(str)  # "succeeded" | "failed" | "cancelled"
    message_shown = Signal(str)
    exported = Signal(object)  # the ExportResult of export_results

    def __init__(self, settings: QSettings | None = None, results_root: Path | None = None) -> None:
        super().__init__()
        guard_none_refcount()  # PySide6 6.12 on Python 3.11 would abort the viewer within minutes (qt_compat)
        self.setWindowTitle(f"NoduleNet viewer ({DISCLAIMER.lower()})")
        self.settings = settings or QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                                              "NoduleNet", "viewer")
        self.results_root = Path(results_root) if results_root else default_results_root()
        self.volume: Volume | None = None
        self.axes: PatientAxes | None = None
        self.scan_path: Path | None = None  # what the user opened (file or DICOM folder)
        self.detect_path: Path | None = None  # what detection reads to get the same series
        self.results: LoadedResults | None = None
        self.cursor: tuple[float, float, float] | None = None
        self.selected_id: int | None = None
        self.job: DetectionJob | None = None
        self.messages: list[str] = []
        self.last_message_box: QMessageBox | None = None
        self._pending_results: Path | None = None
        self._results_call: BackgroundCall | None = None
        self._export_call: BackgroundCall | None = None
        self._syncing = False

        self.grid = ViewGrid(self)
        self.views = self.grid.views
        self.volume_view = self.grid.volume_view
        self.panel = SidePanel(self.settings, self)
        self.table = self.panel.table
        splitter = QSplitter(Qt.Orientation.Horizontal, self)
        splitter.addWidget(self.grid)
        splitter.addWidget(self.panel)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 0)
        self.setCentralWidget(splitter)
        self._build_menus()
        self._connect()
        self.status_disclaimer = self.panel.make_disclaimer_label(DISCLAIMER)
        self.statusBar().addPermanentWidget(self.status_disclaimer)
        self.statusBar().showMessage("Open a scan: File > Open, or drop a file or folder here")
        self.setAcceptDrops(True)
        self.opener = ScanOpener(self, prepare=_display_model)
        self.opener.loaded.connect(self._scan_read)
        self.opener.failed.connect(self._scan_failed)
        self.resize(1500, 920)

    # ------------------------------------------------------------------------------------------- wiring

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self._action(file_menu, "&Open scan file...", self._ask_scan_file, QKeySequence.StandardKey.Open)
        self._action(file_menu, "Open &DICOM folder...", self._ask_dicom_folder, "Ctrl+D")
        self._action(file_menu, "&Load results...", self._ask_results, "Ctrl+L")
        self._action(file_menu, "&Export results (report, DICOM SEG/SR)...", self._ask_export, "Ctrl+E")
        shots = file_menu.addMenu("Save &screenshot")
        for which in ("axial", "coronal", "sagittal", "3d", "window"):
            self._action(shots, which.capitalize() if which != "3d" else "3D", lambda w=which: self._ask_screenshot(w))
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        detect = bar.addMenu("&Detection")
        self._action(detect, "Run &locally", self.run_local_detection, "Ctrl+R")
        self._action(detect, "Run on a &server...", self._ask_server)
        self._action(detect, "Run over &SSH...", self._ask_ssh)
        self._action(detect, "&Cancel", self.cancel_detection)
        view = bar.addMenu("&View")
        for name in WINDOW_PRESETS:
            self._action(view, f"Window: {name}", lambda n=name: self.set_window_preset(n))
        self._action(view, "Reset zoom", lambda: [v.reset_zoom() for v in self.views.values()], "Ctrl+0")
        self._action(view, "Reset 3D camera", self.volume_view.reset_camera)
        help_menu = bar.addMenu("&Help")
        self._action(help_menu, "&About", self.show_about)

    def _action(self, menu: Any, text: str, slot: Any, shortcut: Any = None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        menu.addAction(action)
        return action

    def _connect(self) -> None:
        for view in self.views.values():
            view.cursor_moved.connect(self.set_cursor)
            view.slice_changed.connect(lambda _i, v=view: self._view_scrolled(v))
            view.window_changed.connect(self._window_dragged)
        p = self.panel
        p.run_local.clicked.connect(self.run_local_detection)
        p.run_server.clicked.connect(self._ask_server)
        p.run_ssh.clicked.connect(self._ask_ssh)
        p.cancel.clicked.connect(self.cancel_detection)
        p.threshold_changed.connect(self._threshold_changed)
        p.finding_activated.connect(self.select_finding)
        p.preset.currentTextChanged.connect(lambda name: name in WINDOW_PRESETS and self.set_window_preset(name))
        p.mask_style.currentIndexChanged.connect(lambda _i: self._overlay_style_changed())
        p.boxes.toggled.connect(lambda _b: self._overlay_style_changed())
        p.crosshair.toggled.connect(lambda _b: self._overlay_style_changed())
        p.mode3d.currentIndexChanged.connect(lambda _i: self.volume_view.set_mode(p.mode3d.currentData()))

    # ------------------------------------------------------------------------------------------ messages

    def show_error(self, title: str, message: str) -> None:
        """Tell the user (message box + status bar + log); the window goes on."""
        logger.warning("%s: %s", title, message)
        self.messages.append(message)
        self.statusBar().showMessage(f"{title}: {message}", 15000)
        box = QMessageBox(QMessageBox.Icon.Warning, title, message, QMessageBox.StandardButton.Ok, self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        box.open()  # window-modal but not blocking: detection and loading go on
        self.last_message_box = box
        self.message_shown.emit(message)

    def show_info(self, message: str) -> None:
        logger.info("%s", message)
        self.statusBar().showMessage(message, 15000)

    def show_about(self) -> QMessageBox:
        """The About box (not blocking); returned so that scripts and tests can read and close it."""
        from nodulenet import __version__

        box = QMessageBox(QMessageBox.Icon.Information, "About the NoduleNet viewer", (

            f"<b>NoduleNet viewer {__version__}</b><br>Find, measure and outline lung nodules in chest CT.<br><br>"
            f"<b>{DISCLAIMER}.</b> Not for diagnosis or any clinical decision.<br><br>"
            "Apache-2.0. LIDC-IDRI images: The Cancer Imaging Archive (TCIA), CC BY 3.0.<br>"
            "Views: radiological convention (patient's right on the left), world coordinates DICOM LPS mm."),
            QMessageBox.StandardButton.Ok, self)
        box.setTextFormat(Qt.TextFormat.RichText)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        box.open()
        return box

    # --------------------------------------------------------------------------------------------- scans

    def open_scan(self, path: str | Path, series_uid: str | None = None, results: str | Path | None = None) -> None:
        """Open a scan file or DICOM folder (in the background); ``scan_loaded`` when shown; then ``results``
        (a predict output folder of that scan), if given."""
        self._pending_results = None if results is None else Path(results)
        self.scan_path = Path(path)
        self.statusBar().showMessage(f"Opening {self.scan_path} ...")
        self.opener.open(self.scan_path, series_uid)

    def _scan_failed(self, message: str) -> None:
        self._pending_results = None  # they were for the scan that could not be opened
        self.show_error("Cannot open the scan", message)

    def _scan_read(self, opened: OpenedScan) -> None:
        self.set_volume(opened.volume, opened.path, series_chosen=opened.series_chosen, chest=opened.prepared)

    def set_volume(self, volume: Volume, path: Path | None = None, *, series_chosen: bool = False,
                   chest: Any = None) -> None:
        """Show a scan already in memory (results are cleared). ``series_chosen``: its DICOM series was picked
        among several in its folder; ``chest``: its 3D model (:func:`.volume_view.chest_model`) if made already."""
        self.cancel_detection()
        self.volume = volume
        self.axes = PatientAxes.from_geometry(volume.geometry)
        self.scan_path = Path(path) if path else Path(volume.meta.get("source_path", "scan"))
        self.detect_path = self._detection_input(volume, self.scan_path, series_chosen)
        self.results = None
        self.selected_id = None
        for view in self.views.values():
            view.set_volume(volume.array, self.axes)
        self.views["axial"].set_image_numbers(_axial_image_numbers(volume, self.axes))
        self.volume_view.set_volume(volume.array, volume.geometry, chest)
        self.panel.set_findings([], None)
        self.panel.set_scan_text(self._scan_text(volume))
        self.set_cursor(tuple((s - 1) / 2.0 for s in volume.shape_zyx))
        self.set_window_preset(self.panel.preset.currentText() if self.panel.preset.currentText() in WINDOW_PRESETS
                               else "Lung")
        if self.axes.obliquity_deg > 1.0:
            self.show_info(f"oblique scan: views are along the stored axes, {self.axes.obliquity_deg:.1f} degrees "
                           f"from the patient axes the letters name")
        self.statusBar().showMessage(f"Opened {self.scan_path}", 8000)
        logger.info("opened %s: %s voxels", self.scan_path, volume.shape_zyx)
        self.scan_loaded.emit()
        if self._pending_results is not None:
            pending, self._pending_results = self._pending_results, None
            self.load_results(pending)

    @staticmethod
    def _detection_input(volume: Volume, path: Path, series_chosen: bool) -> Path:
        """What detection must read to get this very volume: for a DICOM series picked among several in its
        folder, one of its files (a DICOM file selects its own series); else the path opened."""
        files = volume.meta.get("source_files") or []
        if series_chosen and path.is_dir() and files:
            return Path(files[0])
        return path

    @staticmethod
    def _scan_text(volume: Volume) -> str:
        g = volume.geometry
        name = volume.meta.get("patient_id") or Path(str(volume.meta.get("source_path", ""))).name
        return (f"{name}: {g.shape_zyx[2]} x {g.shape_zyx[1]} x {g.shape_zyx[0]} voxels, "
                f"{g.spacing_zyx[2]:.2f} x {g.spacing_zyx[1]:.2f} x {g.spacing_zyx[0]:.2f} mm")

    # ------------------------------------------------------------------------------------------ results

    def load_results(self, path: str | Path) -> None:
        """Read a predict output folder (or its nodules.json) and show it; the scan it names is opened first
        when none is open."""
        path = Path(path)
        if self.volume is None:
            try:
                path = find_results_json(path)  # a `predict -o` folder: the scan's sub-folder
                findings = ScanFindings.read_json(path)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to know about
                from nodulenet.app.loading import describe_error

                self.show_error("Cannot load the results", describe_error(exc))
                return
            source = Path(findings.source.path)
            if not source.exists():
                self.show_error("Cannot load the results", f"{path}: open its scan first (the scan it names, "
                                                          f"{source}, is not on this computer)")
                return
            self.open_scan(source, results=path)
            return
        self._results_call = BackgroundCall(_read_results_and_meshes, path, self.volume, parent=self)
        self._results_call.succeeded.connect(lambda loaded: self.show_results(*loaded))
        self._results_call.failed.connect(lambda msg: self.show_error("Cannot load the results", msg))
        self.statusBar().showMessage(f"Reading results from {path} ...")
        self._results_call.start()

    def show_results(self, results: LoadedResults, meshes: dict[int, Any] | None = None) -> None:
        """Show results read for the open scan (``meshes``: their 3D surfaces, made here when None)."""
        self.results = results
        self.selected_id = None
        findings = results.findings.findings
        for view in self.views.values():
            view.set_overlays(results.labels, findings)
        self.volume_view.set_findings(findings, meshes)
        self.panel.set_findings(findings, results.findings.threshold)
        self._threshold_changed(self.panel.threshold)
        for note in results.notes:
            self.show_info(note)
        self.statusBar().showMessage(f"{len(findings)} finding(s) from {results.folder}", 10000)
        logger.info("showing %d finding(s) from %s", len(findings), results.folder)
        self.results_loaded.emit()

    @property
    def threshold(self) -> float:
        return self.panel.threshold

    def set_threshold(self, value: float) -> None:
        """Show only findings scoring at least ``value`` (the slider moves too)."""
        self.panel.set_threshold(value)

    def _threshold_changed(self, value: float) -> None:
        ids = self.panel.visible_ids()
        for view in self.views.values():
            view.set_visible_ids(ids)
        self.volume_view.set_visible_ids(ids)

    def select_finding(self, finding_id: int) -> None:
        """Move every view to a finding's centre and highlight it (its table row too)."""
        if self.results is None:
            return
        finding = self.results.findings.by_id(int(finding_id))
        if finding.id == self.selected_id and self.cursor == tuple(finding.center_zyx):
            return  # already there (a click fires both "current row changed" and "clicked")
        self.selected_id = finding.id
        self.panel.select_row_of(finding.id)
        for view in self.views.values():
            view.set_selected(finding.id)
        self.set_cursor(finding.center_zyx)
        for view in self.views.values():
            view.ensure_visible(finding.center_zyx)
        self.volume_view.select(finding)
        x, y, z = finding.center_world_xyz_mm
        where = "" if finding.centre_slice is None else \
            f", {finding.centre_slice.describe(self.volume.shape_zyx[0] if self.volume is not None else None)}"
        self.statusBar().showMessage(f"finding {finding.id}: score {finding.score:.3f}, centre {x:.1f}, {y:.1f}, "
                                     f"{z:.1f} mm (LPS){where}, {finding.location_text}", 10000)

    # --------------------------------------------------------------------------------------- cursor etc.

    def set_cursor(self, zyx: Any) -> None:
        """Put the shared crosshair at voxel ``zyx``: every 2D view shows the slices through it."""
        if self.volume is None or self._syncing:
            return
        self._syncing = True
        try:
            self.cursor = (float(zyx[0]), float(zyx[1]), float(zyx[2]))
            for view in self.views.values():
                view.set_cursor(self.cursor)
            self.volume_view.set_cursor(self.cursor)
        finally:
            self._syncing = False
        world = self.volume.voxel_to_world(self.cursor)
        index = tuple(int(round(v)) for v in self.cursor)
        hu = float(self.volume.array[index])
        self.panel.set_cursor_text(f"{world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f} mm (LPS)  |  voxel z,y,x "
                                   f"{index[0]}, {index[1]}, {index[2]}  |  {hu:.0f} HU")

    def _view_scrolled(self, view: Any) -> None:
        if not self._syncing and view.cursor is not None:
            self.set_cursor(view.cursor)

    def set_window_preset(self, name: str) -> None:
        width, level = WINDOW_PRESETS[name]
        for view in self.views.values():
            view.set_window(width, level)
        self.panel.show_preset(name)

    def _window_dragged(self, width: float, level: float) -> None:
        for view in self.views.values():
            view.set_window(width, level)
        self.panel.show_preset(None)

    def _overlay_style_changed(self) -> None:
        p = self.panel
        for view in self.views.values():
            view.set_overlay_style(p.mask_style.currentData(), p.boxes.isChecked(), p.crosshair.isChecked())

    # ---------------------------------------------------------------------------------------- detection

    def _can_detect(self) -> bool:
        if self.volume is None or self.detect_path is None:
            self.show_error("No scan", "open a scan before running detection")
            return False
        if self.job is not None and self.job.running:
            self.show_error("Detection running", "a detection is already running: wait for it or cancel it")
            return False
        return True

    def _run_folder(self) -> Path:
        """A new folder per run under ``results_root``: ``<patient id or file name>-<local time>``."""
        stem = str((self.volume.meta.get("patient_id") if self.volume is not None else None)
                   or (self.scan_path.name if self.scan_path else "scan"))
        for suffix in (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr", ".dcm"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60]
        folder = self.results_root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while folder.exists():  # two runs in one second
            n += 1
            folder = self.results_root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        return folder

    def run_local_detection(self) -> None:
        """Detect nodules in the open scan on this computer (shipped model unless settings name weights)."""
        if not self._can_detect():
            return
        weights = self.settings.value("local/weights", "") or None
        job = LocalDetection(self.detect_path, self._run_folder(), threshold=self.panel.detect_threshold,  # type: ignore
                             weights=Path(weights) if weights else None, parent=self)
        self._start_job(job)

    def _ask_server(self) -> None:
        dialog = ServerDialog(str(self.settings.value("server/url", "")), str(self.settings.value("server/token", "")),
                              self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        dialog.accepted.connect(lambda: self.run_on_server(*dialog.values()))
        dialog.open()

    def run_on_server(self, url: str, token: str) -> None:
        """Detect nodules in the open scan on a NoduleNet server; remembers the URL and token."""
        if not self._can_detect():
            return
        if not url:
            self.show_error("Server", "give the server's URL, e.g. http://host:8000")
            return
        self.settings.setValue("server/url", url)
        self.settings.setValue("server/token", token)
        from nodulenet.app.detection import server_job

        self._start_job(server_job(self.detect_path, self._run_folder(), url=url, token=token,  # type: ignore
                                   threshold=self.panel.detect_threshold, parent=self))

    def _ask_ssh(self) -> None:
        s = self.settings
        dialog = SshDialog(str(s.value("ssh/target", "")), str(s.value("ssh/remote_python", "")),
                           str(s.value("ssh/identity", "")), str(s.value("ssh/accept_new_host_key", "false")) == "true",
                           self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        dialog.accepted.connect(lambda: self.run_over_ssh(**dialog.values()))
        dialog.open()

    def run_over_ssh(self, target: str, remote_python: str = "", identity: str = "",
                     accept_new_host_key: bool = False, known_hosts: Path | None = None) -> None:
        """Detect nodules in the open scan on an SSH host; remembers the host and how to run there."""
        if not self._can_detect():
            return
        if not target:
            self.show_error("SSH", "give the host as user@host or user@host:port")
            return
        s = self.settings
        s.setValue("ssh/target", target)
        s.setValue("ssh/remote_python", remote_python)
        s.setValue("ssh/identity", identity)
        s.setValue("ssh/accept_new_host_key", "true" if accept_new_host_key else "false")
        from nodulenet.app.detection import ssh_job

        self._start_job(ssh_job(self.detect_path, self._run_folder(), target=target,  # type: ignore[arg-type]
                                remote_python=remote_python or None, identity=identity or None,
                                accept_new_host_key=accept_new_host_key, known_hosts=known_hosts,
                                threshold=self.panel.detect_threshold, parent=self))

    def _start_job(self, job: DetectionJob) -> None:
        self.job = job
        job.progress.connect(self.panel.show_progress)
        job.succeeded.connect(self._detection_succeeded)
        job.failed.connect(self._detection_failed)
        job.cancelled.connect(self._detection_cancelled)
        self.panel.detection_started(job.mode)
        logger.info("detection (%s): %s -> %s", job.mode, job.scan, job.out_dir)
        job.start()

    def _detection_succeeded(self, folder: Path) -> None:
        self.panel.detection_ended("Detection done")
        self.load_results(folder)
        self.detection_finished.emit("succeeded")

    def _detection_failed(self, message: str) -> None:
        self.panel.detection_ended("Detection failed")
        self.show_error("Detection failed", message)
        self.detection_finished.emit("failed")

    def _detection_cancelled(self) -> None:
        self.panel.detection_ended("Detection cancelled")
        self.detection_finished.emit("cancelled")

    def cancel_detection(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()

    # ------------------------------------------------------------------------------------------- export

    def export_results(self, folder: str | Path) -> None:
        """Write the findings shown (score >= the slider, renumbered 1..K in score order) as a complete predict
        output: nodules.json, label map, candidates.csv, report.html, DICOM SEG + SR for DICOM scans."""
        if self.results is None or self.volume is None:
            self.show_error("Nothing to export", "load or compute results first")
            return
        folder = Path(folder)
        if folder.resolve() == self.results.folder.resolve():
            self.show_error("Export", f"{folder}: this folder holds the results shown; choose another one "
                                      "(exporting here would replace them)")
            return
        shown = [f for f in self.results.findings.findings if f.score >= self.threshold]
        renumbered = [replace(f, id=k) for k, f in enumerate(sorted(shown, key=lambda f: f.id), start=1)]
        threshold = max(self.threshold, self.results.findings.threshold or 0.0)
        findings = replace(self.results.findings, findings=renumbered, threshold=threshold, timings={})
        from nodulenet.export import export_all

        self._export_call = BackgroundCall(export_all, findings, self.volume, folder, parent=self)
        def done(result: Any) -> None:
            skipped = f" (skipped: {', '.join(result.skipped)})" if result.skipped else ""
            self.show_info(f"exported {len(renumbered)} finding(s): {', '.join(sorted(result.files))} to "
                           f"{folder}{skipped}")
            self.exported.emit(result)

        self._export_call.succeeded.connect(done)
        self._export_call.failed.connect(lambda msg: self.show_error("Export failed", msg))
        self.statusBar().showMessage(f"Exporting to {folder} ...")
        self._export_call.start()

    def view_image(self, which: str) -> QImage:
        """A picture of one view ("axial", "coronal", "sagittal", "3d") or of the whole window."""
        if which in self.views:
            return self.views[which].grab().toImage()
        if which == "3d":
            rgb = self.volume_view.grab_rgb()
            return QImage(rgb.data, rgb.shape[1], rgb.shape[0], rgb.strides[0], QImage.Format.Format_RGB888).copy()
        if which == "window":
            self.volume_view.flush()  # QScreen.grabWindow reads what is on screen: the 3D frame must be there
            return self.screen().grabWindow(self.winId()).toImage()
        raise ValueError(f"unknown view {which!r}")

    def save_screenshot(self, which: str, path: str | Path) -> Path:
        """Save :meth:`view_image` as PNG (atomically: a failed save leaves any earlier file as it was)."""
        from nodulenet.io.atomic import atomic_path

        path = Path(path)
        image = self.view_image(which)
        with atomic_path(path, suffix=".png") as tmp:
            if not image.save(str(tmp), "PNG"):
                raise OSError(f"{path}: could not write the PNG")
        self.show_info(f"saved {path}")
        return path

    # ------------------------------------------------------------------------------------- file dialogs

    def _ask_scan_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a CT scan", str(self.settings.value("last_dir", "")),
                                              SCAN_FILTER)
        if path:
            self.settings.setValue("last_dir", str(Path(path).parent))
            self.open_scan(path)

    def _ask_dicom_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a DICOM folder", str(self.settings.value("last_dir", "")))
        if path:
            self.settings.setValue("last_dir", path)
            self.open_scan(path)

    def _ask_results(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load results (nodules.json)", str(self.results_root),
                                              "NoduleNet results (nodules.json);;JSON (*.json)")
        if path:
            self.load_results(path)

    def _ask_export(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export results into folder", str(Path.home()))
        if path:
            self.export_results(path)

    def _ask_screenshot(self, which: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self, f"Save a screenshot ({which})", f"nodulenet-{which}.png",
                                              "PNG (*.png)")
        if path:
            try:
                self.save_screenshot(which, path)
            except OSError as exc:
                self.show_error("Screenshot", str(exc))

    # --------------------------------------------------------------------------------------- drag & drop

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.open_dropped(paths[0])
            event.acceptProposedAction()

    def open_dropped(self, path: Path) -> None:
        """A dropped nodules.json (or a folder holding one) loads results; anything else opens as a scan."""
        if path.name == "nodules.json" or (path.is_dir() and (path / "nodules.json").is_file()):
            self.load_results(path)
        else:
            self.open_scan(path)

    def closeEvent(self, event: Any) -> None:  # noqa: N802
        if self.job is not None and self.job.running:
            self.job.cancel()
            if isinstance(self.job, LocalDetection):
                self.job.process.waitForFinished(6000)
        self.opener.cancel()
        self.volume_view.finalize()
        super().closeEvent(event)


def _axial_image_numbers(volume: Volume, axes: PatientAxes) -> list[int | None] | None:
    """The DICOM InstanceNumber of each axial slice (the reader records them in array z order), when the axial
    view runs along array z and every slice has one; else None (the counter shows positions only)."""
    numbers = volume.meta.get("instance_numbers")
    if axes.normal_axis("axial") != 0 or not isinstance(numbers, list) or len(numbers) != volume.shape_zyx[0]:
        return None
    if any(not isinstance(n, int) or isinstance(n, bool) for n in numbers):
        return None
    return list(numbers)


def _display_model(volume: Volume) -> Any:
    """Runs in the scan-reading thread: the 3D view's chest model (lung surface, coarse grid)."""
    from nodulenet.app.volume_view import chest_model

    return chest_model(volume.array, volume.geometry)


def _read_results_and_meshes(path: Path, volume: Volume) -> tuple[LoadedResults, dict[int, Any]]:
    """Runs in a worker thread: the results and their 3D surfaces (the slow part with many findings)."""
    from nodulenet.app.volume_view import nodule_meshes

    results = read_results(path, volume)
    return results, nodule_meshes(results.findings.findings, volume.geometry)
