"""Label map and tables: on the scan's grid, labels at the findings' world positions, LUNA-style CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nodulenet.export.labelmap import attach_masks_from_label_map, label_array_from_findings, write_label_map
from nodulenet.export.measurements import finding_from_mask
from nodulenet.export.tables import candidates_seriesuid, write_candidates_csv
from nodulenet.io.findings import NoduleMask, ScanFindings, ScanSource, read_findings_json
from nodulenet.io.image_files import read_image
from nodulenet.io.luna_csv import read_luna_candidates
from nodulenet.io.volume import Geometry, Volume

# An oblique-free but flipped grid with an origin that is not float32-exact.
GEOMETRY = Geometry((24, 48, 40), (2.5, 0.703125, 0.8), (123.456789, -171.699997, -340.123456),
                    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def _sphere(centre_zyx: tuple[int, int, int], radius_mm: float, geometry: Geometry) -> NoduleMask:
    half = [int(np.ceil(radius_mm / s)) for s in geometry.spacing_zyx]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, geometry.spacing_zyx)], indexing="ij")
    mask = sum(g**2 for g in grids) <= radius_mm**2
    return NoduleMask(mask, tuple(c - h for c, h in zip(centre_zyx, half)))  # type: ignore[arg-type]


@pytest.fixture()
def scan() -> tuple[ScanFindings, Volume]:
    hu = Volume.from_geometry(np.full(GEOMETRY.shape_zyx, -850, np.int16), GEOMETRY,
                              {"source_path": "/data/scans/case-07.nii.gz", "format": "nifti"})
    first = finding_from_mask(1, 0.91, _sphere((8, 15, 12), 4.0, GEOMETRY), hu)
    second = finding_from_mask(2, 0.42, _sphere((15, 32, 27), 3.0, GEOMETRY), hu)
    findings = ScanFindings(ScanSource.from_volume_meta(hu.meta), GEOMETRY, [first, second], threshold=0.3)
    return findings, hu


@pytest.mark.parametrize("suffix, origin_tol", [(".nrrd", 0.0), (".nii.gz", 1e-4)])
def test_label_map_is_on_the_scan_grid_and_labels_sit_at_the_findings(
        tmp_path: Path, scan: tuple[ScanFindings, Volume], suffix: str, origin_tol: float) -> None:
    findings, _ = scan
    path = write_label_map(findings, None, tmp_path / f"labels{suffix}")
    back = read_image(path)
    assert back.shape_zyx == GEOMETRY.shape_zyx and back.array.dtype == np.uint8
    assert np.allclose(back.origin_xyz_mm, GEOMETRY.origin_xyz_mm, rtol=0, atol=origin_tol)
    assert np.allclose(back.spacing_zyx, GEOMETRY.spacing_zyx, rtol=0, atol=1e-6)
    assert back.direction == GEOMETRY.direction
    if suffix == ".nrrd":
        assert back.geometry == GEOMETRY  # NRRD keeps doubles: the geometry is exactly the input's
    assert sorted(np.unique(back.array)) == [0, 1, 2]
    # Independent of our Geometry math: SimpleITK maps each finding's world centre to an index of the file.
    image = sitk.ReadImage(str(path))
    for f in findings.findings:
        i, j, k = image.TransformPhysicalPointToIndex(f.center_world_xyz_mm)
        assert back.array[k, j, i] == f.id
        assert int(f.mask.array.sum()) == int((back.array == f.id).sum())  # type: ignore[union-attr]


def test_overlaps_go_to_the_higher_score_and_masks_come_back(tmp_path: Path,
                                                                scan: tuple[ScanFindings, Volume]) -> None:
    findings, hu = scan
    # A third, low-scoring finding overlapping the first one.
    third = finding_from_mask(3, 0.2, _sphere((8, 15, 16), 4.0, GEOMETRY), hu)
    merged = ScanFindings(findings.source, GEOMETRY, [*findings.findings, third])
    labels = label_array_from_findings(merged.findings, GEOMETRY.shape_zyx)
    overlap = np.zeros(GEOMETRY.shape_zyx, bool)
    overlap[merged.by_id(1).mask.slices()] |= merged.by_id(1).mask.array  # type: ignore[union-attr]
    own3 = np.zeros(GEOMETRY.shape_zyx, bool)
    own3[third.mask.slices()] = third.mask.array  # type: ignore[union-attr]
    assert (overlap & own3).any() and (labels[overlap & own3] == 1).all()
    # Round trip through files: nodules.json + label map give the masks back.
    json_path = merged.write_json(tmp_path / "nodules.json")
    label_path = write_label_map(merged, None, tmp_path / "labels.nii.gz", label_array=labels)
    restored = attach_masks_from_label_map(read_findings_json(json_path), read_image(label_path))
    for f in restored.findings:
        full = np.zeros(GEOMETRY.shape_zyx, bool)
        full[f.mask.slices()] = f.mask.array  # type: ignore[union-attr]
        assert np.array_equal(full, labels == f.id)


def test_label_map_refuses_other_suffixes(tmp_path: Path, scan: tuple[ScanFindings, Volume]) -> None:
    with pytest.raises(ValueError, match="nii.gz"):
        write_label_map(scan[0], None, tmp_path / "labels.png")


def test_candidates_csv(tmp_path: Path, scan: tuple[ScanFindings, Volume]) -> None:
    findings, _ = scan
    path = write_candidates_csv(findings, tmp_path / "candidates.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,probability"
    # No SeriesInstanceUID for a NIfTI input: the file name without its image suffix.
    assert candidates_seriesuid(findings) == "case-07"
    first = findings.by_id(1)
    assert lines[1] == "case-07," + ",".join(repr(v) for v in (*first.center_world_xyz_mm, 0.91))
    assert len(lines) == 3 and lines[2].endswith(",0.42")  # ordered by score
    # With a series UID, the LUNA16 reader reads the file back exactly.
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    rows = read_luna_candidates(write_candidates_csv(findings, tmp_path / "c2.csv", seriesuid=uid))
    assert [(r.seriesuid, r.center_world_xyz_mm, r.probability) for r in rows] == [
        (uid, f.center_world_xyz_mm, f.score) for f in findings.findings]
