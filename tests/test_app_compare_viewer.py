"""The follow-up viewer (``nodulenet viewer --compare OUT``) under Xvfb, on a compare folder of the synthetic pair
(the patient moved 7 mm and 4 degrees between the scans): selecting the grown nodule puts each view's crosshair on
it in its own scan, and a click in one view puts the other's crosshair on the same anatomy through the
registration. Truth: the generator's nodule centres in each scan's world coordinates (``truth.json``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _xvfb import qt_application, wait_until
from test_followup_compare import _reference_result
from nodulenet.followup.compare_api import CompareOptions, compare_scans
from nodulenet.followup.synthetic import FollowupTruth, write_followup_pair

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_viewer")
    pair = write_followup_pair(root / "pair", 11, interval_days=180.0)
    prior = _reference_result(root / "p", pair["prior"], pair["prior_labels"])
    current = _reference_result(root / "c", pair["current"], pair["current_labels"])
    result = compare_scans(prior, current, root / "out", CompareOptions(interval_days=180.0))
    truth = FollowupTruth(**json.loads(pair["truth"].read_text()))
    return {"out": result.json_path.parent, "comparison": result.comparison, "truth": truth}


@pytest.fixture(scope="module")
def window(compared):
    qt_application()
    from nodulenet.app.compare_window import CompareWindow

    w = CompareWindow()
    w.resize(1500, 920)
    w.show()
    loaded: list[bool] = []
    w.comparison_loaded.connect(lambda: loaded.append(True))
    w.open_comparison(compared["out"])
    wait_until(lambda: loaded or w.messages, 60, "the comparison to open")
    assert loaded, w.messages
    yield w
    w.close()


def _grown_row(comparison: dict, truth: FollowupTruth) -> int:
    target = np.asarray(truth.current["grown"]["center_world_xyz_mm"])
    rows = [r for r, n in enumerate(comparison["nodules"]) if n["status"] == "persistent"]
    return min(rows, key=lambda r: np.linalg.norm(np.asarray(comparison["nodules"][r]["current"]
                                                              ["center_world_xyz_mm"]) - target))


def test_compare_writes_the_registration_for_the_viewer(compared):
    import SimpleITK as sitk

    truth = compared["truth"]
    assert compared["comparison"]["registration"]["transform_file"] == "current_to_prior.tfm"
    to_prior = sitk.ReadTransform(str(compared["out"] / "current_to_prior.tfm"))
    for role in ("grown", "stable"):
        mapped = to_prior.TransformPoint(tuple(truth.current[role]["center_world_xyz_mm"]))
        assert np.linalg.norm(np.subtract(mapped, truth.prior[role]["center_world_xyz_mm"])) < 2.0, role


def test_selecting_the_grown_nodule_puts_both_crosshairs_on_it(window, compared, tmp_path):
    truth = compared["truth"]
    row = _grown_row(compared["comparison"], truth)
    window.select_nodule(row)
    for side in ("prior", "current"):
        true_centre = np.asarray(getattr(truth, side)["grown"]["center_world_xyz_mm"])
        error = np.linalg.norm(window.cursor_world(side) - true_centre)
        assert error < 2.0, (side, error)
    assert window.table.item(row, 0).text() == "persistent"
    assert window.views["current"].selected_id == compared["comparison"]["nodules"][row]["current"]["finding_id"]
    shot = window.save_screenshot(tmp_path / "compare.png")  # docs/images/viewer_compare.png: app.screenshots
    assert shot.stat().st_size > 20_000


def test_a_click_in_one_view_moves_the_other_crosshair_to_the_registered_point(window, compared):
    from PySide6.QtCore import QPointF, Qt
    from PySide6.QtTest import QTest

    truth = compared["truth"]
    for clicked, other, role in (("current", "prior", "stable"), ("prior", "current", "grown")):
        # Put the clicked view on the nodule's slice, then click its centre as a user would.
        exam = window.loaded.exams[clicked]
        zyx = exam.volume.world_to_voxel(getattr(truth, clicked)[role]["center_world_xyz_mm"])
        view = window.views[clicked]
        view.set_cursor(tuple(float(v) for v in zyx))
        point = view.voxel_to_widget(zyx)
        QTest.mouseClick(view, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                         QPointF(point.x(), point.y()).toPoint())
        assert np.linalg.norm(window.cursor_world(clicked) - getattr(truth, clicked)[role]["center_world_xyz_mm"]) < 2.0
        true_centre = np.asarray(getattr(truth, other)[role]["center_world_xyz_mm"])
        error = np.linalg.norm(window.cursor_world(other) - true_centre)
        assert error < 2.0, (clicked, role, error)


def test_viewer_compare_on_a_folder_without_comparison_is_one_line(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    res = subprocess.run([sys.executable, "-m", "nodulenet", "viewer", "--compare", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "has no comparison.json" in res.stderr
