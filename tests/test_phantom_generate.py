"""The seeded chest-CT phantom: determinism, geometry, nodule records vs masks, tissue HU, vessel trees, files.

Golden values are independent of the generator: centroids, volumes, connected components and HU
statistics are recomputed here with numpy/scipy from the returned (or written) arrays, and world
coordinates with the DICOM formula ``origin + D @ (spacing * ijk)`` written out by hand.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nodulenet.preprocess.phantom import (
    NODULE_KINDS,
    PhantomConfig,
    make_phantom,
    phantom_series_uid,
    write_phantom,
)

# Small grid (about 1.2 M voxels, < 1 s) with anisotropic voxels and a slice thickness drawn per seed.
SMALL = PhantomConfig(
    shape_yx=(160, 160),
    spacing_yx_mm=(0.9, 0.9),
    extent_z_mm=150.0,
    slice_thickness_range_mm=(1.5, 2.5),
    n_nodules=5,
    diameter_range_mm=(4.0, 14.0),
)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def phantoms():
    return {seed: make_phantom(seed, SMALL) for seed in SEEDS}


def _world(origin, direction, spacing_zyx, index_zyx):
    """DICOM: world = origin + D @ (spacing_xyz * (i, j, k)), with (i, j, k) = (x, y, z) index."""
    ijk = np.asarray(index_zyx, dtype=float)[::-1] * np.asarray(spacing_zyx, dtype=float)[::-1]
    return np.asarray(origin, dtype=float) + np.asarray(direction, dtype=float).reshape(3, 3) @ ijk


def test_same_seed_same_bytes_different_seed_differs(phantoms):
    again = make_phantom(0, SMALL)
    first = phantoms[0]
    for name in ("image", "nodule_mask", "lung_mask", "vessel_mask"):
        a, b = getattr(first, name), getattr(again, name)
        assert a.array.dtype == b.array.dtype and a.array.tobytes() == b.array.tobytes(), name
        assert a.geometry == b.geometry
    assert first.nodules == again.nodules
    assert first.series_uid == again.series_uid
    other = phantoms[1]
    assert other.series_uid != first.series_uid
    assert other.image.shape_zyx != first.image.shape_zyx or not np.array_equal(other.image.array, first.image.array)


def test_types_geometry_and_slice_thickness(phantoms):
    thicknesses = set()
    for p in phantoms.values():
        assert p.image.array.dtype == np.int16
        assert p.nodule_mask.array.dtype == np.uint16 and p.lung_mask.array.dtype == np.uint8
        sz, sy, sx = p.image.spacing_zyx
        assert (sy, sx) == (0.9, 0.9) and 1.5 <= sz <= 2.5
        assert p.image.shape_zyx == (round(150.0 / sz), 160, 160)
        assert np.allclose(np.asarray(p.image.origin_xyz_mm), 0.0) is False
        assert p.image.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert p.nodule_mask.geometry == p.image.geometry == p.lung_mask.geometry
        thicknesses.add(sz)
    assert len(thicknesses) > 1  # the slice thickness really varies with the seed


def test_flipped_direction_is_same_patient(phantoms):
    flipped = make_phantom(0, replace(SMALL, flip_xyz=(True, False, True)))
    plain = phantoms[0]
    assert flipped.image.direction == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    # Same voxels, stored with x and z reversed.
    assert np.array_equal(flipped.image.array, plain.image.array[::-1, :, ::-1])
    # Same patient: every nodule at the same world position (to float rounding).
    for a, b in zip(plain.nodules, flipped.nodules):
        assert np.allclose(a.center_world_xyz_mm, b.center_world_xyz_mm, atol=1e-6)
    # The first stored voxel of the flipped image is the last one of the plain image, in world mm.
    nz, ny, nx = plain.image.shape_zyx
    far_corner = _world(plain.image.origin_xyz_mm, plain.image.direction, plain.image.spacing_zyx, (nz - 1, 0, nx - 1))
    assert np.allclose(flipped.image.origin_xyz_mm, far_corner)


def test_csv_centres_are_mask_centroids_in_world_mm(tmp_path):
    config = replace(SMALL, flip_xyz=(False, True, True))
    paths = write_phantom(tmp_path, 3, config, fmt="nrrd")
    mask_img = sitk.ReadImage(str(paths["nodule_mask"]))
    mask = sitk.GetArrayFromImage(mask_img)
    spacing_zyx = mask_img.GetSpacing()[::-1]
    with open(paths["annotations"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r.keys() for r in rows][0] == {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}
    labels = [int(v) for v in np.unique(mask) if v]
    assert len(rows) == len(labels) == SMALL.n_nodules
    csv_world = np.array([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for r in rows])
    for label in labels:
        centroid = np.argwhere(mask == label).mean(axis=0)
        world = _world(mask_img.GetOrigin(), mask_img.GetDirection(), spacing_zyx, centroid)
        nearest = csv_world[np.argmin(np.linalg.norm(csv_world - world, axis=1))]
        # Within one voxel along every axis (the voxel is 0.9 x 0.9 x 1.5..2.5 mm).
        assert np.all(np.abs(nearest - world) <= np.asarray(spacing_zyx)[::-1]), (label, nearest, world)
    record = json.loads(paths["nodules"].read_text())
    assert record["seed"] == 3 and record["series_uid"] == rows[0]["seriesuid"]
    assert record["config"]["flip_xyz"] == [False, True, True]
    assert np.allclose(record["geometry"]["origin_xyz_mm"], mask_img.GetOrigin())


def test_diameter_is_equivalent_sphere_of_the_mask(phantoms):
    # The mask keeps the most occupied voxels up to the nodule's partial-volume volume, so its
    # equivalent-sphere diameter matches the reported one to within half a voxel of volume: we allow
    # 4 % or 0.3 mm (a 4 mm nodule on 0.9 x 0.9 x 2.5 mm voxels is only ~16 voxels).
    for p in phantoms.values():
        voxel = float(np.prod(p.image.spacing_zyx))
        for n in p.nodules:
            count = int((p.nodule_mask.array == n.id).sum())
            d_mask = 2.0 * (3.0 * count * voxel / (4.0 * np.pi)) ** (1.0 / 3.0)
            assert abs(d_mask - n.diameter_mm) <= max(0.04 * n.diameter_mm, 0.3), (n, d_mask)
            assert abs(n.volume_mm3 - 4.0 / 3.0 * np.pi * (n.diameter_mm / 2) ** 3) < 1e-6 * n.volume_mm3
            z0, y0, x0, z1, y1, x1 = n.box_zyx
            where = np.argwhere(p.nodule_mask.array == n.id)
            assert (z0, y0, x0) == tuple(where.min(axis=0)) and (z1, y1, x1) == tuple(where.max(axis=0) + 1)
            assert 3.0 <= n.diameter_mm <= 14.5


def test_nodules_in_lungs_all_kinds_and_touching_where_they_should(phantoms):
    kinds_seen = set()
    cross = ndimage.generate_binary_structure(3, 1)
    for p in phantoms.values():
        mask, lung, vessels = p.nodule_mask.array, p.lung_mask.array.astype(bool), p.vessel_mask.array.astype(bool)
        assert [n.id for n in p.nodules] == sorted(int(v) for v in np.unique(mask) if v)
        assert not (mask.astype(bool) & ~lung).any()
        for n in p.nodules:
            kinds_seen.add(n.kind)
            ring = ndimage.binary_dilation(mask == n.id, cross) & (mask != n.id)
            if n.kind == "juxta_pleural":
                assert (ring & ~lung).any(), n  # on the lung's edge
            if n.kind == "juxta_vascular":
                assert (ring & vessels).any() or (vessels & (mask == n.id)).any(), n
        # 5 nodules and 5 kinds, used in turn: every kind once.
        assert sorted(n.kind for n in p.nodules) == sorted(NODULE_KINDS)
    assert kinds_seen == set(NODULE_KINDS)


def test_tissue_hu(phantoms):
    for p in phantoms.values():
        a = p.image.array.astype(np.float64)
        mask, lung, vessels = p.nodule_mask.array, p.lung_mask.array.astype(bool), p.vessel_mask.array.astype(bool)
        spacing = p.image.spacing_zyx
        parenchyma = lung & ~vessels & (mask == 0)
        assert -900 <= np.median(a[parenchyma]) <= -750
        assert np.median(a[vessels]) > -300
        # Air in front of the body (top rows, inside the round field of view) and the padding outside it.
        assert abs(np.median(a[:, 4:10, 70:90]) + 1000) < 25
        assert a[0, 0, 0] == SMALL.fov_padding_hu
        assert a.max() > 400  # bone (spine, ribs)
        for n in p.nodules:
            voxels = mask == n.id
            # The core: at least one slice thickness inside the mask, so thick-slice partial volume at
            # the nodule's top and bottom does not count.
            core = a[ndimage.distance_transform_edt(voxels, sampling=spacing) >= max(1.5, spacing[0])]
            if core.size < 5:
                continue
            if n.kind in ("solid", "juxta_pleural", "juxta_vascular"):
                assert 0 <= np.median(core) <= 80, n
            elif n.kind == "ground_glass":
                assert -700 <= np.median(core) <= -450, n
            else:  # part solid: a ground-glass rim and a solid core
                assert np.percentile(a[voxels], 10) <= -450 and np.percentile(a[voxels], 97) >= -150, n
            assert abs(n.mean_hu - a[voxels].mean()) < 1e-6


def test_vessels_form_a_few_connected_trees(phantoms):
    # Two trees per lung (arteries from the hilum, veins to the left atrium): the four largest
    # 26-connected components hold almost all vessel voxels; scattered bits are partial-volume tips.
    for p in phantoms.values():
        vessels = p.vessel_mask.array.astype(bool)
        labels, n = ndimage.label(vessels, np.ones((3, 3, 3)))
        sizes = np.sort(np.bincount(labels.reshape(-1))[1:])[::-1]
        assert sizes[:4].sum() >= 0.8 * sizes.sum(), sizes[:8]
        assert sizes[0] >= 0.2 * sizes.sum()
        # Both lungs are supplied: vessel voxels on both sides of the midline.
        nx = vessels.shape[2]
        assert vessels[:, :, : nx // 2].sum() > 0.2 * vessels.sum() and vessels[:, :, nx // 2 :].sum() > 0.2 * vessels.sum()


@pytest.mark.parametrize("fmt", ["nii.gz", "mhd", "nrrd"])
def test_write_phantom_files_round_trip(tmp_path, fmt):
    config = replace(SMALL, n_nodules=2, extent_z_mm=80.0)
    paths = write_phantom(tmp_path / fmt, 5, config, fmt=fmt)
    assert sorted(paths) == ["annotations", "lung_mask", "nodule_mask", "nodules", "scan"]
    expected = make_phantom(5, config)
    for name, volume in (("scan", expected.image), ("nodule_mask", expected.nodule_mask), ("lung_mask", expected.lung_mask)):
        assert paths[name].name == f"{name}.{fmt}"
        img = sitk.ReadImage(str(paths[name]))
        assert np.array_equal(sitk.GetArrayFromImage(img), volume.array), name
        assert np.allclose(img.GetSpacing(), volume.spacing_zyx[::-1], atol=1e-5)
        assert np.allclose(img.GetOrigin(), volume.origin_xyz_mm, atol=1e-3)
        assert np.allclose(img.GetDirection(), volume.direction)
    record = json.loads(paths["nodules"].read_text())
    assert record["generator_version"] and len(record["nodules"]) == 2
    assert record["nodules"][0]["center_world_xyz_mm"] == list(expected.nodules[0].center_world_xyz_mm)
    lines = paths["annotations"].read_text().splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm" and len(lines) == 3


def test_series_uid_is_a_valid_deterministic_dicom_uid():
    uid = phantom_series_uid(42, SMALL)
    assert uid == phantom_series_uid(42, SMALL)
    assert uid != phantom_series_uid(43, SMALL)
    assert len(uid) <= 64 and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid)


def test_bad_config_and_seed_are_refused():
    with pytest.raises(ValueError, match="nodule_kinds"):
        PhantomConfig(nodule_kinds=("solid", "calcified"))
    with pytest.raises(ValueError, match="slice_thickness_range_mm"):
        PhantomConfig(slice_thickness_range_mm=(2.5, 1.0))
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1, SMALL)
    with pytest.raises(ValueError, match="nodule"):
        # 20 nodules of 30 mm cannot fit in a 150 mm chest.
        make_phantom(0, replace(SMALL, n_nodules=20, diameter_range_mm=(30.0, 30.0)))


def test_varied_ground_glass_nodules_are_faint_large_and_irregular() -> None:
    """Style "varied": pure ground-glass nodules with the variety of real ones (LIDC-IDRI-0002's is ~25 mm and
    faint); the "classic" default draws them as before."""
    from dataclasses import replace

    from nodulenet.data.synthetic import SMALL_PHANTOM
    from nodulenet.preprocess.phantom import make_phantom

    config = replace(SMALL_PHANTOM, n_nodules=3, nodule_kinds=("ground_glass",), diameter_range_mm=(3.0, 30.0))
    varied, classic = [], []
    for seed in (11, 12):
        varied += make_phantom(seed, replace(config, ground_glass_style="varied")).nodules
        classic += make_phantom(seed, config).nodules
    assert {n.kind for n in varied} == {"ground_glass"} and {n.margin for n in varied} == {"irregular"}
    # Nominal 10-30 mm; the recorded diameter is the partial-volume equivalent sphere inside the lung (a little less).
    assert all(8.0 <= n.diameter_mm <= 30.0 for n in varied)
    assert min(n.diameter_mm for n in classic) < 8.0  # classic ones start at 5 mm
    assert all(n.mean_hu < -450 for n in varied)
    assert min(n.mean_hu for n in varied) < min(n.mean_hu for n in classic)  # fainter than any classic one here
    assert {n.margin for n in classic} <= {"smooth", "lobulated"}


def test_the_held_out_benchmark_phantoms_are_unchanged_by_the_default_style() -> None:
    """benchmarks/demo_model_quality.py's seeds must give the same scans as when the shipped model was measured
    (sha256 of image + labels, recorded before ground-glass styles existed)."""
    import hashlib
    from dataclasses import replace

    from nodulenet.data.synthetic import SMALL_PHANTOM
    from nodulenet.heldout import HELDOUT_NODULES_PER_PHANTOM
    from nodulenet.preprocess.phantom import make_phantom

    phantom = make_phantom(2000, replace(SMALL_PHANTOM, n_nodules=HELDOUT_NODULES_PER_PHANTOM))
    digest = hashlib.sha256(phantom.image.array.tobytes() + phantom.nodule_mask.array.tobytes()).hexdigest()
    assert digest[:16] == "04e59f189d3e589b"
