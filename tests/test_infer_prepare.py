"""The network input made at prediction time is exactly the training input, and bad scans get one clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nodulenet.errors import InputError
from nodulenet.infer.prepare_input import prepare_input
from nodulenet.io.image_files import read_image
from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.phantom import PhantomConfig, make_phantom
from nodulenet.preprocess.prepare import prepare_case

SMALL = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                      slice_thickness_range_mm=(2.0, 2.0), n_nodules=1, diameter_range_mm=(8.0, 12.0),
                      flip_xyz=(False, True, False))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(5, SMALL)


def test_in_memory_input_is_byte_identical_to_the_prepared_training_case(phantom, tmp_path):
    # A non-default config too: predict must use the one the model was trained with, not the defaults.
    config = PrepareConfig(overlay=False, hu_min=-1100.0, crop_margin_voxels=3)
    summary = prepare_case(phantom.image, tmp_path / "case", config)
    assert summary.status == "done"
    written = read_image(tmp_path / "case" / "image.nrrd")
    prepared = prepare_input(phantom.image, config)
    assert prepared.image.dtype == np.uint8
    assert prepared.image.shape == written.shape_zyx
    assert np.array_equal(prepared.image, written.array)
    assert prepared.transform.to_dict() == json.loads((tmp_path / "case" / "transform.json").read_text())
    assert prepared.transform.preprocessed.origin_xyz_mm == pytest.approx(written.origin_xyz_mm, abs=1e-6)


def _volume(array: np.ndarray, spacing=(2.5, 0.8, 0.8), **meta) -> Volume:
    return Volume(array, spacing, (0.0, 0.0, 0.0), meta={"source_path": "/data/scan-under-test", **meta})


def test_non_ct_series_is_refused_by_modality(phantom):
    mr = phantom.image.with_array(phantom.image.array, modality="MR", source_path="/data/mr-series")
    with pytest.raises(InputError, match=r"mr-series: is a MR series, not CT"):
        prepare_input(mr)


def test_localizer_is_refused(phantom):
    scout = phantom.image.with_array(phantom.image.array, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(InputError, match="localizer"):
        prepare_input(scout)


def test_values_that_are_not_hounsfield_units_are_refused(phantom):
    # An MR-like intensity volume in a NIfTI file carries no modality: its values give it away (no air).
    # MR intensities are never negative (not even outside the field of view).
    intensities = np.clip(phantom.image.array.astype(np.int32) + 1024, 0, None).astype(np.int16)
    with pytest.raises(InputError, match="Hounsfield"):
        prepare_input(phantom.image.with_array(intensities))


def test_scan_too_thin_or_too_small_to_hold_lungs():
    thin = _volume(np.full((4, 400, 400), -1000, dtype=np.int16))
    with pytest.raises(InputError, match=r"scan-under-test: too thin to hold the lungs: 4 slice\(s\) covering 8 mm"):
        prepare_input(thin)
    small = _volume(np.full((60, 80, 80), -1000, dtype=np.int16))  # 63 mm in plane
    with pytest.raises(InputError, match="too small to hold the lungs"):
        prepare_input(small)


def test_a_scan_without_lungs_is_refused():
    # A water cylinder in air: plenty of HU, no air inside the body.
    zz, yy, xx = np.mgrid[0:60, 0:200, 0:200]
    body = (yy - 100) ** 2 + (xx - 100) ** 2 < 80 ** 2
    water = np.where(body, 0, -1000).astype(np.int16)
    with pytest.raises(InputError, match="scan-under-test: no lungs found"):
        prepare_input(_volume(water))


def test_training_preparation_of_a_sagittal_file_is_the_axial_case(phantom, tmp_path):
    """prepare_case puts the scan AND its nodule mask into canonical orientation first: a model is never trained on
    another orientation, and the case it writes is the axial file's case, voxel for voxel."""
    config = PrepareConfig(overlay=False)
    from _stored_as import stored_as

    stored, stored_mask = stored_as(phantom.image, "PIL"), stored_as(phantom.nodule_mask, "PIL")
    assert stored.shape_zyx == (160, 50, 160)  # array axes: the patient's x, z, y
    prepare_case(phantom.image, tmp_path / "axial", config, nodule_mask=phantom.nodule_mask)
    prepare_case(stored, tmp_path / "sagittal", config, nodule_mask=stored_mask)
    for name in ("image.nrrd", "lung_mask.nrrd", "nodule_mask.nrrd"):
        a, s = read_image(tmp_path / "axial" / name), read_image(tmp_path / "sagittal" / name)
        assert np.array_equal(a.array, s.array), name
        assert a.geometry.direction == pytest.approx(s.geometry.direction, abs=1e-12)
        np.testing.assert_allclose(a.origin_xyz_mm, s.origin_xyz_mm, atol=1e-9)
    assert read_image(tmp_path / "sagittal" / "nodule_mask.nrrd").array.any()
    axial = json.loads((tmp_path / "axial" / "transform.json").read_text())
    sagittal = json.loads((tmp_path / "sagittal" / "transform.json").read_text())
    assert sagittal["original"]["shape_zyx"] == [160, 50, 160]
    assert sagittal["orientation"]["method"] == "reindexed" and sagittal["orientation"]["input_code"] == "PIL"
    # This phantom is stored with y reversed (flip_xyz): it is re-indexed too, to the same canonical grid.
    assert axial["orientation"]["input_code"] == "LAS"
    assert axial["preprocessed"] == sagittal["preprocessed"]
