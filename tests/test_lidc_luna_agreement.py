"""Nodules derived from the real LIDC-IDRI XML + DICOM agree with LUNA16's official CSVs.

The golden values are the official ``annotations.csv`` / ``annotations_excluded.csv`` rows, produced by
the LUNA16 organisers from the same readers' outlines with their own code: an independent reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.lidc_xml import find_lidc_xml
from nodulenet.io.luna_csv import index_by_seriesuid, read_luna_annotations, read_luna_excluded
from nodulenet.io.volume import Volume
from nodulenet.preprocess.lidc_nodules import lidc_findings, lidc_labels_for_series

UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID_0002 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"


@pytest.fixture(scope="module")
def volume_0001(lidc_0001_series: Path) -> Volume:
    return read_dicom_series(lidc_0001_series)


@pytest.fixture(scope="module")
def volume_0002(lidc_0002_series: Path) -> Volume:
    return read_dicom_series(lidc_0002_series)


def _distance(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def test_lidc_0001_matches_annotations_csv(lidc_0001_series: Path, volume_0001: Volume, luna_root: Path) -> None:
    official = index_by_seriesuid(read_luna_annotations(luna_root / "annotations.csv"))[UID_0001]
    assert len(official) == 1
    labels = lidc_labels_for_series(lidc_0001_series, volume_0001, min_readers=3, consensus="majority")
    assert labels is not None and labels.xml_path.name == "069.xml"
    assert [n.n_readers for n in labels.nodules] == [4]
    nodule = labels.nodules[0]
    # Measured: 0.21 mm and 0.24 mm (LUNA16: (56.21, 86.34, -115.87), 23.35 mm).
    assert _distance(nodule.center_world_xyz_mm, official[0].center_world_xyz_mm) < 1.0
    assert nodule.diameter_mm == pytest.approx(official[0].diameter_mm, abs=1.5)
    # The mask holds exactly this nodule, and its voxels sit around the centre.
    mask = labels.instance_mask.array
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert labels.instance_mask.geometry == volume_0001.geometry
    mask_centre = volume_0001.voxel_to_world(np.argwhere(mask == 1).mean(axis=0))
    assert _distance(tuple(mask_centre), nodule.center_world_xyz_mm) < 1.0
    z0, y0, x0, z1, y1, x1 = nodule.bbox_zyx
    assert int((mask[z0:z1, y0:y1, x0:x1] == 1).sum()) == int((mask == 1).sum())
    assert nodule.volume_mm3 == pytest.approx(int((mask == 1).sum()) * float(np.prod(volume_0001.spacing_zyx)))
    assert nodule.characteristics["malignancy"] is not None
    json.dumps(labels.to_dict())


def test_lidc_0001_single_reader_rows_reproduced(volume_0001: Volume, lidc_0001_series: Path, luna_root: Path) -> None:
    # annotations_excluded.csv also lists per-reader rows of this nodule; reader 4's outline gives
    # (56.607, 86.219, -115.768) mm, 23.500 mm. Our per-reader centroid + equal-volume diameter of the
    # voxels inside the outline reproduce it to < 0.01 mm: the convention LUNA16 used.
    excluded = [e for e in read_luna_excluded(luna_root / "annotations_excluded.csv") if e.seriesuid == UID_0001]
    sized = [e for e in excluded if e.diameter_mm is not None]
    findings = lidc_findings(find_lidc_xml(lidc_0001_series, UID_0001), volume_0001)  # type: ignore[arg-type]
    reader4 = findings.nodules[0].outlines[3]
    best = min(sized, key=lambda e: _distance(e.center_world_xyz_mm, reader4.center_world_xyz_mm))
    assert _distance(best.center_world_xyz_mm, reader4.center_world_xyz_mm) < 0.01
    assert reader4.diameter_mm == pytest.approx(best.diameter_mm, abs=0.01)
    # Each small-nodule group lies on an excluded point finding (within 2 mm).
    for group in findings.small_nodules:
        centre = np.mean([m.center_world_xyz_mm for m in group], axis=0)
        assert min(_distance(tuple(centre), e.center_world_xyz_mm) for e in excluded) < 2.0


def test_lidc_0002_two_reader_nodule(lidc_0002_series: Path, volume_0002: Volume, luna_root: Path) -> None:
    assert UID_0002 not in index_by_seriesuid(read_luna_annotations(luna_root / "annotations.csv"))
    excluded = [e for e in read_luna_excluded(luna_root / "annotations_excluded.csv") if e.seriesuid == UID_0002]
    sized = [e for e in excluded if e.diameter_mm is not None]
    assert len(sized) == 2

    three = lidc_labels_for_series(lidc_0002_series, volume_0002, min_readers=3)
    assert three is not None
    assert three.nodules == () and int(three.instance_mask.array.max()) == 0
    assert [n.n_readers for n in three.excluded_nodules] == [2]

    two = lidc_labels_for_series(lidc_0002_series, volume_0002, min_readers=2, consensus="union")
    assert two is not None and [n.n_readers for n in two.nodules] == [2]
    nodule = two.nodules[0]
    # Measured: 0.000 mm / 0.000 mm from the merged row (59.776, 71.531, -104.103), 23.32 mm.
    nearest = min(sized, key=lambda e: _distance(e.center_world_xyz_mm, nodule.center_world_xyz_mm))
    assert _distance(nearest.center_world_xyz_mm, nodule.center_world_xyz_mm) < 1.0
    assert nodule.diameter_mm == pytest.approx(nearest.diameter_mm, abs=1.5)
    assert int((two.instance_mask.array == 1).sum()) * float(np.prod(volume_0002.spacing_zyx)) == pytest.approx(
        nodule.volume_mm3
    )
