"""A self-contained ``report.html`` for people: what was found, where, how big, with pictures.

Everything is in the one file: PNG pictures are embedded as base64 data URIs, the style sheet is inline,
there is no script and no external link, so the file can be mailed or archived as it is. Every string that
comes from the input (patient name and id, paths, UIDs) is HTML-escaped.

Pictures: for each finding a whole-slice axial overview with the finding ringed
(:func:`nodulenet.export.figures.overview_figure_png`) next to an axial and a coronal crop at lung window with its
outline (:func:`nodulenet.export.figures.nodule_figure_png`; conventions there).

Every finding names its centre slice as a PACS does (DICOM image number, else z in mm) and where it is (lung
side, or flagged: outside the lungs, bone). The best detections BELOW the score threshold are listed after the
findings in a separate table marked as such (they are not findings; nothing else is written for them), so a
report of "0 findings" still shows what came closest.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet.export.figures import nodule_figure_png, overview_figure_png
from nodulenet.io.atomic import write_text_atomic
from nodulenet.io.findings import NoduleFinding, ScanFindings
from nodulenet.io.volume import Volume

DISCLAIMER = "NoduleNet is research software, not a medical device; not for diagnosis."
LIDC_CREDIT = "LIDC-IDRI images: The Cancer Imaging Archive (TCIA), CC BY 3.0"


def is_lidc_source(findings: ScanFindings, hu: Volume | None = None) -> bool:
    """True when the scan is an LIDC-IDRI case (patient id, or a path component, starts with LIDC-IDRI)."""
    ids = [findings.source.patient_id or ""]
    if hu is not None:
        ids.append(str(hu.meta.get("patient_id") or ""))
    if any(i.upper().startswith("LIDC-IDRI") for i in ids):
        return True
    return any(part.upper().startswith("LIDC-IDRI") for part in Path(findings.source.path).parts)


def html_text(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def _type_text(f: Any) -> str:
    if f.nodule_type is None:
        return "n/a"
    text = f.nodule_type.replace("_", "-")
    return f"{text}, solid {f.solid_component_mm:.1f} mm" if f.solid_component_mm is not None else text


def number_text(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _triplet(values: Sequence[float], digits: int = 1) -> str:
    return "(" + ", ".join(f"{v:.{digits}f}" for v in values) + ")"


REPORT_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 70em; }
.disclaimer { border: 2px solid #b71c1c; background: #ffebee; color: #b71c1c; font-weight: bold;
              padding: 0.6em 1em; font-size: 1.15em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
td.text, th.text { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
dd { margin: 0; word-break: break-all; }
.nodule img { max-width: 100%; vertical-align: top; margin-right: 0.5em; }
.flag { color: #b71c1c; font-weight: bold; }
.below { border: 2px dashed #888; padding: 0 1em; color: #444; }
.credit { color: #555; font-size: 0.9em; }
"""


def _slice_cell(f: NoduleFinding, n_slices: int) -> str:
    return "unknown" if f.centre_slice is None else html_text(f.centre_slice.describe(n_slices))


def _where_cell(f: NoduleFinding) -> str:
    text = html_text(f.location_text)
    return text if f.site in (None, "lung") else f'<span class="flag">{text}</span>'


def _below_threshold_section(findings: ScanFindings, n_slices: int) -> list[str]:
    """The best detections under the threshold, apart from the findings and marked as not being findings."""
    below = sorted(findings.below_threshold, key=lambda f: (-f.score, f.id))
    if not below:
        return []
    threshold = "the threshold" if findings.threshold is None else f"{findings.threshold:g}"
    rows = [f"<tr><td>{f.score:.3f}</td><td class=\"text\">{_slice_cell(f, n_slices)}</td>"
            f"<td class=\"text\">{_triplet(f.center_world_xyz_mm)}</td><td class=\"text\">{_where_cell(f)}</td></tr>"
            for f in below]
    return [
        '<div class="below">',
        f"<h2>Below the threshold: not findings ({len(below)})</h2>",
        f"<p>The {len(below)} highest-scoring candidate(s) that scored less than {html_text(threshold)}. They are NOT "
        "reported as nodules (no outline, no DICOM SEG segment); they are listed so that a reader can look at "
        "what the model came closest to reporting.</p>",
        "<table>", "<thead><tr><th>Score</th><th class=\"text\">Centre slice</th>"
        "<th class=\"text\">World centre x, y, z (mm, LPS)</th><th class=\"text\">Where</th></tr></thead>",
        "<tbody>", *rows, "</tbody>", "</table>", "</div>",
    ]


def render_report_html(findings: ScanFindings, hu: Volume, label_array: np.ndarray, *, lidc: bool | None = None) -> str:
    """The report as one HTML string (see the module doc)."""
    findings = findings.with_centre_slices(hu.meta)
    src = findings.source
    model = findings.model
    header_rows = [
        ("Source", src.path), ("Format", src.format), ("Patient ID", src.patient_id),
        ("Patient name", src.patient_name), ("Study date", src.study_date),
        ("Series Instance UID", src.series_instance_uid), ("Study Instance UID", src.study_instance_uid),
        ("Model", f"{model.name} {model.version or ''}".strip()),
        ("Weights SHA-256", model.weights_sha256), ("Config SHA-256", model.config_sha256),
        ("Score threshold", None if findings.threshold is None else f"{findings.threshold:g}"),
        ("NoduleNet version", findings.nodulenet_version), ("Created (UTC)", findings.created_utc),
    ]
    ordered = sorted(findings.findings, key=lambda f: f.id)
    n_slices = hu.shape_zyx[0]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>NoduleNet report: {html_text(src.patient_id or Path(src.path).name)}</title>",
        f"<style>{REPORT_STYLE}</style>", "</head>", "<body>",
        "<h1>NoduleNet lung nodule report</h1>",
        f'<p class="disclaimer">{html_text(DISCLAIMER)}</p>',
        "<dl>",
        *(f"<dt>{html_text(k)}</dt><dd>{html_text(v) if v not in (None, '') else 'unknown'}</dd>" for k, v in header_rows),
        "</dl>",
        f"<h2>Findings ({len(ordered)})</h2>",
    ]
    if not ordered:
        threshold = "" if findings.threshold is None else f" with a score of at least {findings.threshold:g}"
        parts.append(f"<p>No nodule was found{html_text(threshold)}.</p>")
    else:
        parts += [
            "<table>", "<thead><tr>",
            "<th>ID</th><th>Score</th><th>Long axis (mm)</th><th>Equivalent diameter (mm)</th>"
            "<th>Volume (mm&sup3;)</th><th>Mean HU</th><th class=\"text\">World centre x, y, z (mm, LPS)</th>"
            "<th class=\"text\">Voxel centre z, y, x</th><th class=\"text\">Where</th>"
            "<th class=\"text\">Centre slice</th><th class=\"text\">Type</th><th>Mean diameter (mm)</th>",
            "</tr></thead>", "<tbody>",
        ]
        for f in ordered:
            parts.append(
                f"<tr><td>{f.id}</td><td>{f.score:.3f}</td><td>{number_text(f.diameter_mm)}</td>"
                f"<td>{number_text(f.equivalent_diameter_mm)}</td><td>{number_text(f.volume_mm3, 0)}</td>"
                f"<td>{number_text(f.mean_hu, 0)}</td>"
                f"<td class=\"text\">{_triplet(f.center_world_xyz_mm)}</td>"
                f"<td class=\"text\">{_triplet(f.center_zyx)}</td>"
                f"<td class=\"text\">{_where_cell(f)}</td>"
                f"<td class=\"text\">{_slice_cell(f, n_slices)}</td>"
                f"<td class=\"text\">{html_text(_type_text(f))}</td><td>{number_text(f.mean_diameter_mm)}</td></tr>"
            )
        parts += ["</tbody>", "</table>",
                  "<p>Centre slice: the DICOM image number (InstanceNumber) and z position of the slice through "
                  "the centre, as a PACS shows them (for non-DICOM input, the slice counted from the first "
                  "and its z). Type: solid, part-solid (with its solid component's mean diameter) or ground glass, "
                  "from the HU inside the mask. Long axis: longest in-plane diameter over the scan's slices, measured "
                  "to the voxel edges; mean diameter: (long + short axis) / 2 as Lung-RADS measures. Where: the patient's side, from the body midline; findings whose centre is outside the "
                  "lungs or on bone are flagged.</p>"]
        for f in ordered:
            overview = base64.b64encode(overview_figure_png(hu, label_array, f)).decode("ascii")
            png = base64.b64encode(nodule_figure_png(hu, label_array, f)).decode("ascii")
            parts += [f'<div class="nodule"><h3>Nodule {f.id}</h3>',
                      f'<img src="data:image/png;base64,{overview}" alt="Nodule {f.id}: whole axial slice">',
                      f'<img src="data:image/png;base64,{png}" alt="Nodule {f.id}: axial and coronal views">',
                      "</div>"]
    parts += _below_threshold_section(findings, n_slices)
    if lidc if lidc is not None else is_lidc_source(findings, hu):
        parts.append(f'<p class="credit">{html_text(LIDC_CREDIT)}</p>')
    parts += [f'<p class="credit">{html_text(DISCLAIMER)}</p>', "</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(findings: ScanFindings, hu: Volume, label_map: np.ndarray | Volume | None, path: str | Path, *,
                 lidc: bool | None = None) -> Path:
    """Write ``report.html`` (atomic). ``label_map`` (array or Volume on ``hu``'s grid, value = finding id)
    defaults to the findings' masks painted on the grid; ``lidc`` forces the LIDC-IDRI credit line on/off
    (default: detected from the patient id / path)."""
    from nodulenet.export.labelmap import label_array_from_findings

    if label_map is None:
        labels = label_array_from_findings(findings.findings, hu.shape_zyx)
    else:
        labels = np.asarray(label_map.array if isinstance(label_map, Volume) else label_map)
    if tuple(labels.shape) != hu.shape_zyx:
        raise ValueError(f"label map {labels.shape} is not on the scan grid {hu.shape_zyx}")
    return write_text_atomic(path, render_report_html(findings, hu, labels, lidc=lidc))
