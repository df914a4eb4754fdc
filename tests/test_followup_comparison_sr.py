"""``comparison_sr.dcm``: the follow-up changes as a TID 1500 SR, for a synthetic follow-up pair written as two DICOM
studies of one patient (same PatientID, StudyDates 180 days apart, own Study UIDs).

The default-suite test builds the result folders from the generator's own masks (with a real ``seg.dcm`` for the
current exam, written by the project's SEG exporter), so it checks the SR against ``comparison.json`` without the
network; the second runs ``nodulenet compare`` on the two DICOM series with the shipped demo model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from nodulenet.followup.compare_api import compare_scans
from nodulenet.followup.comparison_sr import DOUBLING_TIME, SCHEME
from nodulenet.followup.synthetic import write_followup_pair
from nodulenet.io.findings import ScanFindings, ScanSource
from nodulenet.io.scan import read_scan

INTERVAL = 180.0


@pytest.fixture(scope="module")
def dicom_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_followup_pair(tmp_path_factory.mktemp("dicom_pair"), 11, interval_days=INTERVAL, fmt="dicom",
                               patient_id="FU-1")


def _reference_dicom_result(folder: Path, series: Path, labels: Path, seg: bool) -> Path:
    """A predict-style result folder of a DICOM series from the generator's masks (score 1), with ``seg.dcm``."""
    from nodulenet.export.dicom_seg import write_dicom_seg
    from nodulenet.export.labelmap import write_label_map
    from nodulenet.export.measurements import findings_from_label_map

    hu, label_map = read_scan(series), read_scan(labels)
    present = np.unique(label_map.array)
    label_map = label_map.with_array(np.searchsorted(present, label_map.array).astype(np.uint8))
    findings = findings_from_label_map(label_map, hu, {k: 1.0 for k in range(1, len(present))})
    result = ScanFindings(ScanSource.from_volume_meta(hu.meta), hu.geometry, findings, threshold=0.5)
    folder.mkdir(parents=True, exist_ok=True)
    result.write_json(folder / "nodules.json")
    write_label_map(result, None, folder / "labels.nii.gz")
    if seg:
        write_dicom_seg(result, hu, folder / "seg.dcm")
    return folder


def _content(ds) -> list:
    return list(ds.ContentSequence)


def _concept(item) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodingSchemeDesignator), str(c.CodeValue)


def _groups(sr) -> list:
    """The measurement groups of a TID 1500 report (under "Imaging Measurements")."""
    measurements = next(i for i in _content(sr) if _concept(i) == ("DCM", "126010"))
    return list(measurements.ContentSequence)


def _read_group(group) -> dict:
    """name -> value of the group's items: numbers (with their UCUM unit), codes, text."""
    out: dict = {}
    for item in group.ContentSequence:
        key = _concept(item)
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            out[key] = (float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
        elif item.ValueType == "CODE":
            out[key] = str(item.ConceptCodeSequence[0].CodeValue)
        elif item.ValueType == "TEXT":
            out[key] = str(item.TextValue)
    return out


def _check_sr_against_comparison(sr_path: Path, comparison: dict, current_series: Path, seg_path: Path | None) -> None:
    sr = pydicom.dcmread(sr_path)
    ct = pydicom.dcmread(next(current_series.glob("*.dcm")), stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == ct.StudyInstanceUID and sr.PatientID == ct.PatientID == "FU-1"
    assert sr.SeriesInstanceUID != ct.SeriesInstanceUID
    assert "decision aid" in sr.SeriesDescription and sr.VerificationFlag == "UNVERIFIED"
    referenced = {str(i.ReferencedSOPInstanceUID) for e in sr.CurrentRequestedProcedureEvidenceSequence
                  for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert str(ct.SOPInstanceUID) in referenced
    if seg_path is not None:
        assert str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID) in referenced
    groups = [_read_group(g) for g in _groups(sr)]
    nodules, exam = groups[:-1], groups[-1]
    assert len(nodules) == len(comparison["nodules"])
    status_key, category_key, rule_key = (SCHEME, "STATUS"), (SCHEME, "LUNGRADS2022"), (SCHEME, "LUNGRADSRULE")
    assert [g[status_key] for g in nodules] == [n["status"].upper() for n in comparison["nodules"]]
    for g, n in zip(nodules, comparison["nodules"]):
        if n["status"] == "persistent":
            vdt = n["volume_doubling_time_days"]
            if vdt is not None:
                assert g[(SCHEME, "VDT")] == (pytest.approx(vdt), "d")
            assert g[(SCHEME, "VOLCHANGE")] == (pytest.approx(n["volume_change_mm3"]), "mm3")
            assert g[("SCT", "118565006")] == (pytest.approx(n["current"]["volume_mm3"]), "mm3")
            assert g[(SCHEME, "PRIORVOL")] == (pytest.approx(n["prior"]["volume_mm3"]), "mm3")
            assert g[("SCT", "81827009")] == (pytest.approx(n["current"]["mean_diameter_mm"]), "mm")
            assert g[(SCHEME, "PRIORDIAM")] == (pytest.approx(n["prior"]["mean_diameter_mm"]), "mm")
        if n["lung_rads"]:
            assert g[category_key] == f"LR{n['lung_rads']['category']}" and g[rule_key] == n["lung_rads"]["rule"]
        else:
            assert category_key not in g  # a resolved nodule gets no category
    assert exam[category_key] == f"LR{comparison['lung_rads']['exam']['category']}"
    assert exam[rule_key] == comparison["lung_rads"]["exam"]["rule"]
    assert exam[(SCHEME, "INTERVAL")] == (INTERVAL, "d") and "not a diagnosis" in exam[(SCHEME, "NOTICE")]


def test_comparison_sr_from_reference_masks(dicom_pair, tmp_path: Path) -> None:
    prior = _reference_dicom_result(tmp_path / "p", dicom_pair["prior"], dicom_pair["prior_labels"], seg=False)
    current = _reference_dicom_result(tmp_path / "c", dicom_pair["current"], dicom_pair["current_labels"], seg=True)
    result = compare_scans(prior, current, tmp_path / "out")
    c = result.comparison
    assert c["interval_days"] == INTERVAL and c["interval_source"] == "StudyDate"  # no --interval-days
    assert c["patient_identity"] == "same PatientID"
    assert sorted(n["status"] for n in c["nodules"]) == ["new", "persistent", "persistent", "resolved"]
    assert result.sr_path == tmp_path / "out" / "comparison_sr.dcm"
    assert any(n["volume_doubling_time_days"] for n in c["nodules"] if n["status"] == "persistent")
    _check_sr_against_comparison(result.sr_path, c, dicom_pair["current"], current / "seg.dcm")
    # The persistent and new nodules reference their segment of the current exam's SEG (TID 1411).
    sr = pydicom.dcmread(result.sr_path)
    seg_uid = str(pydicom.dcmread(current / "seg.dcm", stop_before_pixels=True).SOPInstanceUID)
    segmented = [g for g in _groups(sr) if any(i.ValueType == "IMAGE" and i.ReferencedSOPSequence[0]
                                               .ReferencedSOPInstanceUID == seg_uid for i in g.ContentSequence)]
    assert len(segmented) == 3
    # highdicom reads it back as a TID 1500 report: 3 volumetric groups (TID 1411), the resolved nodule and the
    # exam as TID 1501 groups; the grown nodule's doubling time in days.
    report = hd.sr.srread(result.sr_path).content
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == 3 and len(report.get_image_measurement_groups()) == 2
    vdts = [m.value for g in volumetric for m in g.get_measurements(name=DOUBLING_TIME)]
    expected = [n["volume_doubling_time_days"] for n in c["nodules"] if n.get("volume_doubling_time_days")]
    assert vdts == pytest.approx(expected) and len(vdts) >= 1


def test_compare_dicom_pair_with_the_shipped_model(dicom_pair, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, "-m", "nodulenet", "compare", str(dicom_pair["prior"]),
                          str(dicom_pair["current"]), "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "comparison_sr.dcm" in res.stdout
    c = json.loads((out / "comparison.json").read_text())
    assert c["interval_source"] == "StudyDate" and c["interval_days"] == INTERVAL
    assert sorted(n["status"] for n in c["nodules"]) == ["new", "persistent", "persistent", "resolved"]
    _check_sr_against_comparison(out / "comparison_sr.dcm", c, dicom_pair["current"],
                                 Path(c["current"]["result_dir"]) / "seg.dcm")
