"""Synthetic training cases: a phantom prepared as a case, and LIDC-IDRI-0001 with nodules inserted into its lungs.

Golden values: the phantom's own nodule records (world centres from the generator) and, for the LIDC case, the
real nodule of LIDC-IDRI-0001 (LUNA16 lists one nodule of 23.4 mm at world (56.21, 86.34, -115.87)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nodulenet.data.cases import load_case
from nodulenet.data.synthetic import SMALL_PHANTOM, prepare_lidc_with_inserted_nodules, prepare_phantom_case
from nodulenet.io.image_files import read_image
from nodulenet.preprocess.phantom import make_phantom


def test_phantom_case_keeps_every_nodule_where_the_generator_put_it(tmp_path: Path) -> None:
    summary = prepare_phantom_case(3, tmp_path / "phantom-3")
    assert summary.status == "done" and summary.n_nodules == SMALL_PHANTOM.n_nodules
    phantom = make_phantom(3, SMALL_PHANTOM)
    case = load_case(tmp_path / "phantom-3")
    assert case.patient_id == "phantom-3" and len(case.nodules) == len(phantom.nodules)
    for n, truth in zip(case.nodules, phantom.nodules):
        # The mask's box centre, through the prepared geometry, lands on the generator's world centre.
        world = case.geometry.voxel_to_world(n.center_zyx)
        assert math.dist(world, truth.center_world_xyz_mm) < 1.5, (n.id, world, truth.center_world_xyz_mm)
        assert abs(max(n.mask.shape) - truth.diameter_mm) < 0.5 * truth.diameter_mm + 2
    record = json.loads((tmp_path / "phantom-3" / "nodules.json").read_text())
    assert record["source"]["dataset"] == "phantom" and all(e["synthetic"] for e in record["nodules"])


@pytest.mark.slow
def test_lidc_scan_with_inserted_nodules(lidc_0001_series: Path, tmp_path: Path) -> None:
    summary = prepare_lidc_with_inserted_nodules(lidc_0001_series, tmp_path / "case", seed=5, n_nodules=3)
    assert summary.status == "done"
    record = json.loads((tmp_path / "case" / "nodules.json").read_text())
    real = [n for n in record["nodules"] if not n["synthetic"]]
    synthetic = [n for n in record["nodules"] if n["synthetic"]]
    assert len(synthetic) == 3 and len(real) >= 1
    luna = (56.21, 86.34, -115.87)
    assert min(math.dist(n["center_world_xyz_mm"], luna) for n in real) < 5.0
    assert record["source"]["patient_id"] == "LIDC-IDRI-0001"
    case = load_case(tmp_path / "case")
    assert case.patient_id == "LIDC-IDRI-0001" and len(case.nodules) == len(real) + 3
    labels = read_image(tmp_path / "case" / "nodule_mask.nrrd").array
    lungs = read_image(tmp_path / "case" / "lung_mask.nrrd").array
    image = np.asarray(case.image)
    for n in synthetic:
        inside = labels == n["id"]
        assert inside.sum() > 10
        assert np.isin(lungs[inside], (1, 2, 3)).mean() > 0.9  # inserted in the lungs (or their margin)
        ring = np.zeros_like(inside)
        z0, y0, x0, z1, y1, x1 = n["box_zyx"]
        ring[max(z0 - 3, 0):z1 + 3, max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
        ring &= ~inside & (labels == 0)
        assert image[inside].mean() > image[ring].mean() + 10  # denser than the surrounding parenchyma
        for r in real:  # kept clear of the real nodules
            assert math.dist(n["center_world_xyz_mm"], r["center_world_xyz_mm"]) > (r["diameter_mm"] or 0) / 2
