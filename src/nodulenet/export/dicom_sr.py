"""DICOM Comprehensive 3D SR with a TID 1500 Measurement Report of the findings (written with highdicom).

Structure (DICOM PS3.16 TID 1500 > TID 1411 "Volumetric ROI Measurements and Qualitative Evaluations"):

- observer: the device "NoduleNet"; procedure reported: LOINC 25045-6 "CT unspecified body region";
- one measurement group per finding, in id order, holding
  - tracking identifier "Nodule <id>" and the tracking UID of its DICOM SEG segment,
  - a reference to SEG segment <id> (with the source CT slices it covers),
  - finding type SNOMED CT "Nodule", category "Morphologically Abnormal Structure", algorithm "NoduleNet"
    + version, finding site "Lung" with laterality Right/Left when known,
  - measurements (each only when known): SCT "Long axis" (mm, ``diameter_mm``), SCT "Volume" (mm3),
    DCM "Attenuation Coefficient" derived as SCT "Mean" (HU, ``mean_hu``), and the detection score as DCM
    111012 "Certainty of Finding" in percent (score x 100), the unit DICOM's CAD templates use for it.

The tracking identifier names the finding's centre slice as a PACS shows it ("Nodule 1, image 73, z -99.5 mm"),
and the finding site is "Lung" only for a finding in the lungs (``site``): bone-dense findings outside them get
"Bone", others "Thorax".

A scan without findings still gets an SR (:func:`build_no_findings_sr`), so that a PACS shows the run happened and
found nothing: one TID 1501 measurement group "No nodule found" holding the qualitative evaluation DCM 111017 "CAD
Processing and Findings Summary" = DCM 111242 "All algorithms succeeded; without findings" (the CAD SR templates'
code for exactly this) and the score threshold in its tracking identifier. It references the source CT series
(there is no SEG to reference).

The document is marked COMPLETE (it holds every finding) and UNVERIFIED (no person has checked it).
Non-DICOM input raises :class:`~nodulenet.export.dicom_seg.ExportSkipped`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from nodulenet.errors import InputError
from nodulenet.export.dicom_source import (
    MANUFACTURER,
    MODEL_NAME,
    ExportSkipped,
    algorithm_version,
    new_series_attributes,
    read_source_headers,
    require_dicom_source,
    save_dataset,
)
from nodulenet.io.findings import NoduleFinding, ScanFindings
from nodulenet.io.volume import Volume

SR_SERIES_NUMBER = 9002
SR_SERIES_DESCRIPTION = "NoduleNet measurements (research, not diagnostic)"
UNIT_MM = codes.UCUM.Millimeter
UNIT_MM3 = codes.UCUM.CubicMillimeter
UNIT_HU = hd.sr.CodedConcept(value="[hnsf'U]", scheme_designator="UCUM", meaning="Hounsfield unit")
UNIT_PERCENT = hd.sr.CodedConcept(value="%", scheme_designator="UCUM", meaning="percent")
LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left}
SITE_CODES = {"lung": codes.SCT.Lung, "bone": codes.SCT.Bone, "outside_lungs": codes.SCT.Thorax}
NO_FINDINGS_IDENTIFIER = "No nodule found"


def _tracking_text(f: NoduleFinding) -> str:
    """``Nodule 1, image 73, z -99.5 mm`` (the slice a reader opens); ``Nodule 1`` when it is not known."""
    if f.centre_slice is None:
        return f"Nodule {f.id}"
    ref = f.centre_slice
    if ref.instance_number is not None:
        z = ref.slice_location_mm if ref.slice_location_mm is not None else ref.position_z_mm
        return f"Nodule {f.id}, image {ref.instance_number}, z {z:.1f} mm"
    return f"Nodule {f.id}, slice {ref.index + 1}, z {ref.position_z_mm:.1f} mm"


def _measurements(f: NoduleFinding, algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    items = []
    if f.diameter_mm is not None:
        items.append(hd.sr.Measurement(name=codes.SCT.LongAxis, value=f.diameter_mm, unit=UNIT_MM,
                                       algorithm_id=algorithm))
    if f.volume_mm3 is not None:
        items.append(hd.sr.Measurement(name=codes.SCT.Volume, value=f.volume_mm3, unit=UNIT_MM3,
                                       algorithm_id=algorithm))
    if f.mean_hu is not None:
        items.append(hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=f.mean_hu, unit=UNIT_HU,
                                       derivation=codes.SCT.Mean, algorithm_id=algorithm))
    items.append(hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=100.0 * f.score, unit=UNIT_PERCENT,
                                   algorithm_id=algorithm))
    return items


def source_images_by_segment(segmentation: Dataset) -> dict[int, list[tuple[str, str]]]:
    """Segment number -> (SOP class, SOP instance) of the source slices its stored frames derive from.

    Read from the SEG itself so the SR says exactly what the SEG says. The segment of a frame is named per
    frame, or once in the shared functional groups when all frames belong to one segment (highdicom 0.28's
    ``ReferencedSegment.from_segmentation`` misses that second layout, hence this reader).
    """
    shared = getattr(segmentation, "SharedFunctionalGroupsSequence", [None])[0]
    shared_segment = None
    if shared is not None and "SegmentIdentificationSequence" in shared:
        shared_segment = int(shared.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    sources: dict[int, list[tuple[str, str]]] = {}
    for frame in getattr(segmentation, "PerFrameFunctionalGroupsSequence", []):
        if "SegmentIdentificationSequence" in frame:
            number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        elif shared_segment is not None:
            number = shared_segment
        else:
            raise ValueError("a DICOM SEG frame names no segment")
        listed = sources.setdefault(number, [])
        for derivation in getattr(frame, "DerivationImageSequence", []):
            for source in getattr(derivation, "SourceImageSequence", []):
                ref = (str(source.ReferencedSOPClassUID), str(source.ReferencedSOPInstanceUID))
                if ref not in listed:
                    listed.append(ref)
    return sources


def segment_reference(segmentation: Dataset, segment_number: int, ct_series_uid: str,
                       sources: dict[int, list[tuple[str, str]]]) -> hd.sr.ReferencedSegment:
    """Reference to one SEG segment with the source slices it covers; a segment without stored frames (a
    finding without voxels) can only name the source series."""
    images = sources.get(segment_number)
    return hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=segment_number,
        source_images=[hd.sr.SourceImageForSegmentation(referenced_sop_class_uid=c, referenced_sop_instance_uid=i)
                       for c, i in images] if images else None,
        source_series=None if images else hd.sr.SourceSeriesForSegmentation(ct_series_uid),
    )


def build_dicom_sr(findings: ScanFindings, segmentation: Dataset,
                   source_headers: Sequence[Dataset]) -> hd.sr.Comprehensive3DSR:
    """The SR dataset; ``segmentation`` is the SEG written for the same findings (segment number = id)."""
    if not findings.findings:
        raise ExportSkipped("DICOM SR", "no findings (a TID 1500 report needs at least one measurement group)")
    segments = {int(s.SegmentNumber): s for s in segmentation.SegmentSequence}
    missing = [f.id for f in findings.findings if f.id not in segments]
    if missing:
        raise ValueError(f"the DICOM SEG has no segment for finding(s) {missing}")
    algorithm = hd.sr.AlgorithmIdentification(name=MODEL_NAME, version=algorithm_version(findings))
    ct_series_uid = str(source_headers[0].SeriesInstanceUID)
    sources = source_images_by_segment(segmentation)
    groups = []
    for f in sorted(findings.findings, key=lambda f: f.id):
        sites = [hd.sr.FindingSite(anatomic_location=SITE_CODES[f.site or "lung"],
                                   laterality=LATERALITY[f.side] if f.side else None)]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(segments[f.id].TrackingUID),
                                                         identifier=_tracking_text(f)),
            referenced_segment=segment_reference(segmentation, f.id, ct_series_uid, sources),
            finding_type=codes.SCT.Nodule,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=_measurements(f, algorithm),
        ))
    return sr_document(groups, [*source_headers, segmentation])


def build_no_findings_sr(findings: ScanFindings, source_headers: Sequence[Dataset]) -> hd.sr.Comprehensive3DSR:
    """The SR of a scan in which nothing scored at least the threshold (module doc)."""
    if findings.findings:
        raise ValueError("build_no_findings_sr is for a scan without findings")
    algorithm = hd.sr.AlgorithmIdentification(name=MODEL_NAME, version=algorithm_version(findings))
    threshold = "" if findings.threshold is None else f" scoring >= {findings.threshold:g}"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{NO_FINDINGS_IDENTIFIER}{threshold}"),
        finding_type=codes.SCT.Nodule,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=codes.DCM.CADProcessingAndFindingsSummary, value=codes.DCM.AllAlgorithmsSucceededWithoutFindings)],
    )
    return sr_document([group], list(source_headers))


def sr_document(groups: list, evidence: list[Dataset], *, series_number: int = SR_SERIES_NUMBER,
              series_description: str = SR_SERIES_DESCRIPTION) -> hd.sr.Comprehensive3DSR:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MODEL_NAME, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        **new_series_attributes(series_number, series_description),
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def write_dicom_sr(findings: ScanFindings, hu: Volume, segmentation: Dataset | str | Path | None, path: str | Path, *,
                   source_headers: Sequence[Dataset] | None = None) -> Path:
    """Write ``sr.dcm`` for a scan read from DICOM, referencing ``segmentation`` (the SEG dataset or its file;
    None for a scan without findings, whose SR says "no findings").

    Raises :class:`ExportSkipped` for non-DICOM input.
    """
    require_dicom_source(hu, "DICOM SR")
    if not findings.findings:
        headers = list(source_headers) if source_headers is not None else read_source_headers(hu, "DICOM SR")
        return save_dataset(build_no_findings_sr(findings, headers), path)
    if segmentation is None:
        raise ValueError("a DICOM SR of findings references their DICOM SEG: give it")
    if not isinstance(segmentation, Dataset):
        seg_path = Path(segmentation)
        try:
            segmentation = pydicom.dcmread(seg_path)
        except Exception as exc:  # noqa: BLE001 - a missing/damaged SEG file is a clear user-facing problem
            raise InputError(seg_path, f"cannot read the DICOM SEG to reference ({exc})") from None
    headers = list(source_headers) if source_headers is not None else read_source_headers(hu, "DICOM SR")
    return save_dataset(build_dicom_sr(findings, segmentation, headers), path)
