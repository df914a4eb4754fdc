"""``nodulenet predict`` on the DICOM folders users hand it: each bad one gets one line naming the file and the
problem, exit code 2, no traceback and no half-written output; a study folder with several series reads the
one a reader would pick (or ``--series UID``); a cohort goes on past the bad ones and lists them in summary.json.

The network is the tiny random one of test_predict_cohort.py: only the reading and the plumbing are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _bad_input import assert_one_clean_failure
from _dicom_writers import (
    compress_file,
    corrupt_frame,
    to_enhanced_ct,
    write_ct_slices,
    write_volume_as_series,
)
from pydicom.uid import JPEGLSLossless, MRImageStorage
from test_predict_cohort import SMALL_FLIPPED, TEST_NET, _cli, _save_checkpoint
from typer.testing import CliRunner

from nodulenet.io.volume import Volume
from nodulenet.preprocess.phantom import make_phantom

# Wide enough that rich never wraps a message: what the user sees is one line per failed scan.
WIDE = {"COLUMNS": "1000"}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("dicom_inputs")
    # an axis-aligned phantom (SMALL_FLIPPED without its flips): 160x160, 40 slices of 2.5 mm
    from dataclasses import replace

    phantom = make_phantom(1, replace(SMALL_FLIPPED, flip_xyz=(False, False, False)))
    image = phantom.image
    paths: dict[str, object] = {"root": root, "weights": _save_checkpoint(root / "tiny.pt", TEST_NET),
                                "image": image}

    # A study folder: the 40-slice CT, the same CT at 5 mm (20 slices), and a 60-image localizer series.
    mixed = root / "study"
    paths["ct_uid"] = write_volume_as_series(image, mixed / "s1", description="Chest 2.5", series_number=2)
    half = Volume(array=image.array[::2], spacing_zyx=(5.0, *image.spacing_zyx[1:]),
                       origin_xyz_mm=image.origin_xyz_mm, direction=image.direction)
    paths["ct5_uid"] = write_volume_as_series(half, mixed / "s2", description="Chest 5.0", series_number=3)
    flat = [np.full((64, 64), -900.0)] * 60
    paths["loc_uid"] = write_ct_slices(mixed / "s0", flat, [(0.0, 0.0, float(k)) for k in range(60)],
                                       (1, 0, 0, 0, 0, -1), (2.0, 2.0), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                       series_number=1, description="Scout")
    paths["mixed"] = mixed

    empty = root / "empty"
    empty.mkdir()
    nondicom = root / "not_dicom"
    nondicom.mkdir()
    (nondicom / "069.xml").write_text("<LidcReadMessage/>")
    (nondicom / "IM0001.dcm").write_bytes(b"\0" * 512)
    (nondicom / "readme.txt").write_text("the scan is on the other disk")
    missing = root / "missing_slice"
    write_volume_as_series(image, missing)
    files = sorted(missing.glob("*.dcm"))
    files[20].unlink()
    paths["missing_neighbours"] = (files[19].name, files[21].name)
    mr = root / "mr"
    write_ct_slices(mr, list(image.array[:10]), [image.voxel_to_world([k, 0, 0]) for k in range(10)],
                    (1, 0, 0, 0, 1, 0), image.spacing_zyx[1:], modality="MR", sop_class=MRImageStorage,
                    description="T1 axial")
    localizer = root / "localizer_only"
    write_ct_slices(localizer, flat[:2], [(0.0, 0.0, 0.0), (0.0, 0.0, 1.0)], (1, 0, 0, 0, 0, -1), (2.0, 2.0),
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    corrupt = root / "corrupt"
    enhanced = to_enhanced_ct(sorted((mixed / "s1").glob("*.dcm")), root / "tmp_enhanced.dcm")
    bad = compress_file(enhanced, corrupt / "ct.dcm", JPEGLSLossless)
    corrupt_frame(bad, 5)
    enhanced.unlink()
    paths["corrupt_file"] = bad
    paths["bad"] = {
        "empty": (empty, [str(empty), "no DICOM files found"]),
        "not_dicom": (nondicom, [str(nondicom), "no DICOM files found"]),
        "missing_slice": (missing, [str(missing), "missing slice(s)", *paths["missing_neighbours"]]),
        "mr": (mr, [str(mr), "no CT image series", "MR", "T1 axial"]),
        "localizer_only": (localizer, [str(localizer), "no CT image series", "LOCALIZER"]),
        "corrupt": (corrupt, [str(bad), "cannot decode the pixel data of frame 5 of 40", "JPEG-LS"]),
    }
    return paths


def _predict(study, scans: list[Path], out: Path, *extra: str):
    return CliRunner().invoke(_cli(), ["predict", *map(str, scans), "-o", str(out), "--weights", str(study["weights"]),
                                       "--threshold", "0", *extra], env=WIDE)


@pytest.mark.parametrize("case", ["empty", "not_dicom", "missing_slice", "mr", "localizer_only", "corrupt"])
def test_bad_dicom_folder_is_one_line_exit_2_nothing_half_written(study, case: str, tmp_path: Path) -> None:
    folder, expected = study["bad"][case]
    out = tmp_path / "out"
    summary = assert_one_clean_failure(_predict(study, [folder], out), out, expected)
    assert expected[1] in summary["scans"][0]["error"]


def test_study_folder_reads_the_reader_choice_or_the_series_asked_for(study, tmp_path: Path) -> None:
    result = _predict(study, [study["mixed"]], tmp_path / "auto")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    nodules = json.loads((Path(summary["scans"][0]["out_dir"]) / "nodules.json").read_text())
    assert nodules["source"]["series_instance_uid"] == study["ct_uid"]  # 40 slices beat 20 and the scout's 60
    assert nodules["source"]["gantry_tilt_deg"] == 0.0
    assert nodules["geometry"]["shape_zyx"] == [40, 160, 160]
    result = _predict(study, [study["mixed"]], tmp_path / "chosen", "--series", study["ct5_uid"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "chosen" / "summary.json").read_text())
    nodules = json.loads((Path(summary["scans"][0]["out_dir"]) / "nodules.json").read_text())
    assert nodules["source"]["series_instance_uid"] == study["ct5_uid"]
    assert nodules["geometry"]["shape_zyx"] == [20, 160, 160]
    result = _predict(study, [study["mixed"]], tmp_path / "scout", "--series", study["loc_uid"])
    assert result.exit_code == 2 and "localizers/scouts are not volumes" in result.output


def test_cohort_goes_on_past_every_bad_folder_and_lists_them(study, tmp_path: Path) -> None:
    bad = list(study["bad"].values())
    out = tmp_path / "out"
    result = _predict(study, [bad[0][0], study["mixed"], *[folder for folder, _ in bad[1:]]], out)
    assert result.exit_code == 1, result.output  # one scan done: the run is not "bad input" as a whole
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_scans"], summary["done"], summary["failed"]) == (7, 1, 6)
    statuses = [s["status"] for s in summary["scans"]]
    assert statuses == ["failed", "done", "failed", "failed", "failed", "failed", "failed"]
    for scan, (folder, expected) in zip([s for s in summary["scans"] if s["status"] == "failed"], bad):
        assert scan["scan"] == str(folder) and expected[0] in scan["error"] and expected[1] in scan["error"]
        assert scan["traceback"] is None and not Path(scan["out_dir"]).exists()
    assert "1 of 7 scan(s) done" in result.output


def test_console_script_corrupt_frame_exit_2_without_traceback(study, tmp_path: Path) -> None:
    folder, expected = study["bad"]["corrupt"]
    run = subprocess.run([sys.executable, "-m", "nodulenet", "predict", str(folder), "-o", str(tmp_path / "out"),
                          "--weights", str(study["weights"])], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, **WIDE})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert any(all(t in line for t in expected) for line in run.stdout.splitlines()), run.stdout


def test_series_choice_travels_to_remote_and_is_refused_with_server(study, tmp_path: Path) -> None:
    from nodulenet.predict_api import PredictOptions
    from nodulenet.remote.session import remote_predict_command

    command = remote_predict_command(PredictOptions(series_instance_uid="1.2.3.4"), "scans.txt", "out", None)
    assert command.endswith("--series 1.2.3.4")
    assert "--series" not in remote_predict_command(PredictOptions(), "scans.txt", "out", None)
    result = _predict(study, [study["mixed"]], tmp_path / "out", "--series", "1.2.3", "--server", "http://127.0.0.1:9")
    assert result.exit_code != 0 and "--series cannot be used with --server" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_gantry_tilted_series_predicts_and_says_so(study, tmp_path: Path) -> None:
    import pydicom
    from _dicom_writers import sample_tilted_slices

    image = study["image"]
    slices, positions, orientation = sample_tilted_slices(image, 15.0, 36, 2.5, image.origin_xyz_mm, 160, 160, -1024.0)
    uids = write_ct_slices(tmp_path / "tilted", slices, positions, orientation, image.spacing_zyx[1:],
                           slice_thickness=2.5, gantry_tilt_deg=15.0)
    result = _predict(study, [tmp_path / "tilted"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    folder = Path(summary["scans"][0]["out_dir"])
    nodules = json.loads((folder / "nodules.json").read_text())
    assert nodules["source"]["gantry_tilt_deg"] == pytest.approx(15.0, abs=0.01)
    assert nodules["source"]["series_instance_uid"] == uids
    assert nodules["geometry"]["shape_zyx"][0] == 36 and nodules["geometry"]["shape_zyx"][1] > 160
    assert nodules["findings"], "threshold 0: the random network's detections are findings"
    seg = pydicom.dcmread(folder / "seg.dcm")  # on the tilted source slices, which it references
    assert (seg.Rows, seg.Columns) == (160, 160)
    sources = {str(s.ReferencedSOPInstanceUID) for f in seg.PerFrameFunctionalGroupsSequence
               for d in f.DerivationImageSequence for s in d.SourceImageSequence}
    written = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "tilted").iterdir()}
    assert sources and sources <= written
