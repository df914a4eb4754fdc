"""Where a finding is (``site``), on the real LIDC-IDRI-0001 scan with the lung segmentation the network input is
made with: a finding on bone is not called "lung", a finding outside the dilated lungs is flagged, and the LUNA16
nodule stays in the left lung. Checked in nodules.json's fields, the report's text and the SR's finding site."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nodulenet.export.measurements import finding_from_mask, locate_finding
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.findings import BONE_HU, NoduleMask, ScanFindings, ScanSource
from nodulenet.io.volume import Volume

LUNA_NODULE_WORLD = (56.21, 86.34, -115.87)


def ball_mask(hu: Volume, centre_zyx: np.ndarray, radius_mm: float, keep: np.ndarray | None = None) -> NoduleMask:
    """Voxels within ``radius_mm`` of a voxel (and in ``keep``, a bool array of ``hu``'s grid), as a crop."""
    spacing = np.asarray(hu.spacing_zyx)
    half = np.ceil(radius_mm / spacing).astype(int)
    lo = np.maximum(centre_zyx - half, 0)
    hi = np.minimum(centre_zyx + half + 1, hu.shape_zyx)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    inside = (((grid - centre_zyx) * spacing) ** 2).sum(-1) <= radius_mm ** 2
    if keep is not None:
        inside &= keep[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return NoduleMask(inside, tuple(int(v) for v in lo))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def chest(lidc_0001_series):
    from nodulenet.infer.prepare_input import prepare_input

    hu = read_dicom_series(lidc_0001_series)
    prepared = prepare_input(hu)
    grid = prepared.transform.resampled
    lungs = Volume.from_geometry(prepared.lungs, grid)
    kept = Volume.from_geometry(prepared.lungs_kept, grid)
    return hu, lungs, kept


def _on_original(hu: Volume, labels: Volume) -> np.ndarray:
    """A resampled-grid label array looked up at every original voxel (nearest), for choosing test points."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in hu.shape_zyx], indexing="ij", sparse=True)
    world = hu.geometry.voxel_to_world(np.stack(np.broadcast_arrays(z, y, x), -1)[:, ::4, ::4])
    idx = np.floor(labels.world_to_voxel(world) + 0.5).astype(int)
    idx = np.clip(idx, 0, np.asarray(labels.shape_zyx) - 1)
    return labels.array[idx[..., 0], idx[..., 1], idx[..., 2]]


def test_a_finding_on_bone_is_not_called_lung(chest) -> None:
    hu, lungs, kept = chest
    # A bone voxel (> 700 HU: cortex) next to the pleura: inside the 10 mm dilated margin, outside the lungs.
    margin = (_on_original(hu, kept) > 0) & (_on_original(hu, lungs) == 0)
    dense = hu.array[:, ::4, ::4] > 700
    candidates = np.argwhere(margin & ndimage.binary_erosion(dense))
    assert len(candidates) > 0, "no bone within the dilated lung margin of LIDC-IDRI-0001"
    z, y, x = candidates[len(candidates) // 2]
    centre = np.array([z, 4 * y, 4 * x])
    mask = ball_mask(hu, centre, 3.0, keep=hu.array > BONE_HU)
    finding = locate_finding(finding_from_mask(1, 0.6, mask, hu), hu, lungs, kept)
    assert finding.mean_hu >= BONE_HU
    assert finding.site == "bone"
    assert "lung" not in finding.location_text.replace("outside the lungs", "")
    scan = ScanFindings(ScanSource.from_volume_meta(hu.meta), hu.geometry, [finding], threshold=0.5)
    from nodulenet.export.report import render_report_html

    labels = np.zeros(hu.shape_zyx, np.uint8)
    labels[mask.slices()][mask.array] = 1
    html = render_report_html(scan, hu, labels)
    assert f'<span class="flag">{finding.side}, bone, outside the lungs</span>' in html
    assert "left lung" not in html and "right lung" not in html


def test_outside_the_dilated_lungs_is_flagged_and_the_luna_nodule_is_in_the_left_lung(chest) -> None:
    hu, lungs, kept = chest
    # Soft tissue far from any lung (outside the dilated mask), on the nodule's slice.
    z = int(round(hu.world_to_voxel(LUNA_NODULE_WORLD)[0]))
    outside = (_on_original(hu, kept) == 0)[z] & (np.abs(hu.array[z, ::4, ::4].astype(float) - 40) < 60)
    rows, cols = np.nonzero(ndimage.binary_erosion(outside, iterations=3))
    soft = locate_finding(finding_from_mask(1, 0.6, ball_mask(hu, np.array([z, 4 * rows[0], 4 * cols[0]]), 4.0),
                                            hu), hu, lungs, kept)
    assert soft.site == "outside_lungs" and soft.location_text.endswith("outside the lungs")
    centre = np.round(hu.world_to_voxel(LUNA_NODULE_WORLD)).astype(int)
    nodule = locate_finding(finding_from_mask(2, 0.9, ball_mask(hu, centre, 10.0), hu), hu, lungs, kept)
    assert nodule.site == "lung" and nodule.location_text == "left lung"


def test_the_sr_names_bone_not_lung_as_the_finding_site(chest) -> None:
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    from nodulenet.export.dicom_seg import build_dicom_seg
    from nodulenet.export.dicom_source import read_source_headers
    from nodulenet.export.dicom_sr import build_dicom_sr
    from nodulenet.export.labelmap import label_array_from_findings

    hu, lungs, kept = chest
    centre = np.round(hu.world_to_voxel(LUNA_NODULE_WORLD)).astype(int)
    finding = locate_finding(finding_from_mask(1, 0.9, ball_mask(hu, centre, 10.0), hu), hu, lungs, kept)
    bone = finding.__class__(**{**finding.__dict__, "site": "bone"})
    scan = ScanFindings(ScanSource.from_volume_meta(hu.meta), hu.geometry, [bone], threshold=0.5)
    headers = read_source_headers(hu)
    seg = build_dicom_seg(scan, label_array_from_findings(scan.findings, hu.shape_zyx), headers)
    sr = hd.sr.Comprehensive3DSR.from_dataset(build_dicom_sr(scan, seg, headers))
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    (site,) = group.finding_sites
    assert site.value == codes.SCT.Bone
