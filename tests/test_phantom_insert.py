"""Inserting synthetic nodules into an existing scan: a flipped phantom (fast) and the real LIDC-IDRI-0002.

Checks are recomputed here from the arrays: mask centroids mapped to world mm with the DICOM formula,
HU before/after, distances with a k-d tree.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from nodulenet.errors import InputError
from nodulenet.io.volume import Volume
from nodulenet.preprocess.phantom import NODULE_KINDS, PhantomConfig, insert_nodules, make_phantom

# Same small grid as test_phantom_generate.py (kept here so each test file stands alone).
SMALL = PhantomConfig(
    shape_yx=(160, 160), spacing_yx_mm=(0.9, 0.9), extent_z_mm=150.0, slice_thickness_range_mm=(1.5, 2.5),
    n_nodules=5, diameter_range_mm=(4.0, 14.0),
)


def _world(origin, direction, spacing_zyx, index_zyx):
    """DICOM: world = origin + D @ (spacing_xyz * (i, j, k)), with (i, j, k) = (x, y, z) index."""
    ijk = np.asarray(index_zyx, dtype=float)[::-1] * np.asarray(spacing_zyx, dtype=float)[::-1]
    return np.asarray(origin, dtype=float) + np.asarray(direction, dtype=float).reshape(3, 3) @ ijk


def _check_insertion(before: Volume, after: Volume, mask: Volume, nodules, lung: np.ndarray, exclusion=None) -> None:
    old, new, labels = before.array, after.array, mask.array
    assert new.dtype == old.dtype and after.geometry == before.geometry == mask.geometry
    boxes = ndimage.find_objects(labels)  # one box per label, in label order (None for absent labels)
    assert [n.id for n in nodules] == [i + 1 for i, b in enumerate(boxes) if b is not None]
    spacing = np.asarray(before.spacing_zyx)
    centres_mm = []
    for n in nodules:
        box = boxes[n.id - 1]
        voxels = labels[box] == n.id
        assert not (voxels & ~lung[box]).any()  # inside the given lung mask
        centroid = np.argwhere(voxels).mean(axis=0) + [s.start for s in box]
        world = _world(before.origin_xyz_mm, before.direction, before.spacing_zyx, centroid)
        assert np.allclose(world, n.center_world_xyz_mm, atol=1e-6)
        centre = tuple(int(round(v)) for v in centroid)
        assert float(new[centre]) > float(old[centre]), n  # the centre got denser
        gain = new[box][voxels].astype(np.float64).mean() - old[box][voxels].astype(np.float64).mean()
        assert gain >= 100.0, n  # and the nodule as a whole
        centres_mm.append((centroid * spacing, n.diameter_mm))
    # Nothing changed farther than 15 mm beyond a nodule's surface (spicules reach at most 12 mm out).
    changed = np.argwhere(new != old) * spacing
    near = np.zeros(len(changed), dtype=bool)
    for c, d in centres_mm:
        near |= np.linalg.norm(changed - c, axis=1) <= d / 2.0 + 15.0
    assert near.all(), f"{(~near).sum()} voxels changed far from every nodule"
    if exclusion is not None:
        tree = cKDTree(np.argwhere(exclusion) * spacing)
        dist, _ = tree.query(np.argwhere(labels > 0) * spacing)
        assert dist.min() >= 3.0 - 1e-6


def test_insert_into_flipped_phantom_is_deterministic_and_direction_aware():
    host = make_phantom(21, replace(SMALL, n_nodules=0, flip_xyz=(False, False, True)))
    assert host.image.direction[8] == -1.0
    lung = host.lung_mask.array.astype(bool)
    scan, mask, nodules = insert_nodules(host.image, lung, seed=5, n=5, diameter_range_mm=(4.0, 12.0))
    _check_insertion(host.image, scan, mask, nodules, lung)
    assert sorted(n.kind for n in nodules) == sorted(NODULE_KINDS)
    again = insert_nodules(host.image, lung, seed=5, n=5, diameter_range_mm=(4.0, 12.0))
    assert np.array_equal(again[0].array, scan.array) and np.array_equal(again[1].array, mask.array)
    assert again[2] == nodules
    other = insert_nodules(host.image, lung, seed=6, n=5, diameter_range_mm=(4.0, 12.0))
    assert not np.array_equal(other[1].array, mask.array)
    # Inserted solid nodules carry the host's noise (sigma 20 HU here), not a suspiciously flat interior.
    solid = [n for n in nodules if n.kind in ("solid", "juxta_vascular") and n.diameter_mm >= 7.0]
    for n in solid:
        inner = ndimage.binary_erosion(mask.array == n.id, iterations=2)
        if inner.sum() >= 20:
            assert 8.0 <= scan.array[inner].std() <= 45.0


def test_insert_refuses_bad_masks():
    host = make_phantom(22, replace(SMALL, n_nodules=0, extent_z_mm=60.0))
    with pytest.raises(InputError, match="shape"):
        insert_nodules(host.image, np.zeros((2, 2, 2), bool), seed=0, n=1)
    with pytest.raises(InputError, match="empty"):
        insert_nodules(host.image, np.zeros(host.image.shape_zyx, bool), seed=0, n=1)
    with pytest.raises(InputError, match="kind"):
        insert_nodules(host.image, host.lung_mask.array.astype(bool), seed=0, n=1, kinds=("bony",))


def _crude_lung_mask(hu: np.ndarray) -> np.ndarray:
    """Air enclosed by the body in each slice, kept where it forms big 3-D blobs (lungs, main airways).

    Worked out on every other row and column (4x less work) and expanded back: a crude mask, on purpose.
    """
    coarse = _crude_lung_mask_full(hu[:, ::2, ::2])
    full = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    return full & (hu < -400)


def _crude_lung_mask_full(hu: np.ndarray) -> np.ndarray:
    body = hu > -500
    planar = np.zeros((3, 3, 3), bool)
    planar[1] = ndimage.generate_binary_structure(2, 1)
    background, _ = ndimage.label(~body, structure=planar)
    edge = np.unique(np.concatenate([background[:, 0].ravel(), background[:, -1].ravel(),
                                     background[:, :, 0].ravel(), background[:, :, -1].ravel()]))
    inside_air = ~body & ~np.isin(background, edge) & (hu > -1100)
    blobs, _ = ndimage.label(inside_air)
    sizes = np.bincount(blobs.ravel())
    sizes[0] = 0
    return (sizes >= 0.2 * sizes.max())[blobs]


def test_insert_into_real_lidc_0002(lidc_0002_series, luna_root):
    from nodulenet.io.dicom import read_dicom_series

    volume = read_dicom_series(lidc_0002_series)
    lung = _crude_lung_mask(volume.array)
    assert 2e6 < lung.sum() < 2e7  # two adult lungs at 0.68 x 0.68 x 1.25 mm: a few litres
    # Keep clear of every finding LUNA16 lists for this scan (its ~23 mm nodule and small ones).
    uid = volume.meta["series_instance_uid"]
    with open(luna_root / "annotations_excluded.csv", newline="") as f:
        findings = [r for r in csv.DictReader(f) if r["seriesuid"] == uid]
    assert any(float(r["diameter_mm"]) > 20 for r in findings)
    exclusion = np.zeros(volume.shape_zyx, bool)
    spacing = np.asarray(volume.spacing_zyx)
    for r in findings:
        centre = volume.world_to_voxel([float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])])
        radius = max(float(r["diameter_mm"]), 4.0) / 2.0
        lo = np.maximum(np.floor(centre - radius / spacing).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radius / spacing).astype(int) + 1, volume.shape_zyx)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d2 = ((zz - centre[0]) * spacing[0]) ** 2 + ((yy - centre[1]) * spacing[1]) ** 2 + ((xx - centre[2]) * spacing[2]) ** 2
        exclusion[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= d2 <= radius**2
    scan, mask, nodules = insert_nodules(volume, lung, seed=2, n=5, diameter_range_mm=(5.0, 20.0), exclusion_mask=exclusion)
    assert len(nodules) == 5 and sorted(n.kind for n in nodules) == sorted(NODULE_KINDS)
    _check_insertion(volume, scan, mask, nodules, lung, exclusion)
    for n in nodules:
        if n.kind == "ground_glass":
            assert -750 <= n.mean_hu <= -400
        if n.kind == "juxta_pleural":
            ring = ndimage.binary_dilation(mask.array == n.id) & (mask.array != n.id)
            assert (ring & ~lung).any()
