"""nodules.json: the dataclasses, their validation and the JSON round trip (schema nodulenet.nodules/1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nodulenet.errors import InputError
from nodulenet.io.findings import (
    SCHEMA,
    ModelInfo,
    NoduleFinding,
    NoduleMask,
    ScanFindings,
    ScanSource,
    read_findings_json,
)
from nodulenet.io.volume import Geometry

GEOMETRY = Geometry((40, 64, 64), (2.5, 0.7, 0.7), (-160.0, -170.5, -300.25), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _finding(finding_id: int, score_value: float, **extra: object) -> NoduleFinding:
    values: dict = dict(
        id=finding_id, score=score_value, center_world_xyz_mm=(1.5, -2.25, -280.125), center_zyx=(8.05, 30.5, 31.0),
        box_zyx=(6, 27, 28, 11, 35, 34), diameter_mm=6.8, equivalent_diameter_mm=5.9, max_extent_mm=7.7,
        volume_mm3=107.5, voxel_count=88, mean_hu=-23.5, side="left",
        long_axis_zyx=((8.0, 27.5, 28.5), (8.0, 34.5, 33.5)),
    )
    values.update(extra)
    return NoduleFinding(**values)


def _scan(findings: list[NoduleFinding]) -> ScanFindings:
    return ScanFindings(
        source=ScanSource(path="/data/case.nii.gz", format="nifti", patient_id="P<1>", patient_name="Doe^J"),
        geometry=GEOMETRY,
        findings=findings,
        model=ModelInfo(version="1.0", weights_sha256="ab" * 32, config_sha256="cd" * 32),
        threshold=0.5,
        timings={"infer_s": 12.5},
    )


def test_json_round_trip_keeps_every_field(tmp_path: Path) -> None:
    mask = NoduleMask(np.ones((2, 3, 4), bool), (6, 27, 28))
    scan = _scan([_finding(2, 0.61), _finding(1, 0.93, mask=mask, side=None, mean_hu=None)])
    path = scan.write_json(tmp_path / "nodules.json")
    raw = json.loads(path.read_text())
    assert raw["schema"] == SCHEMA == "nodulenet.nodules/1"
    assert [f["id"] for f in raw["findings"]] == [1, 2]  # written in id order
    assert "mask" not in raw["findings"][0]  # the label map carries masks, not the JSON
    back = read_findings_json(path)
    assert back.to_dict() == scan.to_dict()
    assert back.by_id(1) == scan.by_id(1)  # dataclass equality ignores the mask
    assert back.by_id(1).mask is None and back.by_id(1).mean_hu is None
    assert back.geometry == GEOMETRY
    assert back.by_id(2).long_axis_zyx == ((8.0, 27.5, 28.5), (8.0, 34.5, 33.5))
    assert back.model.weights_sha256 == "ab" * 32 and back.timings == {"infer_s": 12.5}


def test_ids_must_be_one_to_k() -> None:
    with pytest.raises(ValueError, match="1..2"):
        _scan([_finding(1, 0.9), _finding(3, 0.8)])
    with pytest.raises(ValueError, match="1..2"):
        _scan([_finding(1, 0.9), _finding(1, 0.8)])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"score": 1.5}, "score"),
        ({"box_zyx": (6, 27, 28, 6, 35, 34)}, "box_zyx"),
        ({"center_zyx": (1.0, float("nan"), 2.0)}, "center_zyx"),
        ({"side": "middle"}, "side"),
        ({"volume_mm3": -1.0}, "volume_mm3"),
    ],
)
def test_bad_finding_values_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _finding(1, 0.9, **change)


def test_box_and_mask_must_lie_on_the_grid() -> None:
    with pytest.raises(ValueError, match="outside the scan grid"):
        _scan([_finding(1, 0.9, box_zyx=(6, 27, 28, 41, 35, 34))])
    with pytest.raises(ValueError, match="outside the scan grid"):
        _scan([_finding(1, 0.9, mask=NoduleMask(np.ones((2, 2, 2), bool), (39, 0, 0)))])


def test_mask_tight_crop() -> None:
    array = np.zeros((5, 6, 7), bool)
    array[1:3, 2, 3:6] = True
    tight = NoduleMask(array, (10, 20, 30)).tight()
    assert tight.offset_zyx == (11, 22, 33) and tight.array.shape == (2, 1, 3) and tight.array.all()
    assert tight.crop_box_zyx == (11, 22, 33, 13, 23, 36)


def test_source_from_volume_meta() -> None:
    meta = {"source_path": "/d/s", "format": "dicom", "series_instance_uid": "1.2.3",
            "patient_id": "LIDC-IDRI-0001", "study_instance_uid": "1.2", "frame_of_reference_uid": "1.2.9",
            "patient_name": "", "study_date": "20000101"}
    source = ScanSource.from_volume_meta(meta)
    assert (source.path, source.format, source.series_instance_uid, source.patient_id) == (
        "/d/s", "dicom", "1.2.3", "LIDC-IDRI-0001")
    assert ScanSource.from_volume_meta({"source_path": "/x.mhd", "format": "metaimage"}).series_instance_uid is None


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "file not found"),
        ("{not json", r"not valid JSON \(line 1"),
        (json.dumps({"schema": "other/2"}), "schema is 'other/2'"),
        (json.dumps({"schema": SCHEMA, "source": {"path": "x", "format": "nifti"}}), "lacks 'geometry'"),
        (json.dumps({"schema": SCHEMA, "source": {"path": "x", "format": "nifti"}, "geometry": GEOMETRY.to_dict(),
                     "findings": [{"id": 1, "score": 0.5}]}), "findings\\[0\\]: finding lacks 'center_world_xyz_mm'"),
        (json.dumps({"schema": SCHEMA, "source": {"path": "x", "format": "nifti"},
                     "geometry": {"shape_zyx": [1, 2]}, "findings": []}), "geometry"),
        (json.dumps([1, 2]), "top level must be a JSON object"),
    ],
)
def test_bad_files_give_an_input_error_naming_the_file(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "nodules.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=problem) as info:
        read_findings_json(path)
    assert info.value.path == path


def test_slice_reference_names_the_nearest_dicom_slice_by_hand() -> None:
    from nodulenet.io.findings import slice_reference

    # 40 slices, 2.5 mm, first at z = -300.25; numbered from the head as many scanners do (InstanceNumber 40..1).
    meta = {"instance_numbers": list(range(40, 0, -1)), "slice_locations_mm": [-300.25 + 2.5 * k for k in range(40)]}
    ref = slice_reference(GEOMETRY, meta, (0.0, 0.0, -280.125))  # (z + 300.25) / 2.5 = 8.05 -> slice 8
    assert (ref.index, ref.instance_number, ref.slice_location_mm, ref.position_z_mm) == (8, 32, -280.25, -280.25)
    assert ref.describe() == "image 32 (z -280.2 mm)"
    # Non-DICOM (no per-slice lists), and a point beyond the last slice: the last slice, counted from 1.
    far = slice_reference(GEOMETRY, {}, (0.0, 0.0, -100.0))
    assert (far.index, far.instance_number, far.slice_location_mm) == (39, None, None)
    assert far.describe(40) == "slice 40 of 40 (z -202.8 mm)"
    # Lists that do not match the grid are not trusted.
    assert slice_reference(GEOMETRY, {"instance_numbers": [1, 2]}, (0.0, 0.0, -280.0)).instance_number is None


def test_new_fields_round_trip_and_old_files_still_read(tmp_path: Path) -> None:
    from nodulenet.io.findings import SliceReference

    ref = SliceReference(index=8, position_z_mm=-280.25, instance_number=32, slice_location_mm=-280.25)
    scan = _scan([_finding(1, 0.9, centre_slice=ref, site="bone")])
    scan.below_threshold = [_finding(1, 0.3, side=None, site="lung")]
    back = read_findings_json(scan.write_json(tmp_path / "nodules.json"))
    assert back.findings[0].centre_slice == ref and back.findings[0].site == "bone"
    assert back.findings[0].location_text == "left, bone, outside the lungs"
    assert [f.score for f in back.below_threshold] == [0.3] and back.below_threshold[0].location_text == "lung"
    old = json.loads((tmp_path / "nodules.json").read_text())
    del old["below_threshold"]
    for f in old["findings"]:
        del f["centre_slice"], f["site"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = read_findings_json(tmp_path / "old.json")
    assert legacy.findings[0].centre_slice is None and legacy.below_threshold == []
    assert legacy.findings[0].location_text == "left lung"
    with pytest.raises(ValueError, match="site must be one of"):
        _finding(1, 0.5, site="liver")


def test_results_of_a_predict_output_folder_are_found(tmp_path: Path) -> None:
    from nodulenet.io.findings import find_results_json

    out = tmp_path / "out"
    one = out / "case-a"
    one.mkdir(parents=True)
    _scan([]).write_json(one / "nodules.json")
    (out / "summary.json").write_text("{}")
    assert find_results_json(out) == one / "nodules.json"  # the predict -o folder: its one scan
    assert find_results_json(one) == one / "nodules.json" and find_results_json(one / "nodules.json") == \
        one / "nodules.json"
    two = out / "case-b"
    two.mkdir()
    other = _scan([])
    other.source = ScanSource(path=str(tmp_path / "scan-b.nii.gz"), format="nifti")
    other.write_json(two / "nodules.json")
    with pytest.raises(InputError, match=r"holds the results of 2 scans \(case-a, case-b\)"):
        find_results_json(out)
    assert find_results_json(out, tmp_path / "scan-b.nii.gz") == two / "nodules.json"  # the one for SCAN
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no nodules.json in this folder or its sub-folders"):
        find_results_json(tmp_path / "empty")
