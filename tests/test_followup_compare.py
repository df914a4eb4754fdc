"""``nodulenet compare`` on a synthetic follow-up pair with known change (one nodule grown, one stable, one gone,
one new; the patient moved between the scans by a known rigid transform), and its bad inputs.

Truth comes from the generator (:mod:`nodulenet.followup.synthetic`): nodule centres in each scan's world mm, their
partial-volume volumes, and the move. The shipped demo model finds and outlines the nodules in the end-to-end test;
the volume-change test uses the generator's own masks, so it checks the comparison's arithmetic and registration
independently of the network's segmentation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nodulenet.errors import NoduleNetError
from nodulenet.followup.compare_api import CompareOptions, PatientMismatchError, compare_scans
from nodulenet.followup.registration import RegistrationError
from nodulenet.followup.synthetic import FollowupTruth, write_followup_pair
from nodulenet.io.findings import ScanFindings, ScanSource
from nodulenet.io.scan import read_scan

INTERVAL = 180.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_followup_pair(tmp_path_factory.mktemp("pair"), 11, interval_days=INTERVAL)


@pytest.fixture(scope="module")
def truth(pair: dict[str, Path]) -> FollowupTruth:
    return FollowupTruth(**json.loads(pair["truth"].read_text()))


def _reference_result(folder: Path, scan: Path, labels: Path, patient_id: str | None = None,
                      study_date: str | None = None) -> Path:
    """A predict-style result folder made from the generator's own masks (score 1)."""
    from nodulenet.export.labelmap import write_label_map
    from nodulenet.export.measurements import findings_from_label_map

    hu, label_map = read_scan(scan), read_scan(labels)
    present = np.unique(label_map.array)
    label_map = label_map.with_array(np.searchsorted(present, label_map.array).astype(np.uint8))  # ids 1..K
    ids = list(range(1, len(present)))
    findings = findings_from_label_map(label_map, hu, {k: 1.0 for k in ids})
    result = ScanFindings(ScanSource(path=str(scan), format="nifti", patient_id=patient_id, study_date=study_date),
                          hu.geometry, findings, threshold=0.5)
    folder.mkdir(parents=True, exist_ok=True)
    result.write_json(folder / "nodules.json")
    write_label_map(result, None, folder / "labels.nii.gz")
    return folder


def _by_status(comparison: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"persistent": [], "new": [], "resolved": []}
    for n in comparison["nodules"]:
        out[n["status"]].append(n)
    return out


def _nearest(entries: list[dict], side: str, key: str, point) -> dict:
    return min(entries, key=lambda n: np.linalg.norm(np.asarray(n[side][key]) - np.asarray(point)))


def test_compare_two_scans_with_the_shipped_model(pair, truth, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, "-m", "nodulenet", "compare", str(pair["prior"]), str(pair["current"]),
                          "-o", str(out), "--interval-days", str(INTERVAL)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "Lung-RADS v2022 exam category" in res.stdout and "decision aid" in res.stdout
    c = json.loads((out / "comparison.json").read_text())
    assert c["schema"] == "nodulenet.comparison/1" and "not a diagnosis" in c["notice"]
    groups = _by_status(c)
    assert [len(groups[s]) for s in ("persistent", "new", "resolved")] == [2, 1, 1], c["nodules"]
    # The right nodules in each group, and the registration within 2 mm at the nodule centres.
    new = groups["new"][0]
    assert np.linalg.norm(np.subtract(new["current"]["center_world_xyz_mm"], truth.current["new"]["center_world_xyz_mm"])) < 3.0
    resolved = groups["resolved"][0]
    assert np.linalg.norm(np.subtract(resolved["prior"]["center_world_xyz_mm"],
                                      truth.prior["resolved"]["center_world_xyz_mm"])) < 3.0
    for role in ("grown", "stable"):
        n = _nearest(groups["persistent"], "current", "center_world_xyz_mm", truth.current[role]["center_world_xyz_mm"])
        expected = truth.current_from_prior(n["prior"]["center_world_xyz_mm"])
        assert np.linalg.norm(np.subtract(n["prior"]["center_in_current_xyz_mm"], expected)) < 2.0, role
    grown = _nearest(groups["persistent"], "current", "center_world_xyz_mm", truth.current["grown"]["center_world_xyz_mm"])
    stable = next(n for n in groups["persistent"] if n is not grown)
    true_vdt = INTERVAL * math.log(2) / math.log(truth.current["grown"]["volume_mm3"] / truth.prior["grown"]["volume_mm3"])
    # The VDT is the comparison's own volumes' (exactly the formula), and near the truth as far as the model's masks
    # allow: the demo model's error on this figure is a property of its segmentation, measured over 8 pairs (seeds
    # 11-18; benchmarks/followup_vdt_accuracy.py -> benchmarks/results/followup_vdt_accuracy.json): |error| median
    # 0.151, at most 0.235 for the shipped model (stage 5), 0.089 / 0.191 for stage 4 before it, which passed the
    # 15 % this test used to ask on this seed but missed it on 3 of the 7 pairs it matched. The arithmetic alone is
    # checked against the generator's masks in test_volume_change_and_doubling_time_from_reference_masks.
    v0, v1 = grown["prior"]["volume_mm3"], grown["current"]["volume_mm3"]
    assert grown["volume_doubling_time_days"] == pytest.approx(INTERVAL * math.log(2) / math.log(v1 / v0), abs=0.1)
    assert grown["volume_doubling_time_days"] == pytest.approx(true_vdt, rel=0.3)
    assert grown["lung_rads_growth"] and grown["lung_rads"]["category"] == "4B"  # growing solid >= 8 mm
    assert not stable["lung_rads_growth"] and abs(stable["mean_diameter_change_mm"]) < 1.5
    assert c["lung_rads"]["exam"]["category"] == "4B"
    html = (out / "comparison.html").read_text()
    assert "research software, not a medical device" in html and html.count("<img") == 6  # 2 + 2 + 1 + 1 crops


def test_volume_change_and_doubling_time_from_reference_masks(pair, truth, tmp_path: Path) -> None:
    prior = _reference_result(tmp_path / "p", pair["prior"], pair["prior_labels"], "P1", "20250101")
    current = _reference_result(tmp_path / "c", pair["current"], pair["current_labels"], "P1", "20250630")
    result = compare_scans(prior, current, tmp_path / "out")
    c = result.comparison
    assert result.sr_path is None and not (tmp_path / "out" / "comparison_sr.dcm").exists()  # NIfTI: no SR
    assert c["interval_days"] == INTERVAL and c["interval_source"] == "StudyDate"
    assert c["patient_identity"] == "same PatientID"
    groups = _by_status(c)
    grown = _nearest(groups["persistent"], "current", "center_world_xyz_mm", truth.current["grown"]["center_world_xyz_mm"])
    true_change = truth.current["grown"]["volume_mm3"] - truth.prior["grown"]["volume_mm3"]
    assert grown["volume_change_mm3"] == pytest.approx(true_change, rel=0.10)
    true_vdt = INTERVAL * math.log(2) / math.log(truth.current["grown"]["volume_mm3"] / truth.prior["grown"]["volume_mm3"])
    assert grown["volume_doubling_time_days"] == pytest.approx(true_vdt, rel=0.15)
    assert grown["current"]["nodule_type"] == "solid" and grown["prior"]["mean_diameter_mm"] < 7.5


def test_different_patients_are_refused_unless_forced(pair, tmp_path: Path) -> None:
    prior = _reference_result(tmp_path / "p", pair["prior"], pair["prior_labels"], "P1")
    current = _reference_result(tmp_path / "c", pair["current"], pair["current_labels"], "P2")
    with pytest.raises(PatientMismatchError, match="different patients .*'P1' and 'P2'.* --force"):
        compare_scans(prior, current, tmp_path / "out", CompareOptions(interval_days=INTERVAL))
    assert not (tmp_path / "out" / "comparison.json").exists()
    forced = compare_scans(prior, current, tmp_path / "out", CompareOptions(interval_days=INTERVAL, force=True))
    assert "compared with --force" in forced.comparison["patient_identity"]


def test_missing_study_date_needs_interval_days(pair, tmp_path: Path) -> None:
    prior = _reference_result(tmp_path / "p", pair["prior"], pair["prior_labels"])
    current = _reference_result(tmp_path / "c", pair["current"], pair["current_labels"])
    res = subprocess.run([sys.executable, "-m", "nodulenet", "compare", str(prior), str(current), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no study date" in res.stderr and "--interval-days" in res.stderr


def test_fields_of_view_that_do_not_overlap_are_refused(pair, tmp_path: Path) -> None:
    from nodulenet.io.image_files import write_image
    from nodulenet.preprocess.lung_mask import segment_lungs

    lung_slices = np.flatnonzero(segment_lungs(read_scan(pair["prior"])).lungs.any(axis=(1, 2)))
    z0, z1 = int(lung_slices[0]), int(lung_slices[-1])
    split = (z0 + int(0.45 * (z1 - z0)), z0 + int(0.55 * (z1 - z0)))
    paths = {}
    for name, keep in (("prior", slice(0, split[0])), ("current", slice(split[1], None))):  # lower vs upper lungs
        scan, labels = read_scan(pair[name]), read_scan(pair[f"{name}_labels"])
        for volume, suffix in ((scan, ""), (labels, "_labels")):
            cut = volume.array[keep]
            origin = volume.geometry.voxel_to_world((keep.start, 0, 0))
            cropped = type(volume).from_geometry(cut, type(volume.geometry)(cut.shape, volume.spacing_zyx, tuple(origin),
                                                                         volume.direction), {})
            paths[name + suffix] = write_image(cropped, tmp_path / f"{name}{suffix}.nii.gz")
    empty = {}
    for name in ("prior", "current"):
        empty[name] = _reference_result(tmp_path / name, paths[name], paths[f"{name}_labels"])
    with pytest.raises(RegistrationError, match="fields of view do not overlap"):
        compare_scans(empty["prior"], empty["current"], tmp_path / "out", CompareOptions(interval_days=INTERVAL))


def test_a_result_folder_whose_scan_is_gone_is_named(pair, tmp_path: Path) -> None:
    import shutil

    scan = tmp_path / "moved.nii.gz"
    shutil.copy(pair["prior"], scan)
    prior = _reference_result(tmp_path / "p", scan, pair["prior_labels"])
    scan.unlink()
    with pytest.raises(NoduleNetError, match=r"p: the scan it was made from .*moved.nii.gz\) is not there"):
        compare_scans(prior, pair["current"], tmp_path / "out", CompareOptions(interval_days=INTERVAL))
