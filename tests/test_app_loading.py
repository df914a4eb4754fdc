"""Opening scans in the viewer: a DICOM folder with several series asks which one (and detection then reads that
one), the real LIDC-IDRI series opens with the right sides, and the ``nodulenet viewer`` command itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from _xvfb import qt_app_fixture, wait_until  # noqa: F401
from nodulenet.io.dicom_write import new_file_dataset

pytestmark = pytest.mark.timeout(300)


def write_ct_series(folder: Path, n_slices: int, size: int, description: str) -> str:
    """A small axial CT series (HU = slice index * 10 - 1000), returns its SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k in range(n_slices):
        path = folder / f"{description}-{k:03d}.dcm"
        ds = new_file_dataset(path, CTImageStorage, generate_uid())
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.10"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.11"
        ds.PatientID = "VIEWER-TEST"
        ds.PatientName = "Viewer^Test"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "NoduleNet tests"
        ds.SeriesDescription = description
        ds.SeriesNumber = n_slices
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = np.full((size, size), k * 10 + 24, dtype=np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return series_uid


@pytest.fixture
def window(app, tmp_path):
    from PySide6.QtCore import QSettings

    from nodulenet.app.main_window import MainWindow

    w = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat),
                   results_root=tmp_path / "results")
    w.show()
    yield w
    w.close()


def test_a_folder_with_two_series_asks_which_one_and_detection_reads_that_one(window, tmp_path):
    folder = tmp_path / "study"
    write_ct_series(folder, 6, 32, "big")
    small_uid = write_ct_series(folder, 4, 24, "small")
    loaded = []
    window.scan_loaded.connect(lambda: loaded.append(True))
    window.open_scan(folder)
    wait_until(lambda: window.opener.chooser is not None and window.opener.chooser.isVisible(), 30, "the chooser")
    chooser = window.opener.chooser
    entries = [chooser.list.item(i).text() for i in range(chooser.list.count())]
    assert len(entries) == 2 and "big" in entries[0] and "6 images" in entries[0] and "small" in entries[1]
    chooser.list.setCurrentRow(1)
    chooser.accept()
    wait_until(lambda: loaded or window.messages, 30, "the chosen series")
    assert loaded, window.messages
    assert window.volume.meta["series_instance_uid"] == small_uid
    assert window.volume.shape_zyx == (4, 24, 24)
    # HU = stored + intercept: slice k holds k * 10 - 1000, so the z order survived too.
    assert [int(window.volume.array[k, 0, 0]) for k in range(4)] == [-1000, -990, -980, -970]
    # Detection must read the same series: a file of it (a DICOM file selects its own series), not the folder.
    from nodulenet.io.scan import read_scan

    assert window.detect_path != folder
    assert read_scan(window.detect_path).meta["series_instance_uid"] == small_uid


def test_cancelling_the_chooser_keeps_the_window_as_it_was(window, tmp_path):
    folder = tmp_path / "study"
    write_ct_series(folder, 3, 16, "a")
    write_ct_series(folder, 3, 16, "b")
    window.open_scan(folder)
    wait_until(lambda: window.opener.chooser is not None and window.opener.chooser.isVisible(), 30, "the chooser")
    window.opener.chooser.reject()
    wait_until(lambda: window.opener.chooser is None, 5, "the chooser to close")
    assert window.volume is None and window.messages == [] and not window.opener.busy


def test_real_lidc_series_opens_with_the_patient_sides_right(window, lidc_0001_series):
    from PySide6.QtCore import QTimer

    loaded = []
    window.scan_loaded.connect(lambda: loaded.append(True))
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(50)
    start = time.perf_counter()
    window.open_scan(lidc_0001_series)
    wait_until(lambda: loaded or window.messages, 120, "LIDC-IDRI-0001 to open")
    timer.stop()
    assert loaded, window.messages
    seconds = time.perf_counter() - start
    # The window never froze: the event loop ran all along (reading in the GUI thread would be one 2-5 s gap; the
    # first 3D frame of the new scan, drawn in the GUI thread, is the longest pause left: ~0.1-0.4 s).
    gaps = np.diff([start, *ticks])
    assert len(ticks) >= 5 and gaps.max() < 1.0, f"longest pause {gaps.max():.2f} s"
    assert window.volume.shape_zyx == (133, 512, 512)
    assert window.views["axial"].axes.edge_letters("axial") == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    # LUNA16's nodule of this scan (world 56.21, 86.34, -115.87 mm: the patient's left) shows on the screen's right.
    centre = window.volume.world_to_voxel((56.21, 86.34, -115.87))
    window.set_cursor(centre)
    axial = window.views["axial"]
    assert axial.slice_index == int(round(centre[0]))
    assert axial.voxel_to_widget(centre).x() > axial.width() / 2
    assert window.detect_path == lidc_0001_series  # one series: detection reads the folder itself
    print(f"LIDC-IDRI-0001 opened in {seconds:.1f} s, longest event-loop pause {gaps.max():.3f} s")


def _drop(window, path: Path) -> None:
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(50, 50), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)


def test_dropped_scan_opens_and_dropped_results_load_then_export_writes_dicom_seg_and_sr(window, tmp_path):
    """A DICOM series and a results folder dropped on the window; then the export of a DICOM scan's results."""
    import pydicom

    from nodulenet.export import export_all
    from nodulenet.export.measurements import finding_from_mask
    from nodulenet.io.findings import NoduleMask, ScanFindings, ScanSource
    from nodulenet.io.scan import read_scan

    folder = tmp_path / "series"
    write_ct_series(folder, 6, 32, "only")
    loaded = []
    window.scan_loaded.connect(lambda: loaded.append(True))
    _drop(window, folder)
    wait_until(lambda: loaded or window.messages, 30, "the dropped scan")
    assert loaded and window.volume.shape_zyx == (6, 32, 32)
    volume = read_scan(folder)
    mask = np.zeros((2, 6, 6), bool)
    mask[:, 1:5, 1:5] = True
    finding = finding_from_mask(1, 0.93, NoduleMask(mask, (2, 10, 12)), volume)
    export_all(ScanFindings(source=ScanSource.from_volume_meta(volume.meta), geometry=volume.geometry,
                            findings=[finding], threshold=0.5), volume, tmp_path / "results")
    shown = []
    window.results_loaded.connect(lambda: shown.append(True))
    _drop(window, tmp_path / "results")
    wait_until(lambda: shown or window.messages, 30, "the dropped results")
    assert shown, window.messages
    assert window.panel.proxy.rowCount() == 1 and window.results.labels.sum() == 32
    exported = []
    window.exported.connect(exported.append)
    window.export_results(tmp_path / "export")
    wait_until(lambda: exported or window.messages, 60, "the export")
    assert exported, window.messages
    assert {"dicom_seg", "dicom_sr", "report_html", "nodules_json"} <= set(exported[0].files)
    seg = pydicom.dcmread(tmp_path / "export" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.meta[
        "series_instance_uid"]
    assert pydicom.dcmread(tmp_path / "export" / "sr.dcm").Modality == "SR"


def test_viewer_command_without_display_or_extra_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    run = subprocess.run([sys.executable, "-m", "nodulenet", "viewer"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "no display" in run.stderr and "Traceback" not in run.stderr
    code = ("import sys; sys.modules['vtkmodules'] = None; sys.argv = ['nodulenet', 'viewer']; "
            "from nodulenet.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and 'pip install "nodulenet[app]"' in run.stderr.replace("\n", "")
    assert "VTK" in run.stderr and "Traceback" not in run.stderr


def test_viewer_command_opens_a_scan_and_its_results(app, tmp_path):
    """The real `nodulenet viewer SCAN --results DIR` process: it shows both (its log says so) and runs on."""
    import shutil

    from nodulenet.export import export_all
    from nodulenet.io.findings import ScanFindings, ScanSource
    from nodulenet.io.scan import read_scan
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    scan = write_phantom(tmp_path / "ph", 3, PhantomConfig(shape_yx=(96, 96), spacing_yx_mm=(1.25, 1.25),
                                                           extent_z_mm=64.0, n_nodules=1))["scan"]
    volume = read_scan(scan)
    export_all(ScanFindings(source=ScanSource.from_volume_meta(volume.meta), geometry=volume.geometry, findings=[],
                            threshold=0.5), volume, tmp_path / "results")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg-data"), "XDG_CONFIG_HOME": str(tmp_path / "xdg-conf")}
    proc = subprocess.Popen([sys.executable, "-m", "nodulenet", "viewer", str(scan), "--results",
                             str(tmp_path / "results")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        logs = list((tmp_path / "xdg-data").rglob("viewer.log"))
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list((tmp_path / "xdg-data").rglob("viewer.log"))
            text = logs[0].read_text() if logs else ""
            if "showing 0 finding(s)" in text:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        assert f"opened {scan}" in text and "showing 0 finding(s)" in text, text
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp_path / "xdg-data", ignore_errors=True)


def test_thousands_of_qt_calls_do_not_abort_the_viewer(app, tmp_path):
    """PySide6 6.12.0 on Python 3.11 loses a reference to None per void Qt call; the viewer's guard must keep a
    long session alive (without it this script aborts with "none_dealloc" after a few thousand repaints)."""
    script = tmp_path / "many_repaints.py"
    script.write_text(
        "import sys\n"
        "from PySide6.QtWidgets import QApplication\n"
        "from nodulenet.app.qt_compat import none_references_lost_per_call\n"
        "from nodulenet.app.main_window import MainWindow\n"
        "app = QApplication([])\n"
        "lost = none_references_lost_per_call()\n"
        "window = MainWindow(results_root=__import__('pathlib').Path(sys.argv[1]))\n"
        "window.show()\n"
        "for _ in range(20000):\n"
        "    window.views['axial'].repaint()\n"
        "print('lost per call', lost, 'survived')\n")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "conf"), "XDG_DATA_HOME": str(tmp_path / "data")}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "results")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "survived" in run.stdout, run.stderr[-2000:]
