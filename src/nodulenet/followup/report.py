"""``comparison.html``: the follow-up reading for people, one self-contained file (as ``report.html`` is).

A summary (interval, registration, Lung-RADS exam category with its rule, the decision-aid notice), a table of
every nodule (status, type, sizes at both times, change, volume doubling time, Lung-RADS), and for each nodule
its axial and coronal crops at both times side by side (prior left, current right), drawn by the report's own
:func:`nodulenet.export.figures.nodule_figure_png`. Input strings are HTML-escaped; no script, no link.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from nodulenet.export.figures import nodule_figure_png
from nodulenet.export.labelmap import label_array_from_findings
from nodulenet.export.report import DISCLAIMER, LIDC_CREDIT, REPORT_STYLE, html_text, is_lidc_source, number_text
from nodulenet.io.atomic import write_text_atomic

_STATUS_TEXT = {"persistent": "persistent", "new": "NEW", "resolved": "resolved (not seen now)"}


def _picture(tp: Any, labels: Any, finding_id: int | None) -> str:
    if finding_id is None:
        return "<td class='text'>not present</td>"
    finding = tp.findings.by_id(finding_id)
    png = nodule_figure_png(tp.hu, labels, finding)
    return f"<td><img alt='finding {finding_id}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></td>"


def _size(side: dict[str, Any] | None) -> str:
    if side is None:
        return "-"
    solid = f", solid {side['solid_component_mm']:.1f}" if side.get("solid_component_mm") is not None else ""
    return f"{side['mean_diameter_mm']:.1f} mm{solid}; {number_text(side['volume_mm3'], 0)} mm&sup3;"


def comparison_html(comparison: dict[str, Any], prior: Any, current: Any) -> str:
    labels = {id(tp): label_array_from_findings(tp.findings.findings, tp.hu.shape_zyx) for tp in (prior, current)}
    exam = comparison["lung_rads"]["exam"]
    reg = comparison["registration"]
    rows, pictures = [], []
    for k, n in enumerate(comparison["nodules"], start=1):
        side = n["current"] or n["prior"]
        lr = n.get("lung_rads") or {}
        vdt = n.get("volume_doubling_time_days")
        rows.append(
            f"<tr><td>{k}</td><td class='text'>{html_text(_STATUS_TEXT[n['status']])}</td>"
            f"<td class='text'>{html_text(side['nodule_type'].replace('_', '-'))}</td>"
            f"<td class='text'>{_size(n['prior'])}</td><td class='text'>{_size(n['current'])}</td>"
            f"<td>{number_text(n.get('mean_diameter_change_mm'))}</td><td>{number_text(n.get('volume_change_percent'), 0)}</td>"
            f"<td>{'n/a' if vdt is None else f'{vdt:.0f}'}</td>"
            f"<td class='text'>{html_text(lr.get('category', '-'))} {html_text(lr.get('rule', ''))}</td></tr>")
        prior_id = n["prior"]["finding_id"] if n["prior"] else None
        current_id = n["current"]["finding_id"] if n["current"] else None
        pictures.append(f"<h3>Nodule {k}: {html_text(_STATUS_TEXT[n['status']])}</h3><table><tr><th>prior</th>"
                        f"<th>current</th></tr><tr>{_picture(prior, labels[id(prior)], prior_id)}"
                        f"{_picture(current, labels[id(current)], current_id)}</tr></table>")
    lidc = any(is_lidc_source(tp.findings, tp.hu) for tp in (prior, current))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>NoduleNet follow-up comparison</title>
<style>{REPORT_STYLE}</style></head><body>
<p class="disclaimer">{html_text(DISCLAIMER)} {html_text(comparison['notice'])}.</p>
<h1>Follow-up comparison</h1>
<table>
<tr><th class="text">prior</th><td class="text">{html_text(comparison['prior']['scan'])} ({html_text(comparison['prior']['study_date'] or 'no date')})</td></tr>
<tr><th class="text">current</th><td class="text">{html_text(comparison['current']['scan'])} ({html_text(comparison['current']['study_date'] or 'no date')})</td></tr>
<tr><th class="text">interval</th><td class="text">{comparison['interval_days']:.0f} days ({html_text(comparison['interval_source'])})</td></tr>
<tr><th class="text">patient</th><td class="text">{html_text(comparison['patient_identity'])}</td></tr>
<tr><th class="text">registration</th><td class="text">lung overlap (Dice) {reg['lung_dice_before']:.3f} before, {reg['lung_dice_after']:.3f} after</td></tr>
<tr><th class="text">Lung-RADS v2022 (exam)</th><td class="text"><b>{html_text(exam['category'])}</b>: {html_text(exam['rule'])}</td></tr>
</table>
<table><tr><th>#</th><th class="text">status</th><th class="text">type</th><th class="text">prior (mean diameter; volume)</th>
<th class="text">current</th><th>&Delta; mean diameter (mm)</th><th>&Delta; volume (%)</th><th>VDT (days)</th>
<th class="text">Lung-RADS</th></tr>
{''.join(rows) or "<tr><td colspan='9' class='text'>no nodule in either scan</td></tr>"}
</table>
{''.join(pictures)}
{f'<p>{html_text(LIDC_CREDIT)}</p>' if lidc else ''}
</body></html>
"""


def write_comparison_html(comparison: dict[str, Any], prior: Any, current: Any, path: str | Path) -> Path:
    return write_text_atomic(path, comparison_html(comparison, prior, current))
