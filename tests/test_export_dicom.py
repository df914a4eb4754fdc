"""DICOM SEG + SR on the real LIDC-IDRI-0001 series, read back with pydicom and highdicom.

Findings: a synthetic 23.4 mm sphere at LUNA16's nodule of this series (world (56.21, 86.34, -115.87)) and a
small sphere elsewhere. The SEG is checked independently of highdicom's reader too: each stored frame is
decoded with pydicom and matched to its source slice through the DerivationImageSequence UID.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _masks import sphere_mask
from nodulenet.errors import InputError
from nodulenet.export.api import export_all
from nodulenet.export.dicom_source import ExportSkipped
from nodulenet.export.labelmap import label_array_from_findings
from nodulenet.export.measurements import finding_from_mask
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.findings import ModelInfo, ScanFindings, ScanSource
from nodulenet.io.volume import Volume

hd = pytest.importorskip("highdicom")

LUNA_NODULE_WORLD = (56.21, 86.34, -115.87)
LUNA_NODULE_DIAMETER_MM = 23.4


def nearest_instance(series: Path, world_z_mm: float) -> tuple[int, float]:
    """(InstanceNumber, SliceLocation) of the slice file whose ImagePositionPatient z is nearest ``world_z_mm``,
    read straight from the DICOM files (independent of the reader's sorting and of the geometry)."""
    best = min((abs(float(ds.ImagePositionPatient[2]) - world_z_mm), int(ds.InstanceNumber), float(ds.SliceLocation))
               for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.glob("*.dcm"))))
    return best[1], best[2]


@pytest.fixture(scope="module")
def lidc_case(lidc_0001_series: Path) -> tuple[ScanFindings, Volume]:
    hu = read_dicom_series(lidc_0001_series)
    second_world = tuple(hu.voxel_to_world((60, 200, 150)))
    findings = [
        finding_from_mask(1, 0.93, sphere_mask(hu, LUNA_NODULE_WORLD, LUNA_NODULE_DIAMETER_MM), hu),
        finding_from_mask(2, 0.47, sphere_mask(hu, second_world, 6.0), hu),  # type: ignore[arg-type]
    ]
    scan = ScanFindings(ScanSource.from_volume_meta(hu.meta), hu.geometry, findings,
                        ModelInfo(version="test-1", weights_sha256="0f" * 32), threshold=0.3)
    return scan, hu


@pytest.fixture(scope="module")
def exported(lidc_case: tuple[ScanFindings, Volume], tmp_path_factory: pytest.TempPathFactory) -> dict:
    scan, hu = lidc_case
    out = tmp_path_factory.mktemp("lidc_export")
    result = export_all(scan, hu, out)
    return {"result": result, "labels": label_array_from_findings(scan.findings, hu.shape_zyx)}


def test_export_all_writes_every_file_for_dicom_input(exported: dict) -> None:
    result = exported["result"]
    assert result.skipped == {}
    assert set(result.files) == {"nodules_json", "candidates_csv", "label_map", "dicom_seg", "dicom_sr", "report_html"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in result.files.values())
    assert not [p for p in result.out_dir.iterdir() if p.name.startswith(".")]  # no staging left


def test_seg_segments_references_and_pixels(lidc_case: tuple[ScanFindings, Volume], exported: dict) -> None:
    scan, hu = lidc_case
    labels = exported["labels"]
    path = exported["result"].files["dicom_seg"]
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.PatientID == "LIDC-IDRI-0001"
    assert ds.StudyInstanceUID == hu.meta["study_instance_uid"]
    assert ds.FrameOfReferenceUID == hu.meta["frame_of_reference_uid"]
    segments = ds.SegmentSequence
    assert [int(s.SegmentNumber) for s in segments] == [1, 2]
    assert [s.SegmentLabel for s in segments] == ["Nodule 1", "Nodule 2"]
    assert all(s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004" for s in segments)  # SCT Nodule
    assert all(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003" for s in segments)
    assert all(s.AnatomicRegionSequence[0].CodeValue == "39607008" for s in segments)  # SCT Lung
    assert segments[0].SegmentAlgorithmName == "NoduleNet" and segments[0].SegmentAlgorithmType == "AUTOMATIC"

    # Independent decode: every stored frame equals (labels == segment) on the slice it derives from.
    z_of_uid = {uid: z for z, uid in enumerate(hu.meta["sop_instance_uids"])}
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    seen: dict[int, set[int]] = {1: set(), 2: set()}
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source_uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = z_of_uid[source_uid]
        assert np.array_equal(frame.astype(bool), labels[z] == segment)
        seen[segment].add(z)
    for segment in (1, 2):
        assert seen[segment] == set(np.flatnonzero((labels == segment).any(axis=(1, 2))).tolist())

    # highdicom's reader agrees and lists exactly the CT slices the nodule covers.
    seg = hd.seg.segread(path)
    uids = [hu.meta["sop_instance_uids"][z] for z in sorted(seen[1])]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert np.array_equal(pixels[..., 0].astype(bool), labels[sorted(seen[1])] == 1)


def test_sr_measurement_groups_reference_the_segments(lidc_case: tuple[ScanFindings, Volume], exported: dict) -> None:
    scan, _ = lidc_case
    files = exported["result"].files
    seg = pydicom.dcmread(files["dicom_seg"], stop_before_pixels=True)
    sr = hd.sr.srread(files["dicom_sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PatientID == "LIDC-IDRI-0001"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for group, finding, segment in zip(groups, scan.findings, seg.SegmentSequence):
        # The tracking identifier names the slice a PACS user opens: its InstanceNumber and SliceLocation.
        instance, location = nearest_instance(Path(lidc_case[1].meta["source_path"]), finding.center_world_xyz_mm[2])
        assert group.tracking_identifier == f"Nodule {finding.id}, image {instance}, z {location:.1f} mm"
        assert group.tracking_uid == segment.TrackingUID
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [finding.id]
        values = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        assert values["Long axis"][1] == "mm" and values["Long axis"][0] == pytest.approx(finding.diameter_mm, rel=1e-9)
        assert values["Volume"] == (pytest.approx(finding.volume_mm3, rel=1e-9), "mm3")
        assert values["Attenuation Coefficient"][0] == pytest.approx(finding.mean_hu, rel=1e-9)
        assert values["Certainty of Finding"] == (pytest.approx(100 * finding.score, rel=1e-9), "%")
    # Each measurement group names exactly the CT slices its segment covers.
    labels = exported["labels"]
    uids = lidc_case[1].meta["sop_instance_uids"]
    for group, finding in zip(groups, scan.findings):
        listed = {item.referenced_sop_instance_uid for item in group.referenced_segment.source_images_for_segmentation}
        expected = {uids[z] for z in np.flatnonzero((labels == finding.id).any(axis=(1, 2)))}
        assert listed == expected
        if finding.id == 1:  # by hand: |z - 89.65| x 2.5 mm <= 11.7 mm for slices 85..94
            assert sorted(uids.index(u) for u in listed) == list(range(85, 95))


def test_sphere_measurements_match_the_luna_nodule(lidc_case: tuple[ScanFindings, Volume]) -> None:
    finding = lidc_case[0].by_id(1)
    assert np.allclose(finding.center_world_xyz_mm, LUNA_NODULE_WORLD, atol=0.2)
    assert abs(finding.equivalent_diameter_mm - LUNA_NODULE_DIAMETER_MM) < 0.3  # type: ignore[operator]
    # Long axis: corner-based, within one pixel diagonal (0.99 mm) of the true in-plane diameter.
    assert 22.4 <= finding.diameter_mm <= LUNA_NODULE_DIAMETER_MM + 0.995  # type: ignore[operator]
    assert finding.side == "left"  # world x 56 mm is on the patient's left of the body midline


def test_non_dicom_input_is_skipped_with_a_reason(lidc_case: tuple[ScanFindings, Volume], tmp_path: Path) -> None:
    from nodulenet.export.dicom_seg import write_dicom_seg
    from nodulenet.export.dicom_sr import write_dicom_sr

    scan, hu = lidc_case
    as_nifti = Volume.from_geometry(hu.array, hu.geometry, {"format": "nifti", "source_path": "/x/scan.nii.gz"})
    with pytest.raises(ExportSkipped, match="input was not DICOM") as info:
        write_dicom_seg(scan, as_nifti, tmp_path / "seg.dcm")
    assert "not DICOM" in info.value.reason
    with pytest.raises(ExportSkipped, match="input was not DICOM"):
        write_dicom_sr(scan, as_nifti, tmp_path / "seg.dcm", tmp_path / "sr.dcm")
    empty = ScanFindings(scan.source, scan.geometry, [])
    with pytest.raises(ExportSkipped, match="no findings"):
        write_dicom_seg(empty, hu, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


def test_a_finding_without_mask_keeps_its_segment_number(lidc_case: tuple[ScanFindings, Volume]) -> None:
    """Segment numbers stay equal to finding ids; a mask-less finding's segment has no frames, and its SR
    group references the CT series instead of slices."""
    from nodulenet.export.dicom_seg import build_dicom_seg
    from nodulenet.export.dicom_source import read_source_headers
    from nodulenet.export.dicom_sr import build_dicom_sr

    scan, hu = lidc_case
    first, second = scan.findings
    maskless = ScanFindings(scan.source, scan.geometry, [first.with_mask(None), second])
    headers = read_source_headers(hu)
    seg = build_dicom_seg(maskless, label_array_from_findings(maskless.findings, hu.shape_zyx), headers)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    sr = build_dicom_sr(maskless, seg, headers)
    read_back = hd.sr.Comprehensive3DSR.from_dataset(sr)
    group1, group2 = read_back.content.get_volumetric_roi_measurement_groups()
    assert group1.referenced_segment.source_series_for_segmentation.value == hu.meta["series_instance_uid"]
    assert group2.referenced_segment.source_images_for_segmentation


def test_changed_source_slices_are_refused(lidc_case: tuple[ScanFindings, Volume], tmp_path: Path) -> None:
    from nodulenet.export.dicom_seg import write_dicom_seg

    scan, hu = lidc_case
    files = list(hu.meta["source_files"])
    copy = tmp_path / "slice.dcm"
    shutil.copy(files[1], copy)
    files[0] = str(copy)  # the recorded first slice is now a different instance
    moved = hu.with_array(hu.array, source_files=files)
    with pytest.raises(InputError, match="changed since the scan was read"):
        write_dicom_seg(scan, moved, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
