"""A quick-look picture of a prepared case, for people: does the lung mask fit, are the nodules where they
should be?

Conventions: arrays ``(z, y, x)`` of the prepared case (uint8 image, lung labels 1/2 = lungs, 3 = kept
margin, nodule instance labels). Axial panels are shown as stored (row ``y`` down, column ``x`` right,
which for the usual LPS direction is the radiological view: patient's right on the left of the picture);
the coronal panel puts the head at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nodulenet.io.atomic import atomic_path  # noqa: E402

LUNG_COLOUR = "#00e5ff"
KEPT_COLOUR = "#ffd54f"
NODULE_COLOUR = "#ff1744"
EXCLUDED_COLOUR = "#ff9100"
MAX_AXIAL_PANELS = 3


def _axial_slices(
    shape_zyx: Sequence[int], lungs: np.ndarray, nodules: Sequence[dict[str, Any]], excluded: Sequence[dict[str, Any]]
) -> list[tuple[int, str]]:
    """Slice indices to show: through up to three nodules (kept ones first), else spread over the lungs."""
    picks: list[tuple[int, str]] = []
    tagged = [(n, "nodule") for n in nodules] + [(n, "excluded") for n in excluded if n.get("inside_crop", True)]
    for n, kind in tagged[:MAX_AXIAL_PANELS]:
        z = int(np.clip(round(float(n["center_zyx"][0])), 0, shape_zyx[0] - 1))
        size = f"{float(n['diameter_mm']):.1f} mm" if n.get("diameter_mm") is not None else "size unknown"
        picks.append((z, f"axial z={z}: {kind} {n['id']} ({size})"))
    if not picks:
        occupied = np.nonzero(lungs.any(axis=(1, 2)))[0]
        lo, hi = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, shape_zyx[0] - 1)
        for frac in (0.25, 0.5, 0.75):
            z = int(round(lo + frac * (hi - lo)))
            picks.append((z, f"axial z={z} (no nodule)"))
    return picks


def _outline(ax: Any, mask: np.ndarray, colour: str, style: str = "solid", width: float = 0.8) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.uint8), levels=[0.5], colors=[colour], linewidths=width, linestyles=style)


def _excluded_circles(ax: Any, excluded: Sequence[dict[str, Any]], axis: int, index: int,
                      spacing_zyx: Sequence[float]) -> None:
    """Excluded nodules have no mask: draw the cut of their sphere through this slice, dashed."""
    from matplotlib.patches import Ellipse

    other = [a for a in range(3) if a != axis]  # (row axis, column axis) of the panel
    for n in excluded:
        if n.get("diameter_mm") is None:
            continue
        c = np.asarray(n["center_zyx"], dtype=float)
        r_mm = float(n["diameter_mm"]) / 2.0
        off_mm = (index - c[axis]) * spacing_zyx[axis]
        if abs(off_mm) >= r_mm:
            continue
        cut = np.sqrt(r_mm**2 - off_mm**2)
        width, height = 2 * cut / spacing_zyx[other[1]], 2 * cut / spacing_zyx[other[0]]
        ax.add_patch(Ellipse((c[other[1]], c[other[0]]), width, height, fill=False, edgecolor=EXCLUDED_COLOUR,
                             linestyle="--", linewidth=1.0))


def render_overlay(
    image: np.ndarray,
    lung_labels: np.ndarray,
    nodule_labels: np.ndarray,
    nodules: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    excluded: Sequence[dict[str, Any]] = (),
    title: str = "",
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    head_at_last_slice: bool = True,
    credit: str = "",
) -> Path:
    """Write a PNG: axial slices through the nodules (or through the lungs) and one coronal slice, with
    lung outline (cyan), kept-region outline (dashed yellow), nodule outlines (red) and excluded nodules
    (dashed orange circles of their diameter; they have no mask). ``credit`` is printed in the footer
    beside the research-software notice (images of public data sets must credit their source). Atomic."""
    if not (image.shape == lung_labels.shape == nodule_labels.shape):
        raise ValueError("image, lung labels and nodule labels must share one (z, y, x) shape")
    lungs = (lung_labels == 1) | (lung_labels == 2)
    kept = lung_labels > 0
    panels = _axial_slices(image.shape, lungs, nodules, excluded)
    n_cols = len(panels) + 1
    fig, axes = plt.subplots(1, n_cols, figsize=(4.2 * n_cols, 4.8), dpi=100)
    dz, dy, dx = (float(s) for s in spacing_zyx)

    for ax, (z, label) in zip(axes[:-1], panels):
        ax.imshow(image[z], cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect=dy / dx)
        _outline(ax, lungs[z], LUNG_COLOUR)
        _outline(ax, kept[z], KEPT_COLOUR, "dashed", 0.7)
        _outline(ax, nodule_labels[z] > 0, NODULE_COLOUR, width=1.2)
        _excluded_circles(ax, excluded, 0, z, spacing_zyx)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()

    # Coronal slice through the first nodule's row, else through the middle of the lungs.
    if nodules or excluded:
        y = int(np.clip(round(float((list(nodules) + list(excluded))[0]["center_zyx"][1])), 0, image.shape[1] - 1))
    else:
        rows = np.nonzero(lungs.any(axis=(0, 2)))[0]
        y = int(rows[rows.size // 2]) if rows.size else image.shape[1] // 2
    ax = axes[-1]
    origin = "lower" if head_at_last_slice else "upper"
    ax.imshow(image[:, y, :], cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect=dz / dx, origin=origin)
    for mask, colour, style, width in (
        (lungs[:, y, :], LUNG_COLOUR, "solid", 0.8),
        (kept[:, y, :], KEPT_COLOUR, "dashed", 0.7),
        (nodule_labels[:, y, :] > 0, NODULE_COLOUR, "solid", 1.2),
    ):
        # contour's default puts element [0, 0] at data (0, 0), as imshow does with either origin.
        _outline(ax, mask, colour, style, width)
    _excluded_circles(ax, excluded, 1, y, spacing_zyx)
    ax.set_title(f"coronal y={y}", fontsize=9)
    ax.set_axis_off()

    fig.suptitle(
        f"{title}   lung (cyan), kept region (dashed yellow), nodules (red), excluded nodules (dashed orange)".strip(),
        fontsize=10,
    )
    footer = "NoduleNet - research software, not a medical device."
    fig.text(0.5, 0.005, f"{footer}  {credit}".strip(), ha="center", va="bottom", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return target
