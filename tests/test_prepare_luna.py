"""``prepare_luna`` and the run machinery (resume, redo, config change, failures, worker processes) on
small synthetic chests written as LUNA16-style ``<seriesuid>.mhd`` files; plus a slow real-data run.

Synthetic answers are analytic: the nodule sphere's voxel count is 4/3 pi r^3 on the 1 mm grid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nodulenet.errors import InputError
from nodulenet.io.image_files import read_image, write_image
from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.prepare_dataset import find_luna_cases, prepare_luna
from nodulenet.preprocess.resample import CaseTransform

UID_A = "1.2.826.0.1.3680043.8.498.1"
UID_B = "1.2.826.0.1.3680043.8.498.2"
SPACING_ZYX = (2.0, 1.5, 1.5)
ORIGIN = (-90.0, -90.0, -400.0)


def _chest(shift_x_mm: float = 0.0) -> Volume:
    """A body (40 HU) with two ellipsoid lungs (-850 HU, 60 x 40 x 30 mm semi-axes) in air, on a 2 x 1.5 mm grid."""
    shape = (90, 120, 120)
    z = np.arange(shape[0])[:, None, None] * SPACING_ZYX[0]
    y = (np.arange(shape[1])[None, :, None] - shape[1] / 2) * SPACING_ZYX[1]
    x = (np.arange(shape[2])[None, None, :] - shape[2] / 2) * SPACING_ZYX[2]
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[np.broadcast_to((x / 85.0) ** 2 + (y / 60.0) ** 2 <= 1.0, shape)] = 40
    for cx in (-40.0 + shift_x_mm, 40.0 + shift_x_mm):
        hu[((z - 90.0) / 60.0) ** 2 + (y / 40.0) ** 2 + ((x - cx) / 30.0) ** 2 <= 1.0] = -850
    return Volume(hu, SPACING_ZYX, ORIGIN)


# World centre of a nodule placed in lung A: grid (z, y, x) mm (90, 0, 40) -> LPS world (x, y, z).
NODULE_WORLD = (ORIGIN[0] + 60 * 1.5 + 40.0, ORIGIN[1] + 60 * 1.5, ORIGIN[2] + 90.0)


@pytest.fixture()
def luna(tmp_path: Path) -> dict[str, Path]:
    mhd = tmp_path / "luna" / "subset0"
    mhd.mkdir(parents=True)
    write_image(_chest(), mhd / f"{UID_A}.mhd")
    write_image(_chest(shift_x_mm=5.0), mhd / f"{UID_B}.mhd")
    csv = tmp_path / "annotations.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + f"{UID_A},{NODULE_WORLD[0]},{NODULE_WORLD[1]},"
                   f"{NODULE_WORLD[2]},10.0\n")
    return {"mhd": tmp_path / "luna", "csv": csv, "out": tmp_path / "out"}


def _status(summary) -> dict[str, str]:  # noqa: ANN001
    return {c.case_id: c.status for c in summary.cases}


def test_luna_spheres_resume_redo_and_failures(luna: dict[str, Path]) -> None:
    out = luna["out"]
    # Two worker processes: exercises the process pool (spawned workers, results gathered).
    fast = PrepareConfig(overlay=False)  # the picture is tested with real data; it costs time here
    first = prepare_luna(luna["mhd"], luna["csv"], out, fast, workers=2, show_progress=False)
    assert _status(first) == {UID_A: "done", UID_B: "done"}, first.failed

    nodules = json.loads((out / UID_A / "nodules.json").read_text())
    (nodule,) = nodules["nodules"]
    assert nodule["n_readers"] is None and nodule["diameter_mm"] == 10.0
    assert "spheres" in nodules["source"]["labels"]["mask"]
    mask = read_image(out / UID_A / "nodule_mask.nrrd")
    # A 10 mm ball on the 1 mm grid: 4/3 pi 5^3 = 523.6 mm^3 (voxel counting adds a few per cent).
    assert np.count_nonzero(mask.array == 1) == pytest.approx(523.6, rel=0.05)
    centre = np.argwhere(mask.array == 1).mean(axis=0)
    assert np.linalg.norm(mask.voxel_to_world(centre) - NODULE_WORLD) < 0.5
    assert np.allclose(nodule["center_zyx"], centre, atol=0.5)
    transform = CaseTransform.from_dict(json.loads((out / UID_A / "transform.json").read_text()))
    assert transform.original.spacing_zyx == SPACING_ZYX
    assert json.loads((out / UID_B / "nodules.json").read_text())["nodules"] == []
    assert not read_image(out / UID_B / "nodule_mask.nrrd").array.any()

    # Rerun: nothing to do.
    mtime = (out / UID_A / "image.nrrd").stat().st_mtime_ns
    assert _status(prepare_luna(luna["mhd"], luna["csv"], out, fast, show_progress=False)) == {
        UID_A: "skipped", UID_B: "skipped"}
    assert (out / UID_A / "image.nrrd").stat().st_mtime_ns == mtime

    # A folder without done.json (an interrupted case) is redone; the finished one is not.
    (out / UID_B / "done.json").unlink()
    assert _status(prepare_luna(luna["mhd"], luna["csv"], out, fast, show_progress=False)) == {
        UID_A: "skipped", UID_B: "done"}

    # Other settings: every case is redone with them.
    changed = fast.replace(pad_value=0)
    redone = prepare_luna(luna["mhd"], luna["csv"], out, changed, show_progress=False)
    assert _status(redone) == {UID_A: "done", UID_B: "done"}
    assert json.loads((out / UID_A / "config.json").read_text())["prepare"]["pad_value"] == 0

    # A truncated data file fails alone, named in errors.json; the others are untouched.
    bad = luna["mhd"] / "subset0" / "1.2.3.mhd"
    write_image(_chest(), bad)
    raw = bad.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    run = prepare_luna(luna["mhd"], luna["csv"], out, changed, show_progress=False)
    assert _status(run) == {UID_A: "skipped", UID_B: "skipped", "1.2.3": "failed"}
    (error,) = json.loads((out / "errors.json").read_text())
    assert error["case_id"] == "1.2.3" and "1.2.3" in error["file"] and error["message"]
    assert json.loads((out / "summary.json").read_text())["n_failed"] == 1


def test_duplicate_series_and_empty_folders_are_input_errors(luna: dict[str, Path], tmp_path: Path) -> None:
    other = luna["mhd"] / "subset1"
    other.mkdir()
    write_image(_chest(), other / f"{UID_A}.mhd")
    with pytest.raises(InputError, match="also found"):
        find_luna_cases(luna["mhd"], luna["csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .mhd"):
        prepare_luna(tmp_path / "empty", luna["csv"], tmp_path / "o", show_progress=False)


@pytest.mark.slow
def test_real_0001_as_luna_mhd(tmp_path: Path, lidc_0001_series: Path, luna_root: Path) -> None:
    """LIDC-IDRI-0001 converted to ``<seriesuid>.mhd`` and prepared from the official annotations.csv."""
    from nodulenet.io.dicom import read_dicom_series

    ct = read_dicom_series(lidc_0001_series)
    uid = ct.meta["series_instance_uid"]
    (tmp_path / "mhd").mkdir()
    write_image(ct, tmp_path / "mhd" / f"{uid}.mhd")
    run = prepare_luna(tmp_path / "mhd", luna_root / "annotations.csv", tmp_path / "out",
                       excluded_csv=luna_root / "annotations_excluded.csv", show_progress=False)
    assert _status(run) == {uid: "done"}, run.failed
    data = json.loads((tmp_path / "out" / uid / "nodules.json").read_text())
    (nodule,) = data["nodules"]
    assert nodule["diameter_mm"] == pytest.approx(23.4, abs=0.1)
    mask = read_image(tmp_path / "out" / uid / "nodule_mask.nrrd")
    ball_mm3 = 4 / 3 * np.pi * (nodule["diameter_mm"] / 2) ** 3
    assert np.count_nonzero(mask.array == 1) == pytest.approx(ball_mm3, rel=0.03)
    assert data["excluded_nodules"], "annotations_excluded.csv lists findings of this scan"
    assert os.path.exists(tmp_path / "out" / uid / "overlay.png")
