"""A self-contained ``report.html`` for people: what was found, where, how big, with pictures.

Everything is in the one file: PNG pictures are embedded as base64 data URIs, the style sheet is inline,
there is no script and no external link, so the file can be mailed or archived as it is. Every string that
comes from the input (patient name and id, paths, UIDs) is HTML-escaped.

Pictures (conventions, see DESIGN.md): for each finding an axial crop (the scan slice where its long axis
was measured; row ``y`` down, column ``x`` right, as stored) and a coronal crop (through the centre row,
head at the top) at lung window (width 1500, level -600 HU), with the finding's outline in red, other
findings' outlines dashed orange, the long axis as a yellow line, and the patient's side letters (R/L)
placed from the direction matrix: in LPS +x is the patient's LEFT.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nodulenet.io.atomic import write_text_atomic  # noqa: E402
from nodulenet.io.findings import NoduleFinding, ScanFindings  # noqa: E402
from nodulenet.io.volume import Volume  # noqa: E402

DISCLAIMER = "NoduleNet is research software, not a medical device; not for diagnosis."
LIDC_CREDIT = "LIDC-IDRI images: The Cancer Imaging Archive (TCIA), CC BY 3.0"
LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
OUTLINE_COLOUR = "#ff1744"
OTHER_COLOUR = "#ff9100"
AXIS_COLOUR = "#ffee58"
# A crop shows at least this many mm around the centre, or 1.5 x the nodule's long axis when larger.
MIN_CROP_HALF_MM = 25.0


def is_lidc_source(findings: ScanFindings, hu: Volume | None = None) -> bool:
    """True when the scan is an LIDC-IDRI case (patient id, or a path component, starts with LIDC-IDRI)."""
    ids = [findings.source.patient_id or ""]
    if hu is not None:
        ids.append(str(hu.meta.get("patient_id") or ""))
    if any(i.upper().startswith("LIDC-IDRI") for i in ids):
        return True
    return any(part.upper().startswith("LIDC-IDRI") for part in Path(findings.source.path).parts)


def _side_letters(direction_column: np.ndarray) -> tuple[str, str]:
    """(letter at the low-index end, letter at the high-index end) of an index axis, for the patient's
    left/right: the axis points to the patient's left when its world x component is positive (LPS)."""
    return ("R", "L") if direction_column[0] > 0 else ("L", "R")


def _crop_range(centre: float, half_voxels: int, size: int) -> tuple[int, int]:
    lo = int(max(0, round(centre) - half_voxels))
    hi = int(min(size, round(centre) + half_voxels + 1))
    return lo, hi


def _outline(ax: Any, mask: np.ndarray, colour: str, style: str = "solid", width: float = 1.2) -> None:
    """Draw the mask's outline along the voxel EDGES (as the measurements see the voxels), not through the
    voxel centres: contour a 4x nearest-neighbour upsampling, placed back on the voxel grid."""
    if not mask.any() or mask.all():
        return
    factor = 4
    fine = np.kron(mask.astype(np.uint8), np.ones((factor, factor), np.uint8))
    rows = (np.arange(fine.shape[0]) + 0.5) / factor - 0.5
    cols = (np.arange(fine.shape[1]) + 0.5) / factor - 0.5
    ax.contour(cols, rows, fine, levels=[0.5], colors=[colour], linewidths=width, linestyles=style)


def _side_label(ax: Any, x: float, text: str, align: str) -> None:
    ax.text(x, 0.5, text, transform=ax.transAxes, color="white", fontsize=10, fontweight="bold", va="center",
            ha=align, bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"})


def nodule_figure_png(hu: Volume, label_array: np.ndarray, finding: NoduleFinding) -> bytes:
    """PNG bytes: axial + coronal crops of one finding at lung window, outlines and long axis drawn."""
    dz, dy, dx = hu.spacing_zyx
    shape = hu.shape_zyx
    half_mm = max(MIN_CROP_HALF_MM, 1.5 * (finding.diameter_mm or 0.0))
    cz, cy, cx = finding.center_zyx
    z_axial = int(round(finding.long_axis_zyx[0][0])) if finding.long_axis_zyx else int(round(cz))
    z_axial = int(np.clip(z_axial, 0, shape[0] - 1))
    y_coronal = int(np.clip(round(cy), 0, shape[1] - 1))
    z0, z1 = _crop_range(cz, int(np.ceil(half_mm / dz)), shape[0])
    y0, y1 = _crop_range(cy, int(np.ceil(half_mm / dy)), shape[1])
    x0, x1 = _crop_range(cx, int(np.ceil(half_mm / dx)), shape[2])
    direction = hu.geometry.direction_matrix
    left_letter, right_letter = _side_letters(direction[:, 0])
    head_at_high_index = direction[2, 2] > 0  # the slice axis points superior (+z in LPS is the head)

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.8), dpi=100)
    vmin, vmax = LUNG_WINDOW_HU
    own = label_array == finding.id
    others = (label_array > 0) & ~own

    ax = axes[0]
    ax.imshow(hu.array[z_axial, y0:y1, x0:x1], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
              aspect=dy / dx)
    _outline(ax, others[z_axial, y0:y1, x0:x1], OTHER_COLOUR, "dashed", 0.9)
    _outline(ax, own[z_axial, y0:y1, x0:x1], OUTLINE_COLOUR)
    if finding.long_axis_zyx is not None:
        (_, ay, axx), (_, by, bx) = finding.long_axis_zyx
        ax.plot([axx - x0, bx - x0], [ay - y0, by - y0], color=AXIS_COLOUR, linewidth=1.0)
    long_axis = f"{finding.diameter_mm:.1f} mm" if finding.diameter_mm is not None else "n/a"
    ax.set_title(f"axial z={z_axial}   long axis {long_axis}", fontsize=9)

    ax = axes[1]
    origin = "lower" if head_at_high_index else "upper"
    ax.imshow(hu.array[z0:z1, y_coronal, x0:x1], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
              aspect=dz / dx, origin=origin)
    _outline(ax, others[z0:z1, y_coronal, x0:x1], OTHER_COLOUR, "dashed", 0.9)
    _outline(ax, own[z0:z1, y_coronal, x0:x1], OUTLINE_COLOUR)
    ax.set_title(f"coronal y={y_coronal}", fontsize=9)

    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        _side_label(ax, 0.01, left_letter, "left")
        _side_label(ax, 0.99, right_letter, "right")
    fig.suptitle(f"Nodule {finding.id}   score {finding.score:.3f}", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _e(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _triplet(values: Sequence[float], digits: int = 1) -> str:
    return "(" + ", ".join(f"{v:.{digits}f}" for v in values) + ")"


_STYLE = """
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
.nodule img { max-width: 100%; }
.credit { color: #555; font-size: 0.9em; }
"""


def render_report_html(findings: ScanFindings, hu: Volume, label_array: np.ndarray, *, lidc: bool | None = None) -> str:
    """The report as one HTML string (see the module doc)."""
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
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>NoduleNet report: {_e(src.patient_id or Path(src.path).name)}</title>",
        f"<style>{_STYLE}</style>", "</head>", "<body>",
        "<h1>NoduleNet lung nodule report</h1>",
        f'<p class="disclaimer">{_e(DISCLAIMER)}</p>',
        "<dl>",
        *(f"<dt>{_e(k)}</dt><dd>{_e(v) if v not in (None, '') else 'unknown'}</dd>" for k, v in header_rows),
        "</dl>",
        f"<h2>Findings ({len(ordered)})</h2>",
    ]
    if not ordered:
        threshold = "" if findings.threshold is None else f" with a score of at least {findings.threshold:g}"
        parts.append(f"<p>No nodule was found{_e(threshold)}.</p>")
    else:
        parts += [
            "<table>", "<thead><tr>",
            "<th>ID</th><th>Score</th><th>Long axis (mm)</th><th>Equivalent diameter (mm)</th>"
            "<th>Volume (mm&sup3;)</th><th>Mean HU</th><th class=\"text\">World centre x, y, z (mm, LPS)</th>"
            "<th class=\"text\">Voxel centre z, y, x</th><th class=\"text\">Side</th>",
            "</tr></thead>", "<tbody>",
        ]
        for f in ordered:
            side = {"right": "right lung", "left": "left lung"}.get(f.side or "", "unknown")
            parts.append(
                f"<tr><td>{f.id}</td><td>{f.score:.3f}</td><td>{_num(f.diameter_mm)}</td>"
                f"<td>{_num(f.equivalent_diameter_mm)}</td><td>{_num(f.volume_mm3, 0)}</td>"
                f"<td>{_num(f.mean_hu, 0)}</td>"
                f"<td class=\"text\">{_triplet(f.center_world_xyz_mm)}</td>"
                f"<td class=\"text\">{_triplet(f.center_zyx)}</td>"
                f"<td class=\"text\">{side}</td></tr>"
            )
        parts += ["</tbody>", "</table>",
                  "<p>Long axis: longest in-plane diameter over the scan's slices, measured to the voxel edges. "
                  "Side: the patient's side, from the body midline.</p>"]
        for f in ordered:
            png = base64.b64encode(nodule_figure_png(hu, label_array, f)).decode("ascii")
            parts += [f'<div class="nodule"><h3>Nodule {f.id}</h3>',
                      f'<img src="data:image/png;base64,{png}" alt="Nodule {f.id}: axial and coronal views">',
                      "</div>"]
    if lidc if lidc is not None else is_lidc_source(findings, hu):
        parts.append(f'<p class="credit">{_e(LIDC_CREDIT)}</p>')
    parts += [f'<p class="credit">{_e(DISCLAIMER)}</p>', "</body>", "</html>", ""]
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
