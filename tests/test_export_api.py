"""export_all: the file set, skip reasons for non-DICOM input, and the all-or-nothing rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nodulenet.export.api as api
from nodulenet.export.api import export_all
from nodulenet.export.measurements import finding_from_mask
from nodulenet.io.findings import NoduleMask, ScanFindings, ScanSource, read_findings_json
from nodulenet.io.image_files import read_image
from nodulenet.io.volume import Geometry, Volume


@pytest.fixture()
def nifti_case() -> tuple[ScanFindings, Volume]:
    geometry = Geometry((20, 40, 40), (2.0, 0.8, 0.8), (-16.0, -16.0, -20.0))
    hu = np.full(geometry.shape_zyx, -800, np.int16)
    hu[8:11, 18:23, 20:26] = 30
    volume = Volume.from_geometry(hu, geometry, {"source_path": "/scans/p042.nii.gz", "format": "nifti"})
    mask = NoduleMask(np.ones((3, 5, 6), bool), (8, 18, 20))
    findings = ScanFindings(ScanSource.from_volume_meta(volume.meta), geometry,
                            [finding_from_mask(1, 0.8, mask, volume)], threshold=0.5, timings={"infer_s": 3.0})
    return findings, volume


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_nifti_input_writes_the_common_files_and_skips_dicom(tmp_path: Path,
                                                              nifti_case: tuple[ScanFindings, Volume]) -> None:
    findings, volume = nifti_case
    result = export_all(findings, volume, tmp_path / "out")
    assert set(result.files) == {"nodules_json", "candidates_csv", "label_map", "report_html"}
    assert set(result.skipped) == {"dicom_seg", "dicom_sr"}
    assert "input was not DICOM" in result.skipped["dicom_seg"] and "nifti" in result.skipped["dicom_sr"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "candidates.csv", "labels.nii.gz", "nodules.json", "report.html"]
    back = read_findings_json(result.files["nodules_json"])
    assert back.to_dict()["findings"] == findings.to_dict()["findings"]
    assert back.timings["infer_s"] == 3.0 and back.timings["export_label_map_s"] > 0
    assert (read_image(result.files["label_map"]).array == 1).sum() == 90
    assert result.files["candidates_csv"].read_text().splitlines()[1].startswith("p042,")
    assert result.to_dict()["skipped"] == result.skipped


def test_dicom_can_be_turned_off(tmp_path: Path, nifti_case: tuple[ScanFindings, Volume]) -> None:
    result = export_all(*nifti_case, tmp_path, dicom=False, label_format="nrrd")
    assert result.skipped["dicom_seg"] == "not requested" and result.files["label_map"].name == "labels.nrrd"


def test_a_failure_leaves_the_folder_as_it_was(tmp_path: Path, nifti_case: tuple[ScanFindings, Volume],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    findings, volume = nifti_case
    out = tmp_path / "out"
    export_all(findings, volume, out)
    before = _snapshot(out)

    def broken_report(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(api, "write_report", broken_report)
    newer = ScanFindings(findings.source, findings.geometry, [], threshold=0.9)
    with pytest.raises(OSError, match="disk full"):
        export_all(newer, volume, out)
    assert _snapshot(out) == before  # the earlier complete export is untouched, no staging folder left


def test_a_new_export_replaces_the_old_set(tmp_path: Path, nifti_case: tuple[ScanFindings, Volume]) -> None:
    findings, volume = nifti_case
    export_all(findings, volume, tmp_path, label_format="nrrd")
    (tmp_path / "seg.dcm").write_bytes(b"stale SEG of an earlier DICOM run")
    (tmp_path / "notes.txt").write_text("the user's own file")
    export_all(findings, volume, tmp_path, label_format="nii.gz")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["candidates.csv", "labels.nii.gz", "nodules.json", "notes.txt", "report.html"]


def test_bad_arguments(tmp_path: Path, nifti_case: tuple[ScanFindings, Volume]) -> None:
    findings, volume = nifti_case
    with pytest.raises(ValueError, match="label_format"):
        export_all(findings, volume, tmp_path, label_format="png")
    with pytest.raises(ValueError, match="not the findings' scan grid"):
        tiny = Volume.from_geometry(np.zeros((2, 2, 2), np.int16), Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0)))
        export_all(findings, tiny, tmp_path)
    assert not list(tmp_path.iterdir())
