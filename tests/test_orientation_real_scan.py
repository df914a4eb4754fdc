"""The same real scan in any orientation gets the same findings (issue 12): LIDC-IDRI-0001 as its DICOM series and,
written by the test, as NIfTI stored RAS, LAS, PIL (axes permuted: the file's first axis is the patient's x), an
oblique grid (20 degrees about z) and a DICOM copy with its instance order reversed, each predicted by the
shipped demo model.

Axis-aligned variants are exact re-indexings of the DICOM volume, so their scores must be EXACTLY the DICOM run's
and their label maps the DICOM label map re-indexed voxel for voxel onto the file's own grid (checked against
SimpleITK's DICOMOrient, an independent implementation). The oblique file went through one resampling on the
way in and one on the way to the network: its nodules (LUNA16's annotations of the series) have centres within
1.5 mm, scores within 0.05 and masks Dice >= 0.9 on the DICOM grid, and at the default threshold it reports the
same findings.

Cost: one predict per variant (about 11-25 s each on two cores); DICOM, RAS and PIL run in the default suite,
LAS, the oblique file and the reversed DICOM series are ``slow``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nodulenet.evaluate.froc import DEFAULT_DIAMETER_MM, read_findings_csv
from nodulenet.infer.cohort import CohortItem
from nodulenet.io.findings import ScanFindings, read_findings_json
from nodulenet.io.image_files import read_image
from nodulenet.predict_api import PredictOptions, Predictor

THRESHOLD = 0.2  # below the default 0.5, so that more than one detection is compared (the second scores 0.27)
CENTRE_TOLERANCE_MM = 1.5
SCORE_TOLERANCE = 0.05
MIN_DICE = 0.9


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(PredictOptions(threshold=THRESHOLD))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("orientation")


@pytest.fixture(scope="module")
def dicom_image(lidc_0001_series: Path) -> sitk.Image:
    from nodulenet.io.scan import read_scan
    from nodulenet.preprocess.resample import volume_to_sitk

    return volume_to_sitk(read_scan(lidc_0001_series))


def _predict(predictor: Predictor, scan: Path, work: Path, name: str) -> tuple[ScanFindings, sitk.Image]:
    result = predictor.predict_scan(CohortItem(index=0, path=scan, name=name), work / "out")
    assert result.status == "done", result.error
    folder = Path(result.out_dir)
    return read_findings_json(folder / "nodules.json"), sitk.ReadImage(str(folder / "labels.nii.gz"))


@pytest.fixture(scope="module")
def dicom_run(predictor, lidc_0001_series, work):
    findings, labels = _predict(predictor, lidc_0001_series, work, "dicom")
    assert findings.orientation == {"input_code": "LPS", "canonical_code": "LPS", "method": "none",
                                    "max_off_axis_cosine": 0.0}
    assert len(findings.findings) >= 2, "the comparison needs more than one finding"
    assert max(f.score for f in findings.findings) > 0.9  # the 0001 nodule LUNA16 lists (about 25 mm)
    return findings, labels


def _nifti_variant(predictor, dicom_image, work, code):
    path = work / f"lidc0001_{code}.nii.gz"
    stored = sitk.DICOMOrient(dicom_image, code)
    sitk.WriteImage(stored, str(path))
    findings, labels = _predict(predictor, path, work, code)
    return path, findings, labels


def _match(reference: ScanFindings, other: ScanFindings) -> list[tuple]:
    """Pairs (reference finding, nearest other finding, distance mm) for every reference finding."""
    pairs = []
    for f in reference.findings:
        distances = [math.dist(f.center_world_xyz_mm, g.center_world_xyz_mm) for g in other.findings]
        k = int(np.argmin(distances))
        pairs.append((f, other.findings[k], distances[k]))
    return pairs


def _assert_same_geometry(labels: sitk.Image, scan: Path) -> None:
    """The label map lies on the input file's own grid."""
    source = read_image(scan)
    assert labels.GetSize() == tuple(reversed(source.shape_zyx))
    np.testing.assert_allclose(labels.GetSpacing(), source.geometry.spacing_xyz, atol=1e-5)
    np.testing.assert_allclose(labels.GetOrigin(), source.origin_xyz_mm, atol=1e-3)
    np.testing.assert_allclose(labels.GetDirection(), source.direction, atol=1e-6)


def _assert_exact_variant(dicom_run, variant, code):
    (reference, reference_labels), (path, findings, labels) = dicom_run, variant
    assert findings.orientation["method"] == "reindexed" and findings.orientation["input_code"] == code
    assert len(findings.findings) == len(reference.findings)
    for f, g, distance in _match(reference, findings):
        assert g.score == f.score  # exactly: the network saw the same voxels
        assert distance < 1e-3
        assert g.diameter_mm == pytest.approx(f.diameter_mm, abs=1e-9)  # measured in the axial plane either way
        assert g.volume_mm3 == pytest.approx(f.volume_mm3, abs=1e-6)
        assert g.side == f.side
    _assert_same_geometry(labels, path)
    # Voxel for voxel: the DICOM run's label map stored the way this file is stored.
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(reference_labels, code))
    got = sitk.GetArrayFromImage(labels)
    ids = {f.id: g.id for f, g, _ in _match(reference, findings)}
    relabelled = np.zeros_like(expected)
    for reference_id, variant_id in ids.items():
        relabelled[expected == reference_id] = variant_id
    assert np.array_equal(got, relabelled)


def test_ras_nifti_finds_exactly_what_the_dicom_series_finds(predictor, dicom_image, work, dicom_run):
    _assert_exact_variant(dicom_run, _nifti_variant(predictor, dicom_image, work, "RAS"), "RAS")


def test_pil_nifti_with_permuted_axes_finds_exactly_what_the_dicom_series_finds(predictor, dicom_image, work,
                                                                               dicom_run):
    _assert_exact_variant(dicom_run, _nifti_variant(predictor, dicom_image, work, "PIL"), "PIL")


@pytest.mark.slow
def test_las_nifti_finds_exactly_what_the_dicom_series_finds(predictor, dicom_image, work, dicom_run):
    _assert_exact_variant(dicom_run, _nifti_variant(predictor, dicom_image, work, "LAS"), "LAS")


def _dice_on_reference_grid(reference_labels: sitk.Image, labels: sitk.Image, reference_id: int,
                            variant_id: int) -> float:
    on_reference = sitk.GetArrayFromImage(sitk.Resample(labels, reference_labels, sitk.Transform(),
                                                        sitk.sitkNearestNeighbor, 0))
    a = sitk.GetArrayFromImage(reference_labels) == reference_id
    b = on_reference == variant_id
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.slow
def test_oblique_nifti_rotated_20_degrees_about_z_finds_the_same_nodules(predictor, dicom_image, work, dicom_run,
                                                                         luna_root):
    from nodulenet.io.luna_csv import read_luna_annotations

    reference, reference_labels = dicom_run
    angle = math.radians(20.0)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                         [0.0, 0.0, 1.0]])
    # The same size and spacing on a grid rotated about the scan's centre (corners outside the scan: air).
    size = np.asarray(dicom_image.GetSize(), dtype=np.float64)
    spacing = np.asarray(dicom_image.GetSpacing())
    centre = np.asarray(dicom_image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    origin = centre - rotation @ (spacing * (size - 1) / 2)
    oblique = sitk.Resample(dicom_image, dicom_image.GetSize(), sitk.Transform(), sitk.sitkLinear,
                            origin.tolist(), spacing.tolist(), rotation.reshape(-1).tolist(), -1000.0,
                            sitk.sitkInt16)
    path = work / "lidc0001_oblique20.nii.gz"
    sitk.WriteImage(oblique, str(path))
    findings, labels = _predict(predictor, path, work, "oblique")
    assert findings.orientation["method"] == "resampled"
    assert findings.orientation["max_off_axis_cosine"] == pytest.approx(math.sin(angle), abs=1e-6)
    _assert_same_geometry(labels, path)
    # The nodules: the LUNA16 annotations of this series (each found by the DICOM run), found again with the same
    # centre, score and mask. (Detections below the operating point are not stable under two resamplings: a
    # 0.49 false positive of the DICOM run on a dense structure scores below 0.3 here; measured.)
    uid = reference.source.series_instance_uid
    nodules = [a for a in read_luna_annotations(luna_root / "annotations.csv") if a.seriesuid == uid]
    assert nodules
    for nodule in nodules:
        f = min(reference.findings, key=lambda f: math.dist(f.center_world_xyz_mm, nodule.center_world_xyz_mm))
        assert math.dist(f.center_world_xyz_mm, nodule.center_world_xyz_mm) < nodule.diameter_mm / 2
        g = min(findings.findings, key=lambda g: math.dist(g.center_world_xyz_mm, f.center_world_xyz_mm))
        assert math.dist(g.center_world_xyz_mm, f.center_world_xyz_mm) < CENTRE_TOLERANCE_MM
        assert abs(g.score - f.score) <= SCORE_TOLERANCE, (f.score, g.score)
        assert _dice_on_reference_grid(reference_labels, labels, f.id, g.id) >= MIN_DICE
    # At the default operating point (0.5) both runs report the same findings, apart from findings on a reader-marked
    # lesion of annotations_excluded.csv, which LUNA16 counts neither as a hit nor as a false positive: their scores
    # move under the two resamplings like any sub-threshold candidate's. Measured with the shipped model (stage 5):
    # the excluded lesion at (-71.1, 70.9, -242.5) mm (a faint ground-glass spot, 7.6 mm mask) scores 0.33 in the
    # DICOM run and 0.85 on this rotated grid; stage 4 kept it below 0.5 in both.
    excluded = [e for e in read_findings_csv(luna_root / "annotations_excluded.csv") if e.seriesuid == uid]

    def within(f, centre: tuple[float, float, float], diameter: float | None) -> bool:
        # LUNA16's rule: closer than the radius (10 mm diameter when the file says -1, unknown).
        size = diameter if diameter is not None and diameter > 0 else DEFAULT_DIAMETER_MM
        return math.dist(f.center_world_xyz_mm, centre) < size / 2

    def reported(run: ScanFindings) -> list:
        def neutral(f) -> bool:  # on an excluded entry and on no nodule: neither a hit nor a false positive
            return (not any(within(f, n.center_world_xyz_mm, n.diameter_mm) for n in nodules)
                    and any(within(f, e.center_world_xyz_mm, e.diameter_mm) for e in excluded))

        return [f for f in run.findings if f.score >= PredictOptions().threshold and not neutral(f)]

    assert reported(reference) and len(reported(findings)) == len(reported(reference))
    for f in reported(reference):
        g = min(reported(findings), key=lambda g: math.dist(g.center_world_xyz_mm, f.center_world_xyz_mm))
        assert math.dist(g.center_world_xyz_mm, f.center_world_xyz_mm) < CENTRE_TOLERANCE_MM


@pytest.mark.slow
def test_dicom_series_with_reversed_instance_order_finds_the_same(predictor, lidc_0001_series, work, dicom_run):
    import pydicom

    reference, reference_labels = dicom_run
    files = sorted(lidc_0001_series.glob("*.dcm"))
    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    headers.sort(key=lambda h: int(h[1].InstanceNumber))
    folder = work / "reversed"
    folder.mkdir()
    n = len(headers)
    for k, (p, _) in enumerate(headers):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = n - k  # the first slice becomes the last, and the file names follow
        ds.save_as(folder / f"{n - k:04d}.dcm")
    findings, labels = _predict(predictor, folder, work, "reversed")
    assert findings.orientation["method"] == "none"
    assert [f.score for f in findings.findings] == [f.score for f in reference.findings]
    for f, g, distance in _match(reference, findings):
        assert distance < 1e-6
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(reference_labels))
