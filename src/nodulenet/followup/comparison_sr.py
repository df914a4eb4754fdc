"""The follow-up comparison as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report, written with highdicom).

Written by ``nodulenet compare`` as ``comparison_sr.dcm`` when both exams were read from DICOM. It belongs to the
CURRENT study (its patient and study attributes come from the current series' slices; a new series), references
the current series' images and, when the current result folder has one, its DICOM SEG (``seg.dcm``).

Content (one measurement group per compared nodule, then one for the exam):

- a nodule still seen on the current scan (persistent, new) whose SEG segment exists: a TID 1411 volumetric group
  referencing that segment (the same reference :mod:`nodulenet.export.dicom_sr` builds); otherwise (resolved, or
  no SEG): a TID 1501 group. Tracking identifier "Nodule <current id> (persistent)", "Prior nodule <id>
  (resolved)", ...;
- qualitative evaluations (coded): the status (new / resolved / persistent) and the Lung-RADS v2022 category;
- measurements with UCUM units: current and prior mean diameter (SCT Diameter, derivation Mean; mm), current and
  prior volume (SCT Volume; mm3), the volume change (mm3, and %), the volume doubling time ("d"); each only when
  known;
- text: the Lung-RADS rule that decided the category, and that it is a decision aid;
- the exam group: the exam's Lung-RADS category, its rule, the interval and its source, the prior study, and the
  decision-aid notice.

Concepts DICOM has no code for (the status, "prior", the change, the doubling time, the Lung-RADS category) use
the private coding scheme :data:`SCHEME` ("99" prefix: a local scheme, PS3.16 section 8.2) and say so in their
meanings. The document is COMPLETE, UNVERIFIED and not final: it is a decision aid no person has checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from nodulenet.errors import InputError
from nodulenet.export.dicom_source import MODEL_NAME, algorithm_version, read_source_headers, save_dataset
from nodulenet.export.dicom_sr import (UNIT_MM, UNIT_MM3, UNIT_PERCENT, sr_document, segment_reference,
                                       source_images_by_segment)
from nodulenet.io.findings import ScanFindings
from nodulenet.io.volume import Volume

SCHEME = "99NODULENET"
SERIES_NUMBER = 9003
SERIES_DESCRIPTION = "NoduleNet follow-up (decision aid, research, not diagnostic)"
UNIT_DAY = codes.UCUM.Day
STATUS_MEANINGS = {"new": "New nodule", "resolved": "Resolved nodule", "persistent": "Persistent nodule"}


def code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of NoduleNet's local coding scheme."""
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


STATUS = code("STATUS", "Follow-up status")
LUNG_RADS = code("LUNGRADS2022", "Lung-RADS v2022 category")
LUNG_RADS_RULE = code("LUNGRADSRULE", "Lung-RADS rule applied")
PRIOR_DIAMETER = code("PRIORDIAM", "Mean diameter on the prior exam")
PRIOR_VOLUME = code("PRIORVOL", "Volume on the prior exam")
VOLUME_CHANGE = code("VOLCHANGE", "Volume change since the prior exam")
VOLUME_CHANGE_PERCENT = code("VOLCHANGEPCT", "Relative volume change since the prior exam")
DOUBLING_TIME = code("VDT", "Volume doubling time")
NOTICE = code("NOTICE", "Notice")
INTERVAL = code("INTERVAL", "Interval between the exams")
PRIOR_STUDY = code("PRIORSTUDY", "Prior study")


def status_code(status: str) -> hd.sr.CodedConcept:
    return code(status.upper(), STATUS_MEANINGS[status])


def category_code(category: str) -> hd.sr.CodedConcept:
    return code(f"LR{category}", f"Lung-RADS {category}")


def _measurement(name: Any, value: float | None, unit: Any, algorithm: hd.sr.AlgorithmIdentification,
                 derivation: Any = None) -> list[hd.sr.Measurement]:
    if value is None:
        return []
    return [hd.sr.Measurement(name=name, value=float(value), unit=unit, derivation=derivation, algorithm_id=algorithm)]


def _measurements(nodule: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    now, before = nodule.get("current") or {}, nodule.get("prior") or {}
    return [
        *_measurement(codes.SCT.Diameter, now.get("mean_diameter_mm"), UNIT_MM, algorithm, codes.SCT.Mean),
        *_measurement(codes.SCT.Volume, now.get("volume_mm3"), UNIT_MM3, algorithm),
        *_measurement(PRIOR_DIAMETER, before.get("mean_diameter_mm"), UNIT_MM, algorithm, codes.SCT.Mean),
        *_measurement(PRIOR_VOLUME, before.get("volume_mm3"), UNIT_MM3, algorithm),
        *_measurement(VOLUME_CHANGE, nodule.get("volume_change_mm3"), UNIT_MM3, algorithm),
        *_measurement(VOLUME_CHANGE_PERCENT, nodule.get("volume_change_percent"), UNIT_PERCENT, algorithm),
        *_measurement(DOUBLING_TIME, nodule.get("volume_doubling_time_days"), UNIT_DAY, algorithm),
    ]


def _add_text(group: Any, name: hd.sr.CodedConcept, value: str) -> None:
    """A TEXT item in the group's container (TID 1501/1411 carry free-text evaluations; highdicom builds only the
    coded ones, so this appends to the container it built)."""
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _tracking_text(nodule: dict[str, Any]) -> str:
    side, which = (nodule["current"], "Nodule") if nodule["current"] else (nodule["prior"], "Prior nodule")
    return f"{which} {side['finding_id']} ({nodule['status']})"


def _nodule_group(nodule: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification, segmentation: Dataset | None,
                  segments: dict[int, Dataset], sources: dict[int, list[tuple[str, str]]],
                  ct_series_uid: str) -> Any:
    evaluations = [hd.sr.QualitativeEvaluation(name=STATUS, value=status_code(nodule["status"]))]
    lung_rads = nodule.get("lung_rads")
    if lung_rads:
        evaluations.append(hd.sr.QualitativeEvaluation(name=LUNG_RADS, value=category_code(lung_rads["category"])))
    common: dict[str, Any] = dict(
        finding_type=codes.SCT.Nodule, algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=_measurements(nodule, algorithm), qualitative_evaluations=evaluations)
    current_id = nodule["current"]["finding_id"] if nodule["current"] else None
    if segmentation is not None and current_id in segments:
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(segments[current_id].TrackingUID),
                                                         identifier=_tracking_text(nodule)),
            referenced_segment=segment_reference(segmentation, current_id, ct_series_uid, sources),
            finding_category=codes.SCT.MorphologicallyAbnormalStructure, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_tracking_text(nodule)), **common)
    if lung_rads:
        _add_text(group, LUNG_RADS_RULE, lung_rads["rule"])
    return group


def _exam_group(comparison: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification) -> Any:
    exam = comparison["lung_rads"]["exam"]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Lung-RADS v2022 exam category"),
        algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=_measurement(INTERVAL, comparison["interval_days"], UNIT_DAY, algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=LUNG_RADS, value=category_code(exam["category"]))])
    _add_text(group, LUNG_RADS_RULE, exam["rule"])
    prior = comparison["prior"]
    _add_text(group, PRIOR_STUDY, f"StudyDate {prior.get('study_date') or 'unknown'}, series "
                                  f"{prior.get('series_instance_uid') or 'unknown'}; interval from "
                                  f"{comparison['interval_source']}")
    _add_text(group, NOTICE, comparison["notice"])
    return group


def build_comparison_sr(comparison: dict[str, Any], current: ScanFindings, source_headers: Sequence[Dataset],
                        segmentation: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR of ``comparison`` (a ``comparison.json`` dict) in the current exam's study (module doc).

    ``current`` is the current exam's findings (for the algorithm version), ``source_headers`` its series' slice
    headers, ``segmentation`` its SEG (segment number = finding id) or None.
    """
    algorithm = hd.sr.AlgorithmIdentification(name=MODEL_NAME, version=algorithm_version(current))
    segments = {} if segmentation is None else {int(s.SegmentNumber): s for s in segmentation.SegmentSequence}
    sources = {} if segmentation is None else source_images_by_segment(segmentation)
    ct_series_uid = str(source_headers[0].SeriesInstanceUID)
    groups = [_nodule_group(n, algorithm, segmentation, segments, sources, ct_series_uid)
              for n in comparison["nodules"]]
    groups.append(_exam_group(comparison, algorithm))
    evidence = [*source_headers, *([segmentation] if segmentation is not None else [])]
    return sr_document(groups, evidence, series_number=SERIES_NUMBER, series_description=SERIES_DESCRIPTION)


def write_comparison_sr(comparison: dict[str, Any], current: ScanFindings, current_hu: Volume, result_dir: Path,
                        path: str | Path) -> Path:
    """Write ``path`` for a current exam read from DICOM (``current_hu`` with the reader's meta); its SEG is
    ``result_dir/seg.dcm`` when that exists."""
    from nodulenet.export.api import SEG_DCM

    headers = read_source_headers(current_hu, "comparison DICOM SR")
    seg_path = Path(result_dir) / SEG_DCM
    segmentation = None
    if seg_path.is_file():
        try:
            segmentation = pydicom.dcmread(seg_path)
        except Exception as exc:  # noqa: BLE001 - a damaged SEG file is a clear user-facing problem
            raise InputError(seg_path, f"cannot read the DICOM SEG to reference ({exc})") from None
    return save_dataset(build_comparison_sr(comparison, current, headers, segmentation), path)


__all__ = ["SCHEME", "build_comparison_sr", "write_comparison_sr"]
