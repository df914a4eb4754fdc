"""`nodulenet predict` on the real LIDC-IDRI-0002 series with the shipped model, as a user runs it (a subprocess,
output redirected): the case of issue 19.

The readers' one nodule of this scan (about 25 mm, ground glass, drawn by 2 of 4 readers, so it is in LUNA16's
annotations_excluded.csv and not in annotations.csv) scores about 0.34 with the shipped model, so a run at the
default threshold 0.5 finds nothing. What the user must still get: the plain terminal line naming the best
candidate, a DICOM SR that records "no findings", and slice references a PACS user can follow (the DICOM
InstanceNumber of the slice whose ImagePositionPatient is nearest the centre, checked here against the files
with pydicom, independently of the reader).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

# The readers' nodule of LIDC-IDRI-0002, from LUNA16's annotations_excluded.csv (the 2-reader rows agree to 3 mm).
READERS_NODULE_WORLD = (61.03, 72.25, -100.75)
READERS_NODULE_DIAMETER_MM = 25.0


def slice_table(series: Path) -> list[tuple[float, int, float]]:
    """(ImagePositionPatient z, InstanceNumber, SliceLocation) of every slice file, straight from the files."""
    return [(float(ds.ImagePositionPatient[2]), int(ds.InstanceNumber), float(ds.SliceLocation))
            for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.glob("*.dcm")))]


def nearest(table: list[tuple[float, int, float]], z_mm: float) -> tuple[float, int, float]:
    return min(table, key=lambda row: abs(row[0] - z_mm))


@pytest.fixture(scope="module")
def run_0002(lidc_0002_series: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # A deep output path: longer than 80 columns, so a console that wrapped redirected output would break it.
    out = tmp_path_factory.mktemp("predict") / ("a-rather-long-output-folder-name-" * 3) / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    res = subprocess.run([sys.executable, "-m", "nodulenet", "predict", str(lidc_0002_series), "-o", str(out),
                          "--threads", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return {"stdout": res.stdout, "out": out, "folder": folder,
            "nodules": json.loads((folder / "nodules.json").read_text()), "table": slice_table(lidc_0002_series)}


def test_zero_findings_are_said_plainly_with_the_best_candidate(run_0002: dict) -> None:
    nodules = run_0002["nodules"]
    assert nodules["findings"] == [] and nodules["threshold"] == 0.5
    best = nodules["below_threshold"][0]
    # The best candidate is the readers' nodule (LUNA16 hit rule: centre within its radius).
    assert math.dist(best["center_world_xyz_mm"], READERS_NODULE_WORLD) < READERS_NODULE_DIAMETER_MM / 2
    assert best["score"] < 0.5
    x, y, z = best["center_world_xyz_mm"]
    image = best["centre_slice"]["instance_number"]
    line = (f"no nodule scored >= 0.5; the highest candidate scored {best['score']:.3f} at "
            f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS, image {image}")
    assert line in run_0002["stdout"]
    # Redirected output is not wrapped at 80 columns: the output folder is printed whole, on one line.
    assert any(str(run_0002["folder"]) in row for row in run_0002["stdout"].splitlines())
    scores = [c["score"] for c in nodules["below_threshold"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5


def test_instance_numbers_are_the_slices_nearest_the_centres(run_0002: dict) -> None:
    table = run_0002["table"]
    for candidate in run_0002["nodules"]["below_threshold"]:
        ref = candidate["centre_slice"]
        position, instance, location = nearest(table, candidate["center_world_xyz_mm"][2])
        assert (ref["instance_number"], ref["slice_location_mm"]) == (instance, location)
        assert ref["position_z_mm"] == pytest.approx(position, abs=1e-3)
    # The readers' nodule: on image 73 of this series (array index 188 counts from the feet: 261 - 73 = 188).
    best = run_0002["nodules"]["below_threshold"][0]["centre_slice"]
    assert best["instance_number"] == 73 and best["index"] == 188


def test_a_zero_finding_dicom_run_writes_an_sr_that_says_so(run_0002: dict, lidc_0002_series: Path) -> None:
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    folder = run_0002["folder"]
    assert (folder / "sr.dcm").is_file() and not (folder / "seg.dcm").exists()
    sr = hd.sr.srread(folder / "sr.dcm")
    assert sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE" and sr.PatientID == "LIDC-IDRI-0002"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == run_0002["nodules"]["source"]["series_instance_uid"]
    assert len(evidence.ReferencedSOPSequence) == len(list(lidc_0002_series.glob("*.dcm")))
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    (group,) = sr.content.get_planar_roi_measurement_groups() + list(
        sr.content.get_image_measurement_groups())
    assert group.tracking_identifier == "No nodule found scoring >= 0.5"
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == codes.DCM.CADProcessingAndFindingsSummary
    assert evaluation.value == codes.DCM.AllAlgorithmsSucceededWithoutFindings
    summary = json.loads((run_0002["out"] / "summary.json").read_text())
    assert summary["scans"][0]["details"]["skipped_outputs"] == {
        "dicom_seg": "no findings (a DICOM SEG needs at least one segment)"}


def test_the_report_lists_the_candidates_apart_and_names_their_images(run_0002: dict) -> None:
    html = (run_0002["folder"] / "report.html").read_text()
    assert "No nodule was found with a score of at least 0.5." in html
    assert "Below the threshold: not findings (5)" in html and "NOT reported as nodules" in html
    best = run_0002["nodules"]["below_threshold"][0]
    assert f"<tr><td>{best['score']:.3f}</td><td class=\"text\">image 73 (z -99.5 mm)</td>" in html
