"""End to end: ``prepare_lidc`` on the real LIDC-IDRI folder (linked into a temp tree), with two broken cases.

Reference values come from outside this code: the nodule of LIDC-IDRI-0001 in the official LUNA16
``annotations.csv`` (world centre, diameter), and the scan's own DICOM geometry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nodulenet.errors import InputError
from nodulenet.io.image_files import read_image
from nodulenet.io.luna_csv import read_luna_annotations
from nodulenet.io.volume import Geometry
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.prepare import CASE_FILES
from nodulenet.preprocess.prepare_dataset import find_lidc_cases, prepare_lidc
from nodulenet.preprocess.resample import CaseTransform

UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def _link_series(src: Path, dst: Path, xml_from: Path | None = None, truncate: str | None = None) -> None:
    """A series folder of symlinks to ``src``'s DICOM files (one replaced by a truncated copy) and an XML."""
    dst.mkdir(parents=True)
    for f in src.glob("*.dcm"):
        if f.name == truncate:
            (dst / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        else:
            os.symlink(f, dst / f.name)
    for xml in (xml_from or src).glob("*.xml"):
        os.symlink(xml, dst / xml.name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, lidc_0001_series: Path, lidc_0002_series: Path) -> dict:
    root = tmp_path_factory.mktemp("lidc")
    src = root / "LIDC-IDRI"
    src.mkdir()
    os.symlink(lidc_0001_series.parents[1], src / "LIDC-IDRI-0001")  # the whole patient folder
    # 9998: 0001's slices with 0002's XML (annotates another series); 9999: one slice truncated.
    _link_series(lidc_0001_series, src / "LIDC-IDRI-9998" / "study" / "series", xml_from=lidc_0002_series)
    _link_series(lidc_0001_series, src / "LIDC-IDRI-9999" / "study" / "series", truncate="000050.dcm")
    out = root / "prepared"
    summary = prepare_lidc(src, out, PrepareConfig(), workers=1, show_progress=False)
    return {"src": src, "out": out, "summary": summary}


def test_cases_found_in_tcia_layout(prepared: dict) -> None:
    cases, skipped = find_lidc_cases(prepared["src"])
    assert [c.case_id for c in cases] == ["LIDC-IDRI-0001", "LIDC-IDRI-9998", "LIDC-IDRI-9999"]
    assert cases[0].series_instance_uid == UID_0001
    assert skipped == []


def test_one_good_case_and_two_recorded_failures(prepared: dict) -> None:
    out: Path = prepared["out"]
    status = {c.case_id: c.status for c in prepared["summary"].cases}
    assert status == {"LIDC-IDRI-0001": "done", "LIDC-IDRI-9998": "failed", "LIDC-IDRI-9999": "failed"}
    errors = {e["case_id"]: e for e in json.loads((out / "errors.json").read_text())}
    assert set(errors) == {"LIDC-IDRI-9998", "LIDC-IDRI-9999"}
    assert errors["LIDC-IDRI-9999"]["file"].endswith("000050.dcm")
    assert "truncated" in errors["LIDC-IDRI-9999"]["message"]
    assert "no LIDC annotation XML" in errors["LIDC-IDRI-9998"]["message"]
    assert "071.xml annotates series" in errors["LIDC-IDRI-9998"]["message"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_done"], summary["n_failed"]) == (1, 2)
    log = (out / "prepare.log").read_text()
    assert "LIDC-IDRI-0001 done" in log and "LIDC-IDRI-9999 FAILED" in log
    case = out / "LIDC-IDRI-0001"
    assert all((case / name).is_file() for name in (*CASE_FILES, "overlay.png", "done.json"))
    assert not (out / "LIDC-IDRI-9999" / "done.json").exists()


def test_nodule_of_0001_matches_luna16(prepared: dict, luna_root: Path) -> None:
    case = prepared["out"] / "LIDC-IDRI-0001"
    nodules = json.loads((case / "nodules.json").read_text())
    assert nodules["series_instance_uid"] == UID_0001
    assert len(nodules["nodules"]) == 1 and nodules["excluded_nodules"] == []
    nodule = nodules["nodules"][0]
    luna = [a for a in read_luna_annotations(luna_root / "annotations.csv") if a.seriesuid == UID_0001]
    assert len(luna) == 1
    assert np.linalg.norm(np.subtract(nodule["center_world_xyz_mm"], luna[0].center_world_xyz_mm)) < 1.0
    assert nodule["diameter_mm"] == pytest.approx(luna[0].diameter_mm, abs=1.0)
    assert nodule["n_readers"] == 4
    # The box (z1 exclusive) holds the centre and roughly the diameter.
    z0, y0, x0, z1, y1, x1 = nodule["box_zyx"]
    c = nodule["center_zyx"]
    assert z0 <= c[0] < z1 and y0 <= c[1] < y1 and x0 <= c[2] < x1
    assert 15 <= max(z1 - z0, y1 - y0, x1 - x0) <= 45
    # The mask label of the nodule sits inside its box, and the lung labels cover it.
    mask = read_image(case / "nodule_mask.nrrd").array
    lungs = read_image(case / "lung_mask.nrrd").array
    assert np.count_nonzero(mask == 1) == nodule["mask_voxels"] > 0
    assert np.count_nonzero(mask[z0:z1, y0:y1, x0:x1] == 1) == nodule["mask_voxels"]
    assert np.mean(np.isin(lungs[mask == 1], (1, 2))) >= 0.95
    assert 3000 <= nodules["lung"]["lung_volume_ml"] <= 7000


def test_transform_maps_the_nodule_back_to_the_original_scan(prepared: dict, luna_root: Path) -> None:
    case = prepared["out"] / "LIDC-IDRI-0001"
    nodule = json.loads((case / "nodules.json").read_text())["nodules"][0]
    transform = CaseTransform.from_dict(json.loads((case / "transform.json").read_text()))
    assert transform.original.shape_zyx == (133, 512, 512)
    assert transform.original.spacing_zyx == pytest.approx((2.5, 0.703125, 0.703125))
    centre = np.asarray(nodule["center_zyx"])
    original_index = transform.preprocessed_to_original_index(centre)
    world_via_original = transform.original.voxel_to_world(original_index)
    np.testing.assert_allclose(world_via_original, nodule["center_world_xyz_mm"], atol=1e-6)
    # The NRRD header alone places the prepared grid in the world the same way.
    image = read_image(case / "image.nrrd")
    assert image.geometry == transform.preprocessed
    luna = [a for a in read_luna_annotations(luna_root / "annotations.csv") if a.seriesuid == UID_0001][0]
    assert np.linalg.norm(image.voxel_to_world(centre) - luna.center_world_xyz_mm) < 1.0
    # Back into the original voxel grid: the LUNA16 centre's original index, within 1 mm.
    luna_index = transform.original.world_to_voxel(luna.center_world_xyz_mm)
    assert np.linalg.norm((original_index - luna_index) * transform.original.spacing_zyx) < 1.0


def test_image_is_raw_uint8_memory_mappable_and_padded(prepared: dict) -> None:
    case = prepared["out"] / "LIDC-IDRI-0001"
    raw = (case / "image.nrrd").read_bytes()
    header_end = raw.index(b"\n\n") + 2
    header = raw[:header_end].decode()
    assert "encoding: raw" in header and "type: unsigned char" in header
    image = read_image(case / "image.nrrd")
    mapped = np.memmap(case / "image.nrrd", dtype=np.uint8, mode="r", offset=header_end, shape=image.shape_zyx)
    np.testing.assert_array_equal(mapped, image.array)
    assert "encoding: gzip" in (case / "lung_mask.nrrd").read_bytes()[:400].decode(errors="replace")
    lungs = read_image(case / "lung_mask.nrrd").array
    assert np.all(image.array[lungs == 0] == 170)
    nodule_mask = read_image(case / "nodule_mask.nrrd").array
    # A solid nodule (~0 HU -> ~170) is far brighter than aerated lung (~-850 HU -> ~50).
    assert image.array[nodule_mask == 1].mean() > 120 > image.array[(lungs == 1) & (nodule_mask == 0)].mean()
    assert Geometry.from_dict(json.loads((case / "transform.json").read_text())["preprocessed"]) == image.geometry
    config = json.loads((case / "config.json").read_text())
    assert config["prepare"] == PrepareConfig().to_dict() and config["nodulenet_version"]
    assert (case / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_the_finished_case(prepared: dict) -> None:
    case = prepared["out"] / "LIDC-IDRI-0001"
    before = (case / "image.nrrd").stat().st_mtime_ns
    again = prepare_lidc(prepared["src"], prepared["out"], PrepareConfig(), show_progress=False)
    status = {c.case_id: c.status for c in again.cases}
    assert status == {"LIDC-IDRI-0001": "skipped", "LIDC-IDRI-9998": "failed", "LIDC-IDRI-9999": "failed"}
    assert (case / "image.nrrd").stat().st_mtime_ns == before
    assert len(json.loads((prepared["out"] / "errors.json").read_text())) == 2


def test_bad_source_folders_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        prepare_lidc(tmp_path / "absent", tmp_path / "out", show_progress=False)
    (tmp_path / "empty" / "patient").mkdir(parents=True)
    (tmp_path / "empty" / "patient" / "notes.txt").write_text("no DICOM here")
    with pytest.raises(InputError, match="no CT series folder"):
        prepare_lidc(tmp_path / "empty", tmp_path / "out", show_progress=False)


@pytest.mark.slow
def test_both_patients_in_parallel_then_rerun(tmp_path: Path, lidc_root: Path, luna_root: Path) -> None:
    src = tmp_path / "LIDC-IDRI"
    src.mkdir()
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        os.symlink(lidc_root / patient, src / patient)
    out = tmp_path / "prepared"
    run = prepare_lidc(src, out, workers=2, show_progress=False)
    assert {c.case_id: c.status for c in run.cases} == {"LIDC-IDRI-0001": "done", "LIDC-IDRI-0002": "done"}, run.failed
    data = json.loads((out / "LIDC-IDRI-0002" / "nodules.json").read_text())
    # 0002's ~25 mm nodule has 2 of 4 readers: excluded at min_readers=3, like LUNA16's annotations_excluded.csv.
    assert data["nodules"] == []
    (excluded,) = data["excluded_nodules"]
    assert excluded["n_readers"] == 2 and excluded["box_source"] == "diameter"
    assert not read_image(out / "LIDC-IDRI-0002" / "nodule_mask.nrrd").array.any()
    assert 3000 <= data["lung"]["lung_volume_ml"] <= 7000
    again = prepare_lidc(src, out, workers=2, show_progress=False)
    assert {c.status for c in again.cases} == {"skipped"}
    # With min_readers=2 the same nodule becomes a training target (a different config: redone).
    two = prepare_lidc(src, tmp_path / "two", min_readers=2, show_progress=False)
    assert {c.status for c in two.cases} == {"done"}
    (nodule,) = json.loads((tmp_path / "two" / "LIDC-IDRI-0002" / "nodules.json").read_text())["nodules"]
    assert nodule["n_readers"] == 2 and nodule["mask_voxels"] > 0
