"""The viewer on a real DICOM series (LIDC-IDRI-0001, under Xvfb): results given as the `predict -o` folder open
the scan they name, and the slice counter shows, for the selected finding, the DICOM image number a PACS shows -
the InstanceNumber of the slice whose ImagePositionPatient is nearest the finding's centre, read here from the
files with pydicom (independently of the reader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _xvfb import qt_application, wait_until
from nodulenet.export.api import export_all
from nodulenet.export.measurements import finding_from_mask
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.findings import ModelInfo, NoduleMask, ScanFindings, ScanSource

pytestmark = pytest.mark.timeout(300)

LUNA_NODULE_WORLD = (56.21, 86.34, -115.87)


def nearest_instance(series: Path, z_mm: float) -> int:
    rows = [(abs(float(ds.ImagePositionPatient[2]) - z_mm), int(ds.InstanceNumber))
            for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.glob("*.dcm")))]
    return min(rows)[1]


@pytest.fixture(scope="module")
def predict_out(lidc_0001_series: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `predict -o` folder (one scan sub-folder) holding a 20 mm finding at LUNA16's nodule of this scan."""
    hu = read_dicom_series(lidc_0001_series)
    centre = hu.world_to_voxel(LUNA_NODULE_WORLD)
    spacing = np.asarray(hu.spacing_zyx)
    half = np.ceil(10.0 / spacing).astype(int)
    lo = np.round(centre).astype(int) - half
    grid = np.stack(np.meshgrid(*[np.arange(a, a + 2 * h + 1) for a, h in zip(lo, half)], indexing="ij"), -1)
    inside = (((grid - centre) * spacing) ** 2).sum(-1) <= 100.0
    mask = NoduleMask(inside, tuple(int(v) for v in lo))  # type: ignore[arg-type]
    scan = ScanFindings(ScanSource.from_volume_meta(hu.meta), hu.geometry, [finding_from_mask(1, 0.9, mask, hu)],
                        ModelInfo(version="test"), threshold=0.5)
    root = tmp_path_factory.mktemp("predict_out")
    export_all(scan, hu, root / "LIDC-IDRI-0001_20603192", dicom=False)
    (root / "summary.json").write_text("{}")
    return root


def test_selected_findings_image_number_is_the_dicom_instance_nearest_its_centre(predict_out, lidc_0001_series,
                                                                                 tmp_path) -> None:
    from PySide6.QtCore import QSettings

    from nodulenet.app.main_window import MainWindow
    from nodulenet.app.results_model import COLUMNS

    app = qt_application()
    window = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat),
                        results_root=tmp_path / "results")
    window.resize(1400, 900)
    window.show()
    try:
        loaded = []
        window.results_loaded.connect(lambda: loaded.append(True))
        window.load_results(predict_out)  # the `predict -o` folder: its one scan sub-folder is taken
        wait_until(lambda: loaded or window.messages, 120, "the scan and results to load")
        assert loaded, window.messages
        finding = window.results.findings.by_id(1)
        expected = nearest_instance(lidc_0001_series, finding.center_world_xyz_mm[2])
        assert finding.centre_slice.instance_number == expected
        window.select_finding(1)
        app.processEvents()
        axial = window.views["axial"]
        assert axial.image_number() == expected
        assert axial.slice_counter_text().endswith(f"  Im {expected}")
        # Another slice shows its own number (this series numbers its images from the head: z index 0 is last).
        axial.set_slice_index(0)
        assert axial.image_number() == nearest_instance(lidc_0001_series, float(window.volume.voxel_to_world(
            (0.0, 0.0, 0.0))[2]))
        column = [c[0] for c in COLUMNS].index("slice")
        model = window.panel.proxy
        assert model.data(model.index(0, column)) == str(expected)
        assert window.views["coronal"].image_number() is None  # image numbers belong to the axial slices
    finally:
        window.close()


def test_viewer_results_with_several_scans_is_one_clear_line(predict_out, tmp_path) -> None:
    root = tmp_path / "out"
    for name in ("scan-a", "scan-b"):
        (root / name).mkdir(parents=True)
        (root / name / "nodules.json").write_text(
            (next(predict_out.glob("*/nodules.json"))).read_text())
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    res = subprocess.run([sys.executable, "-m", "nodulenet", "viewer", "--results", str(root)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    out = (res.stdout + res.stderr).strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1
    assert str(root) in out and "holds the results of 2 scans (scan-a, scan-b)" in out
    assert json.loads((root / "scan-a" / "nodules.json").read_text())["findings"]
