"""Nodule type, solid component and Lung-RADS mean diameter, on drawn shapes with known answers, the phantom's
kinds and the LIDC-IDRI readers' texture ratings."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nodulenet.export.nodule_type import lidc_texture_type, mean_diameter, nodule_composition, phantom_type_pairs
from nodulenet.io.findings import NoduleMask

SPACING = (1.0, 0.5, 0.5)


def _ball(shape, centre_mm, radius_mm, spacing=SPACING):
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(centre_mm), axis=-1) <= radius_mm


def _scan(shape=(40, 80, 80)):
    rng = np.random.default_rng(0)
    return (-850.0 + rng.normal(0.0, 15.0, shape)).astype(np.float32)


def _type(hu, mask):
    return nodule_composition(NoduleMask(mask, (0, 0, 0)), hu, SPACING)


def test_solid_ground_glass_and_part_solid_drawn_by_hand() -> None:
    centre = (20.0, 20.0, 20.0)
    nodule = _ball((40, 80, 80), centre, 6.0)
    solid = _scan()
    solid[nodule] = 40.0
    ggn = _scan()
    ggn[nodule] = -600.0
    part = _scan()
    part[nodule] = -600.0
    core = _ball((40, 80, 80), centre, 2.5)
    part[core] = 30.0
    assert _type(solid, nodule).nodule_type == "solid"
    assert _type(ggn, nodule).nodule_type == "ground_glass"
    c = _type(part, nodule)
    assert c.nodule_type == "part_solid"
    assert c.solid_component_mm == pytest.approx(5.0, abs=1.0)  # the 5 mm core, within a voxel's corners
    assert c.mean_diameter_mm == pytest.approx(12.0, abs=1.0)
    # A few vessel voxels crossing a ground-glass nodule do not make it part-solid.
    speck = ggn.copy()
    speck[20, 40, 38:42] = 40.0
    assert _type(speck, nodule).nodule_type == "ground_glass"


def test_mean_diameter_is_long_plus_short_axis_over_two() -> None:
    # An axial ellipse 20 mm x 10 mm (semi-axes 10 and 5) on 0.5 mm pixels, one slice thick.
    y, x = np.mgrid[0:60, 0:60] * 0.5
    ellipse = (((y - 15.0) / 10.0) ** 2 + ((x - 15.0) / 5.0) ** 2) <= 1.0
    mask = ellipse[None]
    mean, long_mm, short_mm = mean_diameter(mask, SPACING)
    assert long_mm == pytest.approx(20.0, abs=0.75) and short_mm == pytest.approx(10.0, abs=0.75)
    assert mean == round(0.5 * (long_mm + short_mm), 1)


def test_the_phantom_kinds_are_typed_as_readers_would(phantom_kinds_table) -> None:
    agree = sum(n for (truth, got), n in phantom_kinds_table.items() if truth == got)
    total = sum(phantom_kinds_table.values())
    assert total == 20 and agree / total >= 0.9, phantom_kinds_table


@pytest.fixture(scope="module")
def phantom_kinds_table():
    from collections import Counter

    return Counter(phantom_type_pairs(range(4)))


def test_lidc_texture_ratings_map_to_types() -> None:
    assert [lidc_texture_type(t) for t in (1, 2, 3, 4, 5)] == ["ground_glass", "ground_glass", "part_solid",
                                                                   "solid", "solid"]
    with pytest.raises(ValueError):
        lidc_texture_type(0)


def test_lidc_nodules_agree_with_their_readers(lidc_0001_series, lidc_0002_series) -> None:
    from nodulenet.io.scan import read_scan
    from nodulenet.preprocess.lidc_nodules import lidc_labels_for_series

    seen = []
    for series in (lidc_0001_series, lidc_0002_series):
        volume = read_scan(series)
        labels = lidc_labels_for_series(series, volume, min_readers=1)
        mask_array = labels.instance_mask.array
        for record in labels.nodules:
            texture = record.characteristics.get("texture")
            if texture is None or record.diameter_mm < 6.0:
                continue
            box = ndimage.find_objects(mask_array)[record.id - 1]
            mask = NoduleMask(mask_array[box] == record.id, tuple(s.start for s in box))
            got = nodule_composition(mask, volume.array, volume.spacing_zyx).nodule_type
            seen.append((lidc_texture_type(texture), got))
    assert seen, "no rated nodule >= 6 mm in the two LIDC cases"
    assert all(a == b for a, b in seen), seen  # LIDC-IDRI-0001: solid (texture 4.75), -0002: ground glass (1.5)


def test_every_finding_carries_its_type_into_nodules_json() -> None:
    from nodulenet.export.measurements import finding_from_mask
    from nodulenet.io.findings import NoduleFinding
    from nodulenet.io.volume import Volume

    hu = _scan()
    nodule = _ball((40, 80, 80), (20.0, 20.0, 20.0), 6.0)
    hu[nodule] = -600.0
    hu[_ball((40, 80, 80), (20.0, 20.0, 20.0), 2.5)] = 30.0
    volume = Volume(hu, SPACING, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), {})
    f = finding_from_mask(1, 0.9, NoduleMask(nodule, (0, 0, 0)), volume)
    assert f.nodule_type == "part_solid" and f.solid_component_mm == pytest.approx(5.0, abs=1.0)
    back = NoduleFinding.from_dict(f.to_dict())
    assert (back.nodule_type, back.mean_diameter_mm, back.solid_component_mm) == (
        f.nodule_type, f.mean_diameter_mm, f.solid_component_mm)
