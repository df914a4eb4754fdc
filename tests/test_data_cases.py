"""Prepared cases as training material: memory-mapped image, nodule masks, lung points, broken folders skipped.

Golden reference: SimpleITK (``read_image``) reads the same files independently of the memory-map reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nodulenet.data import cases as cases_module
from nodulenet.data.cases import find_case_dirs, load_case, load_cases, patient_id_for
from nodulenet.data.nrrd_mmap import read_nrrd_array, read_raw_nrrd_layout
from nodulenet.errors import InputError
from nodulenet.io.image_files import read_image



def copy_case(root: Path, tmp_path: Path, name: str = "phantom-00001") -> Path:
    dst = tmp_path / "cases" / name
    shutil.copytree(root / name, dst)
    return dst


def test_memory_map_and_masks_agree_with_simpleitk(phantom_root: Path) -> None:
    case_dir = phantom_root / "phantom-00001"
    case = load_case(case_dir)
    sitk_image = read_image(case_dir / "image.nrrd").array
    assert case.image.dtype == np.uint8 and isinstance(case.image, np.memmap)
    np.testing.assert_array_equal(np.asarray(case.image), sitk_image)
    labels = read_image(case_dir / "nodule_mask.nrrd").array
    record = json.loads((case_dir / "nodules.json").read_text())
    assert [n.id for n in case.nodules] == [n["id"] for n in record["nodules"]]
    rebuilt = np.zeros_like(labels)
    for n, entry in zip(case.nodules, record["nodules"]):
        z, y, x = n.mask_origin_zyx
        d, h, w = n.mask.shape
        rebuilt[z:z + d, y:y + h, x:x + w][n.mask] = n.id
        assert list(n.box_zyx) == entry["box_zyx"]  # prepare_case's box from the mask, end exclusive
        np.testing.assert_allclose(n.center_world_xyz_mm, entry["center_world_xyz_mm"])
    np.testing.assert_array_equal(rebuilt, labels)
    lung = read_image(case_dir / "lung_mask.nrrd").array
    pts = case.lung_points_zyx.astype(int)
    assert len(pts) > 1000 and np.all(np.isin(lung[pts[:, 0], pts[:, 1], pts[:, 2]], (1, 2)))
    assert case.patient_id == "phantom-1"
    # The geometry places voxels in the world like the NRRD header does.
    header = read_image(case_dir / "image.nrrd")
    np.testing.assert_allclose(case.geometry.voxel_to_world([3, 5, 7]), header.voxel_to_world([3, 5, 7]))


def test_pickled_case_reopens_its_memory_map(phantom_root: Path) -> None:
    import pickle

    case = load_case(phantom_root / "phantom-00003")
    _ = case.image
    clone = pickle.loads(pickle.dumps(case))
    assert clone._image is None
    np.testing.assert_array_equal(clone.image[10:20, 5:9, 3:30], case.image[10:20, 5:9, 3:30])


def test_index_cache_is_used_and_equal(phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_case(phantom_root / "phantom-00001", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cases_module, "_derived_arrays", boom)
    second = load_case(phantom_root / "phantom-00001", cache_dir=tmp_path)
    np.testing.assert_array_equal(first.lung_points_zyx, second.lung_points_zyx)
    for a, b in zip(first.nodules, second.nodules):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.mask_origin_zyx == b.mask_origin_zyx


@pytest.mark.parametrize("damage, bad_file, words", [
    ("delete nodule_mask", "nodule_mask.nrrd", "missing"),
    ("truncate image", "image.nrrd", "changed since the case was prepared"),
    ("garbage nodules.json", "nodules.json", "changed since"),
    ("delete done.json", "done.json", "never finished"),
    ("truncate image, no sizes", "image.nrrd", "truncated"),
    ("garbage lung mask, no sizes", "lung_mask.nrrd", "header does not end"),
    ("truncate lung mask, no sizes", "lung_mask.nrrd", "gzip stream ends early"),
    ("corrupt nodule mask, no sizes", "nodule_mask.nrrd", "corrupt gzip data"),
    ("bad json, no sizes", "nodules.json", "not valid JSON"),
])
def test_broken_case_is_reported_by_file_and_skipped(phantom_root: Path, tmp_path: Path, damage: str,
                                                     bad_file: str, words: str) -> None:
    bad = copy_case(phantom_root, tmp_path, "phantom-00001")
    good = copy_case(phantom_root, tmp_path, "phantom-00003")
    if "no sizes" in damage:  # without recorded sizes, the file's own checks must catch it
        done = json.loads((bad / "done.json").read_text())
        done.pop("files")
        (bad / "done.json").write_text(json.dumps(done))
    if damage.startswith("delete"):
        (bad / bad_file).unlink()
    elif damage.startswith("truncate"):
        data = (bad / bad_file).read_bytes()
        (bad / bad_file).write_bytes(data[: len(data) - 1000])
    elif damage.startswith("corrupt"):
        data = bytearray((bad / bad_file).read_bytes())
        start = data.index(b"\n\n") + 2 + 10  # past the header and the 10-byte gzip member header
        data[start:start + 64] = bytes(64)  # zeroed deflate blocks: not a valid stream
        (bad / bad_file).write_bytes(bytes(data))
    else:
        (bad / bad_file).write_bytes(b"NRRD0004\ngarbage" if bad_file.endswith(".nrrd") else b"{not json")
    report = load_cases(find_case_dirs([tmp_path / "cases"]))
    assert [c.case_id for c in report.cases] == [good.name]
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.case_id == bad.name and Path(problem.file).name == bad_file
    assert words in problem.problem, problem


def test_raw_nrrd_reader_refuses_compressed_files(phantom_root: Path) -> None:
    with pytest.raises(InputError, match="encoding is 'gzip'"):
        read_raw_nrrd_layout(phantom_root / "phantom-00001" / "lung_mask.nrrd")


@pytest.mark.parametrize("name", ["lung_mask.nrrd", "nodule_mask.nrrd", "image.nrrd"])
def test_nrrd_reader_matches_simpleitk(phantom_root: Path, name: str) -> None:
    """The training path's own reader (zlib, no ITK) gives SimpleITK's array, dtype and shape, gzip or raw."""
    path = phantom_root / "phantom-00001" / name
    ours = read_nrrd_array(path)
    reference = read_image(path).array
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    assert ours.flags.writeable  # a copy, not a view of a read-only buffer


def test_training_path_imports_no_simpleitk() -> None:
    """Training runs on a stock PyTorch GPU image without SimpleITK or pydicom (prepared cases need neither)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('SimpleITK', 'pydicom', 'highdicom', 'matplotlib'): sys.modules[m] = None\n"
            "import nodulenet.train.loop, nodulenet.train.validate, nodulenet.data.dataset, nodulenet.cli\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_patient_ids() -> None:
    assert patient_id_for("LIDC-IDRI-0001") == "LIDC-IDRI-0001"
    assert patient_id_for("LIDC-IDRI-0001_1a2b3c4d") == "LIDC-IDRI-0001"
    assert patient_id_for("LIDC-IDRI-0002_synthetic3") == "LIDC-IDRI-0002"
    assert patient_id_for("1.3.6.1.4.1.14519.5.2.1.6279") == "1.3.6.1.4.1.14519.5.2.1.6279"
    assert patient_id_for("anything", {"patient_id": "P7"}) == "P7"


def test_find_case_dirs_accepts_a_case_folder_or_a_root(phantom_root: Path) -> None:
    assert find_case_dirs([phantom_root]) == [phantom_root / "phantom-00001", phantom_root / "phantom-00003"]
    assert find_case_dirs([phantom_root / "phantom-00003"]) == [phantom_root / "phantom-00003"]
    with pytest.raises(InputError):
        find_case_dirs([phantom_root / "nope"])
