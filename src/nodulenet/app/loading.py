"""Reading scans and results for the viewer without freezing its window.

Reading runs in a Python thread (:class:`BackgroundCall`); its result comes back to the GUI thread through a Qt
signal. A DICOM folder is first scanned for series (headers only); when it holds several CT volumes a chooser
(:class:`SeriesChooser`) asks which one. Any problem with the user's file is an
:class:`~nodulenet.errors.InputError` from :mod:`nodulenet.io`, whose one-line message the window shows.

Results (:func:`read_results`): a predict output folder (or its ``nodules.json``) plus the label map beside it
(``labels.nii.gz``, ``labels.nii`` or ``labels.nrrd``: value = finding id), which gives every finding its mask.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QListWidget, QProgressDialog, QVBoxLayout, QWidget

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.dicom import DicomSeriesInfo
from nodulenet.io.findings import ScanFindings, find_results_json
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

LABEL_MAP_NAMES = ("labels.nii.gz", "labels.nii", "labels.nrrd")
RESULT_FILES = {"report": "report.html", "dicom_seg": "seg.dcm", "dicom_sr": "sr.dcm",
                "candidates": "candidates.csv"}


def describe_error(exc: BaseException) -> str:
    """The line a user sees: our own errors as they are; anything else with its type (and logged in full)."""
    if isinstance(exc, NoduleNetError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory while reading (the scan is too large for this machine's free memory)"
    logger.error("unexpected error:\n%s", "".join(traceback.format_exception(exc)))
    return f"{type(exc).__name__}: {exc}"


class BackgroundCall(QObject):
    """Run ``fn(*args)`` in a daemon thread; ``succeeded(result)`` or ``failed(message)`` arrive in the GUI thread.

    :meth:`cancel` only forgets the call (Python cannot stop a thread): its result is dropped when it comes.
    """

    succeeded = Signal(object)
    failed = Signal(str)
    _done = Signal(bool, object)

    def __init__(self, fn: Callable[..., Any], *args: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._fn, self._args = fn, args
        self.cancelled = False
        self.running = False
        # Queued: the thread emits, the GUI thread delivers (self lives in the GUI thread).
        self._done.connect(self._deliver, Qt.ConnectionType.QueuedConnection)

    def start(self) -> None:
        self.running = True
        threading.Thread(target=self._run, name=f"nodulenet-viewer-{getattr(self._fn, '__name__', 'call')}",
                         daemon=True).start()

    def _run(self) -> None:
        try:
            result = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message in the window
            self._done.emit(False, describe_error(exc))
        else:
            self._done.emit(True, result)

    def _deliver(self, ok: bool, payload: object) -> None:
        self.running = False
        self.deleteLater()  # one call, one object: it goes once its result is delivered
        if self.cancelled:
            return
        if ok:
            self.succeeded.emit(payload)
        else:
            self.failed.emit(str(payload))

    def cancel(self) -> None:
        self.cancelled = True


# ------------------------------------------------------------------------------------------------- results


@dataclass
class LoadedResults:
    """A predict output read back: findings with masks, the label map array on the scan grid, the files found."""

    folder: Path
    findings: ScanFindings
    labels: np.ndarray | None
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _same_grid(a: Any, b: Any) -> bool:
    return (tuple(a.shape_zyx) == tuple(b.shape_zyx) and np.allclose(a.spacing_zyx, b.spacing_zyx, atol=1e-4)
            and np.allclose(a.origin_xyz_mm, b.origin_xyz_mm, atol=1e-3)
            and np.allclose(a.direction, b.direction, atol=1e-4))


def results_json_path(path: str | Path, scan: str | Path | None = None) -> Path:
    """``nodules.json`` of a results folder, the file itself, or the scan's sub-folder of a ``predict -o`` folder
    (:func:`nodulenet.io.findings.find_results_json`); InputError when there is none, or several and no way to
    choose."""
    return find_results_json(path, scan)


def read_results(path: str | Path, scan: Volume | None = None) -> LoadedResults:
    """Read ``nodules.json`` and its label map; with ``scan``, check that they belong to its grid."""
    from nodulenet.export.labelmap import attach_masks_from_label_map
    from nodulenet.io.image_files import read_image

    json_path = results_json_path(path, None if scan is None else scan.meta.get("source_path"))
    findings = ScanFindings.read_json(json_path)
    folder = json_path.parent
    if scan is not None and not _same_grid(findings.geometry, scan.geometry):
        g, s = findings.geometry, scan.geometry
        raise InputError(json_path, f"these results are for a scan of {g.shape_zyx} voxels at origin "
                                    f"{tuple(round(v, 1) for v in g.origin_xyz_mm)} mm, not the open scan "
                                    f"({s.shape_zyx} voxels at {tuple(round(v, 1) for v in s.origin_xyz_mm)} mm)")
    labels_array = None
    notes: list[str] = []
    label_path = next((folder / n for n in LABEL_MAP_NAMES if (folder / n).is_file()), None)
    if label_path is None:
        notes.append(f"no label map beside {json_path.name}: boxes only, no outlines")
    else:
        labels = read_image(label_path)
        try:
            findings = attach_masks_from_label_map(findings, labels)
        except ValueError as exc:
            raise InputError(label_path, f"does not match {json_path.name}: {exc}") from None
        labels_array = np.asarray(labels.array)
    files = {kind: folder / name for kind, name in RESULT_FILES.items() if (folder / name).is_file()}
    if label_path is not None:
        files["label_map"] = label_path
    files["nodules_json"] = json_path
    return LoadedResults(folder=folder, findings=findings, labels=labels_array, files=files, notes=notes)


# --------------------------------------------------------------------------------------------------- scans


class SeriesChooser(QDialog):
    """Asks which of several DICOM series in a folder to open (CT volumes first, largest first)."""

    def __init__(self, folder: Path, series: list[DicomSeriesInfo], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Choose a series")
        self.series = series
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel(f"{folder} holds {len(series)} image series. Open which one?"))
        self.list = QListWidget(self)
        for info in series:
            desc = info.series_description or "(no description)"
            number = "" if info.series_number is None else f"#{info.series_number} "
            self.list.addItem(f"{number}{desc}: {info.modality or '?'}, {info.num_files} images  "
                              f"[{info.series_instance_uid}]")
        self.list.setCurrentRow(0)
        self.list.itemDoubleClicked.connect(lambda _item: self.accept())
        layout.addWidget(self.list)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Open | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.resize(720, 260)

    def chosen_uid(self) -> str:
        return self.series[max(0, self.list.currentRow())].series_instance_uid


@dataclass
class OpenedScan:
    """A scan read by :class:`ScanOpener`: the volume, the path opened, whether its series was picked among
    several (then only a file of it, not the folder, names it for detection), and what ``prepare`` made."""

    volume: Volume
    path: Path
    series_chosen: bool
    prepared: Any = None


class ScanOpener(QObject):
    """Opens one scan: series listing and choice for folders, then reading, with a busy dialog and cancel.

    Emits ``loaded(OpenedScan)`` or ``failed(message)``; ``chooser`` is the open :class:`SeriesChooser`, if any.
    ``prepare(volume)``, when given, runs in the reading thread too (the window's 3D surfaces), so that nothing
    slow is left for the GUI thread.
    """

    loaded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, parent_widget: QWidget, prepare: Callable[[Volume], Any] | None = None) -> None:
        super().__init__(parent_widget)
        self._parent = parent_widget
        self._prepare = prepare
        self._picked_among_several = False
        self._call: BackgroundCall | None = None
        self.progress: QProgressDialog | None = None
        self.chooser: SeriesChooser | None = None
        self.path: Path | None = None

    @property
    def busy(self) -> bool:
        return self._call is not None or self.chooser is not None

    def open(self, path: str | Path, series_uid: str | None = None) -> None:
        self.cancel()
        self.path = Path(path)
        self._picked_among_several = series_uid is not None
        if self.path.is_dir() and series_uid is None:
            self._run(f"Looking for DICOM series in {self.path.name} ...", _list_series, self.path,
                      on_done=self._series_listed)
        else:
            self._read(series_uid)

    def _read(self, series_uid: str | None) -> None:
        assert self.path is not None
        self._run(f"Reading {self.path.name} ...", _read_scan, self.path, series_uid, self._prepare,
                  on_done=self._finish)

    def _run(self, text: str, fn: Callable[..., Any], *args: Any, on_done: Callable[[Any], None]) -> None:
        call = BackgroundCall(fn, *args, parent=self)
        call.succeeded.connect(on_done)
        call.failed.connect(self._fail)
        self._call = call
        self._show_progress(text)
        call.start()

    def _show_progress(self, text: str) -> None:
        if self.progress is None:
            self.progress = QProgressDialog(text, "Cancel", 0, 0, self._parent)
            self.progress.setWindowTitle("NoduleNet viewer")
            self.progress.setWindowModality(Qt.WindowModality.WindowModal)
            self.progress.setMinimumDuration(400)  # quick reads do not flash a dialog
            self.progress.canceled.connect(self._user_cancel)
        self.progress.setLabelText(text)
        self.progress.setValue(0)

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.canceled.disconnect(self._user_cancel)
            self.progress.close()
            self.progress.deleteLater()
            self.progress = None

    def _series_listed(self, series: list[DicomSeriesInfo]) -> None:
        self._call = None
        ct = [s for s in series if s.is_ct_volume]
        if len(ct) <= 1:
            self._read(ct[0].series_instance_uid if ct else None)  # none: the reader says what was found
            return
        self._close_progress()
        self.chooser = SeriesChooser(self.path, ct, self._parent)  # type: ignore[arg-type]
        self.chooser.accepted.connect(self._series_chosen)
        self.chooser.rejected.connect(self._user_cancel)
        self.chooser.open()

    def _series_chosen(self) -> None:
        uid = self.chooser.chosen_uid()  # type: ignore[union-attr]
        self.chooser.deleteLater()  # type: ignore[union-attr]
        self.chooser = None
        self._picked_among_several = True
        self._read(uid)

    def _finish(self, read: tuple[Volume, Any]) -> None:
        self._call = None
        self._close_progress()
        self.loaded.emit(OpenedScan(volume=read[0], path=self.path, series_chosen=self._picked_among_several,  # type: ignore
                                    prepared=read[1]))

    def _fail(self, message: str) -> None:
        self._call = None
        self._close_progress()
        self.failed.emit(message)

    def _user_cancel(self) -> None:
        self.cancel()
        self.cancelled.emit()

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self.chooser is not None:
            chooser, self.chooser = self.chooser, None
            chooser.accepted.disconnect(self._series_chosen)
            chooser.rejected.disconnect(self._user_cancel)
            chooser.close()
            chooser.deleteLater()
        self._close_progress()


def _list_series(folder: Path) -> list[DicomSeriesInfo]:
    from nodulenet.io.dicom import list_dicom_series

    return list_dicom_series(folder)


def _read_scan(path: Path, series_uid: str | None, prepare: Callable[[Volume], Any] | None) -> tuple[Volume, Any]:
    from nodulenet.io.scan import read_scan

    volume = read_scan(path, series_instance_uid=series_uid)
    logger.info("read %s: %s voxels, spacing %s mm", path, volume.shape_zyx, volume.spacing_zyx)
    return volume, None if prepare is None else prepare(volume)
