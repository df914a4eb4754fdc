"""``nodulenet compare PRIOR CURRENT -o OUT`` as a function: two scans (or two result folders) of one patient in,
``comparison.json`` and ``comparison.html`` out.

Each time point is either a scan (DICOM folder, .mhd, .nii.gz, .nrrd: predicted here into ``OUT/prior`` and
``OUT/current`` with one loaded model) or a folder ``nodulenet predict`` wrote (its ``nodules.json`` and label
map are read; the scan it names must still be there, since the comparison reads its images). Then:

1. the same patient? (PatientID when both scans carry one; refused unless ``force``), and the interval (DICOM
   StudyDate of both, or ``interval_days``; a missing date without it is refused);
2. the lungs of both scans, the fields of view checked to overlap, and the prior registered onto the current
   (:mod:`.registration`);
3. every finding typed and measured (:mod:`nodulenet.export.nodule_type`), the prior's centres mapped into the current scan
   and the nodules paired (:mod:`.matching`);
4. per nodule: new / resolved / persistent, both sizes, the changes, the volume doubling time
   ``VDT = interval x ln 2 / ln(V_current / V_prior)`` (only for a nodule whose volume grew), Lung-RADS growth and
   the Lung-RADS v2022 category (:mod:`.lung_rads`), and the exam's category.

``comparison.json`` (schema :data:`SCHEMA`) is written atomically, as is ``comparison.html``; when both exams were
read from DICOM, also ``comparison_sr.dcm``, a TID 1500 SR of the changes in the current study
(:mod:`.comparison_sr`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

import nodulenet
from nodulenet.errors import InputError, NoduleNetError
from nodulenet.followup.lung_rads import (DECISION_AID, LungRadsInput, exam_category, lung_rads_growth,
                                          nodule_category)
from nodulenet.followup.matching import match_nodules
from nodulenet.export.nodule_type import NoduleComposition, nodule_composition
from nodulenet.followup.registration import RegistrationError, register_scans
from nodulenet.io.atomic import ensure_output_folder, write_json_atomic
from nodulenet.io.findings import NoduleFinding, ScanFindings, find_results_json, read_findings_json
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

SCHEMA = "nodulenet.comparison/1"
TRANSFORM_FILE = "current_to_prior.tfm"  # the registration, for the viewer (ITK: fixed = current -> moving = prior)
COMPARISON_SR = "comparison_sr.dcm"  # written when both exams are DICOM (:mod:`.comparison_sr`)
MIN_FIELD_OVERLAP = 0.3  # of the shorter lung extent along the body axis


class PatientMismatchError(NoduleNetError):
    """The two scans carry different PatientIDs (compare them anyway with ``--force``)."""


@dataclass(frozen=True)
class CompareOptions:
    interval_days: float | None = None  # overrides the study dates
    force: bool = False  # compare scans of different PatientIDs
    predict: Any = None  # nodulenet.predict_api.PredictOptions for scans given as images (None: defaults)


@dataclass
class TimePoint:
    """One exam: its findings (with masks), its HU volume and where they came from."""

    findings: ScanFindings
    hu: Volume
    result_dir: Path
    lungs: np.ndarray | None = None
    compositions: list[NoduleComposition] = field(default_factory=list)


@dataclass
class ComparisonResult:
    out_dir: Path
    json_path: Path
    html_path: Path
    comparison: dict[str, Any]
    sr_path: Path | None = None  # comparison_sr.dcm, when both exams were read from DICOM


# ------------------------------------------------------------------------------------------------ inputs


def result_folder(path: Path) -> Path | None:
    """The folder holding ``nodules.json`` when ``path`` is a predict output (its ``nodules.json``, its folder, or a
    ``predict -o`` folder with one scan: :func:`~nodulenet.io.findings.find_results_json`); None for a scan."""
    is_result = path.name == "nodules.json" or (path.is_dir() and (
        (path / "nodules.json").is_file() or any(path.glob("*/nodules.json"))))
    return find_results_json(path).parent if is_result else None


def _load_result(folder: Path) -> TimePoint:
    from nodulenet.export.labelmap import LABEL_MAP_SUFFIXES, attach_masks_from_label_map
    from nodulenet.io.scan import read_scan

    findings = read_findings_json(folder / "nodules.json")
    labels_path = next((folder / f"labels{s}" for s in LABEL_MAP_SUFFIXES if (folder / f"labels{s}").is_file()), None)
    if findings.findings and labels_path is None:
        raise InputError(folder, "has nodules.json but no label map (labels.nii.gz / .nii / .nrrd): the nodules' "
                                 "masks are needed to measure them")
    scan = Path(findings.source.path)
    if not scan.exists():
        raise InputError(folder, f"the scan it was made from ({scan}) is not there; the comparison reads its images")
    hu = read_scan(scan, findings.source.series_instance_uid if findings.source.format == "dicom" else None)
    if labels_path is not None:
        try:
            findings = attach_masks_from_label_map(findings, read_scan(labels_path))
        except ValueError as exc:
            raise InputError(labels_path, str(exc)) from None
    return TimePoint(findings, hu, folder)


def _time_point(path: Path, folder: Path | None, out: Path, predictor: Any) -> TimePoint:
    """The exam at ``path``: its result ``folder`` when it is one, else the scan predicted into ``out``."""
    if folder is None:
        from nodulenet.predict_api import predict_scans
        from nodulenet.infer.cohort import Shard

        run = predict_scans([path], out, shard=Shard(rank=0, world_size=1, local_rank=0), predictor=predictor)
        result = run.results[0]
        if result.status == "failed":
            raise InputError(path, f"prediction failed: {result.error}")
        folder = Path(result.out_dir)
    return _load_result(folder)


def _study_date(tp: TimePoint) -> date | None:
    text = tp.findings.source.study_date
    if not text:
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        logger.warning("%s: StudyDate %r is not YYYYMMDD; ignored", tp.result_dir, text)
        return None


def _interval(prior: TimePoint, current: TimePoint, interval_days: float | None) -> tuple[float, str]:
    if interval_days is not None:
        if not interval_days > 0:
            raise NoduleNetError(f"--interval-days must be a positive number of days, got {interval_days}")
        return float(interval_days), "--interval-days"
    dates = (_study_date(prior), _study_date(current))
    if None in dates:
        which = " and ".join(name for name, d in zip(("prior", "current"), dates) if d is None)
        raise NoduleNetError(f"the {which} scan has no study date (DICOM StudyDate), so the interval is unknown: "
                             "give it with --interval-days N")
    days = (dates[1] - dates[0]).days  # type: ignore[operator]
    if days <= 0:
        raise NoduleNetError(f"the current study ({dates[1]}) is not after the prior ({dates[0]}): swap PRIOR and "
                             "CURRENT, or give --interval-days")
    return float(days), "StudyDate"


def _check_patient(prior: TimePoint, current: TimePoint, force: bool) -> str:
    a, b = prior.findings.source.patient_id, current.findings.source.patient_id
    if a and b and a != b:
        if not force:
            raise PatientMismatchError(f"the scans are of different patients (PatientID {a!r} and {b!r}); compare "
                                       "them anyway with --force")
        return f"different PatientIDs ({a!r}, {b!r}), compared with --force"
    return "same PatientID" if a and b else "not checked (a scan carries no PatientID)"


def _world_extent(volume: Volume, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (LPS mm) of a mask's voxels."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array([[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])], float)
    world = np.asarray([volume.geometry.voxel_to_world(c) for c in corners])
    return world.min(axis=0), world.max(axis=0)


def _check_fields_overlap(prior: TimePoint, current: TimePoint) -> float:
    (plo, phi), (clo, chi) = (_world_extent(tp.hu, tp.lungs > 0) for tp in (prior, current))  # type: ignore[operator]
    overlap = min(phi[2], chi[2]) - max(plo[2], clo[2])
    shorter = min(phi[2] - plo[2], chi[2] - clo[2])
    fraction = max(0.0, overlap) / max(shorter, 1e-6)
    if fraction < MIN_FIELD_OVERLAP:
        raise RegistrationError(
            f"the fields of view do not overlap: the prior's lungs span z {plo[2]:.0f}..{phi[2]:.0f} mm, the current's "
            f"{clo[2]:.0f}..{chi[2]:.0f} mm ({100 * fraction:.0f} % of the shorter in common, at least "
            f"{100 * MIN_FIELD_OVERLAP:.0f} % needed)")
    return fraction


# ------------------------------------------------------------------------------------------------ per nodule


def volume_doubling_time_days(prior_mm3: float, current_mm3: float, interval_days: float) -> float | None:
    """``interval x ln 2 / ln(V_current / V_prior)``; None when the volume did not grow (no doubling time)."""
    if not (prior_mm3 > 0 and current_mm3 > prior_mm3):
        return None
    return float(interval_days * math.log(2.0) / math.log(current_mm3 / prior_mm3))


def _describe(tp: TimePoint, index: int, mapped_xyz: np.ndarray | None = None) -> dict[str, Any]:
    f: NoduleFinding = tp.findings.findings[index]
    c = tp.compositions[index]
    d: dict[str, Any] = {
        "finding_id": f.id, "score": round(f.score, 4),
        "center_world_xyz_mm": [round(v, 2) for v in f.center_world_xyz_mm],
        "long_axis_mm": round(c.long_axis_mm, 1), "short_axis_mm": round(c.short_axis_mm, 1),
        "mean_diameter_mm": c.mean_diameter_mm, "volume_mm3": None if f.volume_mm3 is None else round(f.volume_mm3, 1),
        "nodule_type": c.nodule_type, "solid_component_mm": c.solid_component_mm,
        "ground_glass_fraction": round(c.ground_glass_fraction, 3),
    }
    if mapped_xyz is not None:
        d["center_in_current_xyz_mm"] = [round(float(v), 2) for v in mapped_xyz]
    return d


def _compose(tp: TimePoint) -> None:
    masked = [f for f in tp.findings.findings if f.mask is not None]
    if len(masked) != len(tp.findings.findings):
        raise InputError(tp.result_dir, "a finding has no mask in the label map: it cannot be measured")
    tp.compositions = [nodule_composition(f.mask, tp.hu.array, tp.hu.spacing_zyx, tp.hu.direction)
                       for f in tp.findings.findings]


def _lung_rads_input(current: NoduleComposition, encounter: str, prior: NoduleComposition | None = None,
                     interval_days: float | None = None) -> tuple[LungRadsInput, bool]:
    growing = False
    if prior is not None and interval_days is not None:
        if current.nodule_type == "part_solid" and prior.solid_component_mm is not None:
            growing = lung_rads_growth(prior.solid_component_mm, current.solid_component_mm or 0.0, interval_days)
        else:
            growing = lung_rads_growth(prior.mean_diameter_mm, current.mean_diameter_mm, interval_days)
    return LungRadsInput(current.nodule_type, current.mean_diameter_mm, encounter, current.solid_component_mm,
                         growing, None if prior is None else prior.mean_diameter_mm,
                         None if prior is None else prior.solid_component_mm, interval_days), growing


def compare_time_points(prior: TimePoint, current: TimePoint, interval_days: float, *,
                        identity: str = "not checked", interval_source: str = "given",
                        transform_path: Path | None = None) -> dict[str, Any]:
    """The comparison of two loaded exams (the part of :func:`compare_scans` after reading): a JSON-able dict.

    ``transform_path``: where to save the registration (an ITK ``.tfm`` mapping current-scan points to prior-scan
    points, named in ``registration.transform_file`` relative to its folder), for the viewer's linked crosshairs.
    """
    from nodulenet.preprocess.lung_mask import segment_lungs

    for tp in (prior, current):
        if tp.lungs is None:
            tp.lungs = segment_lungs(tp.hu).lungs
        _compose(tp)
    overlap = _check_fields_overlap(prior, current)
    registration = register_scans(current.hu, prior.hu, current.lungs, prior.lungs)  # type: ignore[arg-type]
    summary = registration.summary()
    if transform_path is not None:
        registration.write(transform_path)
        summary["transform_file"] = Path(transform_path).name
        summary["transform_maps"] = "current-scan points (LPS mm) to prior-scan points"
    prior_centres = np.asarray([f.center_world_xyz_mm for f in prior.findings.findings], dtype=np.float64)
    mapped = registration.prior_to_current(prior_centres) if len(prior_centres) else np.zeros((0, 3))
    current_centres = np.asarray([f.center_world_xyz_mm for f in current.findings.findings], dtype=np.float64)
    pairs = match_nodules(mapped, [c.mean_diameter_mm for c in prior.compositions], current_centres,
                          [c.mean_diameter_mm for c in current.compositions])
    nodules: list[dict[str, Any]] = []
    assessments = []
    for pair in pairs:
        entry: dict[str, Any] = {}
        if pair.prior is not None and pair.current is not None:
            p, c = prior.compositions[pair.prior], current.compositions[pair.current]
            pv = prior.findings.findings[pair.prior].volume_mm3 or 0.0
            cv = current.findings.findings[pair.current].volume_mm3 or 0.0
            lr_input, growing = _lung_rads_input(c, "persistent", p, interval_days)
            entry = {"status": "persistent", "distance_mm": round(pair.distance_mm or 0.0, 2),
                     "prior": _describe(prior, pair.prior, mapped[pair.prior]), "current": _describe(current, pair.current),
                     "mean_diameter_change_mm": round(c.mean_diameter_mm - p.mean_diameter_mm, 1),
                     "volume_change_mm3": round(cv - pv, 1),
                     "volume_change_percent": None if pv <= 0 else round(100.0 * (cv - pv) / pv, 1),
                     "volume_doubling_time_days": _rounded(volume_doubling_time_days(pv, cv, interval_days)),
                     "lung_rads_growth": growing}
        elif pair.current is not None:
            lr_input, _ = _lung_rads_input(current.compositions[pair.current], "new")
            entry = {"status": "new", "prior": None, "current": _describe(current, pair.current)}
        else:
            entry = {"status": "resolved", "prior": _describe(prior, pair.prior, mapped[pair.prior]),  # type: ignore[index]
                     "current": None, "lung_rads": None}
            nodules.append(entry)
            continue
        assessment = nodule_category(lr_input)
        assessments.append(assessment)
        entry["lung_rads"] = assessment.to_dict()
        nodules.append(entry)
    prior_exam = exam_category([nodule_category(_lung_rads_input(c, "baseline")[0]) for c in prior.compositions])
    counts = {s: sum(n["status"] == s for n in nodules) for s in ("persistent", "new", "resolved")}
    return {
        "schema": SCHEMA,
        "nodulenet_version": nodulenet.__version__,
        "notice": f"{DECISION_AID}. NoduleNet is research software, not a medical device.",
        "prior": _exam(prior), "current": _exam(current),
        "patient_identity": identity,
        "interval_days": interval_days, "interval_source": interval_source,
        "field_of_view_overlap": round(overlap, 3),
        "registration": summary,
        "counts": counts,
        "nodules": nodules,
        "lung_rads": {"version": "v2022", "exam": exam_category(assessments).to_dict(),
                      "prior_exam_as_baseline": prior_exam.to_dict()},
    }


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _exam(tp: TimePoint) -> dict[str, Any]:
    s = tp.findings.source
    # Absolute, so that `nodulenet viewer --compare OUT` finds the folders from anywhere.
    return {"result_dir": str(tp.result_dir.resolve()), "scan": s.path, "study_date": s.study_date,
            "patient_id": s.patient_id,
            "series_instance_uid": s.series_instance_uid, "n_findings": len(tp.findings.findings),
            "threshold": tp.findings.threshold}


def compare_scans(prior: str | Path, current: str | Path, out_dir: str | Path,
                  options: CompareOptions | None = None) -> ComparisonResult:
    """Compare two exams of one patient (module doc); writes ``comparison.json`` and ``comparison.html``."""
    from nodulenet.followup.report import write_comparison_html

    options = options or CompareOptions()
    prior_path, current_path = Path(prior), Path(current)
    for path in (prior_path, current_path):
        if not path.exists():
            raise InputError(path, "does not exist")
    folders = [result_folder(prior_path), result_folder(current_path)]
    predictor = None
    if None in folders:  # a scan to predict: one model for both
        from nodulenet.predict_api import PredictOptions, Predictor

        predictor = Predictor(options.predict or PredictOptions())
    out = ensure_output_folder(out_dir)
    tp_prior = _time_point(prior_path, folders[0], out / "prior", predictor)
    tp_current = _time_point(current_path, folders[1], out / "current", predictor)
    identity = _check_patient(tp_prior, tp_current, options.force)
    interval, source = _interval(tp_prior, tp_current, options.interval_days)
    comparison = compare_time_points(tp_prior, tp_current, interval, identity=identity, interval_source=source,
                                     transform_path=out / TRANSFORM_FILE)
    json_path = write_json_atomic(out / "comparison.json", comparison)
    html_path = write_comparison_html(comparison, tp_prior, tp_current, out / "comparison.html")
    sr_path = None
    if all(tp.findings.source.format == "dicom" for tp in (tp_prior, tp_current)):
        from nodulenet.followup.comparison_sr import write_comparison_sr

        sr_path = write_comparison_sr(comparison, tp_current.findings, tp_current.hu, tp_current.result_dir,
                                      out / COMPARISON_SR)
    return ComparisonResult(out, json_path, html_path, comparison, sr_path)


__all__ = ["CompareOptions", "ComparisonResult", "PatientMismatchError", "SCHEMA", "TimePoint", "compare_scans",
           "compare_time_points", "result_folder", "volume_doubling_time_days"]
