"""``nodulenet predict`` on the broken MetaImage/NIfTI/NRRD files users hand it (issue 12's sweep, image-file
half; the DICOM half is test_predict_dicom_inputs.py): each gets one line naming the file and the problem, exit
code 2, no traceback and no half-written output; a cohort goes on past them. A sagittal (PIL) file of the same
scan is read in canonical orientation and predicted like the axial one.

The network is the tiny random one of test_predict_cohort.py: only the reading and the plumbing are asserted.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _bad_input import assert_one_clean_failure
import SimpleITK as sitk
from test_predict_cohort import SMALL_FLIPPED, TEST_NET, _cli, _save_checkpoint
from typer.testing import CliRunner

from nodulenet.io.image_files import write_image
from nodulenet.preprocess.phantom import make_phantom

WIDE = {"COLUMNS": "1000"}  # rich never wraps: what the user sees is one line per failed scan
# NIfTI-1 header fields (byte offsets): qform_code, sform_code (int16), srow_x/y/z (3 x 4 float32).
_NIFTI_CODES, _NIFTI_SROW = slice(252, 256), slice(280, 328)


def _nifti_with_sform(good: Path, path: Path, srow: list[float]) -> Path:
    """``good`` with only an sform (qform_code 0), set to ``srow``: what ITK must take the geometry from."""
    header = bytearray(good.read_bytes())
    header[_NIFTI_CODES] = struct.pack("<hh", 0, 1)
    header[_NIFTI_SROW] = struct.pack("<12f", *srow)
    path.write_bytes(bytes(header))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("image_inputs")
    phantom = make_phantom(1, replace(SMALL_FLIPPED, flip_xyz=(False, False, False)))
    paths: dict[str, object] = {"root": root, "weights": _save_checkpoint(root / "tiny.pt", TEST_NET)}
    good = write_image(phantom.image, root / "good.nii")
    paths["good"] = good
    image = sitk.ReadImage(str(good))
    paths["sagittal"] = root / "sagittal_PIL.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(image, "PIL"), str(paths["sagittal"]))

    truncated = write_image(phantom.image, root / "truncated.mhd")
    raw = truncated.with_suffix(".raw")
    size = raw.stat().st_size
    raw.write_bytes(raw.read_bytes()[: size // 3])
    singular = _nifti_with_sform(good, root / "singular.nii", [1.25, 0, 0, 0, 0, 1.25, 0, 0, 0, 0, 0, 0])
    parallel = _nifti_with_sform(good, root / "parallel.nii", [1.25, 1.25, 0, 0, 0, 0, 2.5, 0, 0, 0, 0, 0])
    mhd = truncated.read_text()
    sheared = root / "sheared.mhd"
    sheared.write_text(mhd.replace("ElementDataFile = truncated.raw", "ElementDataFile = good_copy.raw")
                       .replace("TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0 0 0.5 1 0 0 0 1"))
    write_image(phantom.image, root / "good_copy.mhd")
    flat = root / "flat.mhd"
    flat.write_text(sheared.read_text().replace("TransformMatrix = 1 0 0 0.5 1 0 0 0 1",
                                                "TransformMatrix = 1 0 0 0 1 0 0 0 0"))
    paths["bad"] = {
        "truncated_raw": (root / "truncated.mhd", [str(raw), "truncated", f"only {size // 3} are there"]),
        "nifti_singular_direction": (singular, [str(singular), "direction matrix", "singular"]),
        "nifti_parallel_axes": (parallel, [str(parallel), "direction matrix", "singular"]),
        "metaimage_sheared_direction": (sheared, [str(sheared), "orthonormal", "sheared"]),
        "metaimage_singular_direction": (flat, [str(flat), "direction matrix is singular"]),
    }
    return paths


def _predict(files, scans: list[Path], out: Path):
    return CliRunner().invoke(_cli(), ["predict", *map(str, scans), "-o", str(out), "--weights", str(files["weights"]),
                                       "--threshold", "0"], env=WIDE)


@pytest.mark.parametrize("case", ["truncated_raw", "nifti_singular_direction", "nifti_parallel_axes",
                                  "metaimage_sheared_direction", "metaimage_singular_direction"])
def test_bad_image_file_is_one_line_exit_2_nothing_half_written(files, case: str, tmp_path: Path) -> None:
    path, expected = files["bad"][case]
    out = tmp_path / "out"
    result = _predict(files, [path], out)
    assert "ITK ERROR" not in result.output
    assert_one_clean_failure(result, out, expected)


def test_cohort_goes_on_past_every_bad_file_and_a_sagittal_file_is_predicted_like_the_axial_one(files, tmp_path):
    bad = list(files["bad"].values())
    out = tmp_path / "out"
    scans = [bad[0][0], files["good"], *[path for path, _ in bad[1:]], files["sagittal"]]
    result = _predict(files, scans, out)
    assert result.exit_code == 1, result.output  # two scans done: not "bad input" as a whole
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_scans"], summary["done"], summary["failed"]) == (7, 2, 5)
    failed = [s for s in summary["scans"] if s["status"] == "failed"]
    for scan, (path, expected) in zip(failed, bad):
        assert scan["scan"] == str(path) and all(text in scan["error"] for text in expected)
        assert scan["traceback"] is None and not Path(scan["out_dir"]).exists()
    axial, sagittal = [s for s in summary["scans"] if s["status"] == "done"]
    assert sagittal["details"]["orientation"]["method"] == "reindexed"
    assert sagittal["details"]["orientation"]["input_code"] == "PIL"
    assert sagittal["details"]["preprocessed_shape_zyx"] == axial["details"]["preprocessed_shape_zyx"]
    assert axial["findings"] and [f["score"] for f in sagittal["findings"]] == [f["score"] for f in axial["findings"]]
    for a, s in zip(axial["findings"], sagittal["findings"]):
        assert np.allclose(a["center_world_xyz_mm"], s["center_world_xyz_mm"], atol=0.011)  # rounded to 0.01
    # The label map of the sagittal file is on its own grid, the axial one's re-indexed.
    axial_labels = sitk.ReadImage(str(Path(axial["out_dir"]) / "labels.nii.gz"))
    sagittal_labels = sitk.ReadImage(str(Path(sagittal["out_dir"]) / "labels.nii.gz"))
    assert sagittal_labels.GetSize() == sitk.ReadImage(str(files["sagittal"])).GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(sagittal_labels),
                          sitk.GetArrayFromImage(sitk.DICOMOrient(axial_labels, "PIL")))
