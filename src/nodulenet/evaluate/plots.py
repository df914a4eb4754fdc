"""Plots of evaluation results, drawn off-screen (matplotlib's Agg canvas, no pyplot, no display).

The FROC plot follows the LUNA16 script's figure: FPs per scan on a log-2 axis from 1/8 to 8 with ticks at
the seven CPM rates, sensitivity 0..1 in steps of 0.1, the curve as a solid line, the bootstrap interval as a
shaded band between dotted bounds and the bootstrap mean dashed. The CPM rates are marked with dots.
Figures are built on a ``Figure`` object rather than pyplot, so drawing is safe from worker threads and
leaves no global state behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nodulenet.io.atomic import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from nodulenet.evaluate.froc import FrocResult


def plot_froc(result: FrocResult, path: str | Path, *, title: str = "FROC performance", dpi: int = 150) -> Path:
    """Draw ``result`` into a PNG at ``path`` (written atomically) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    from nodulenet.evaluate.froc import CONFIDENCE, CPM_FP_RATES, FROC_GRID_MAX_FPS, FROC_GRID_MIN_FPS

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colour = "tab:blue"
    ax.plot(result.fps_per_scan, result.sensitivities, color=colour, lw=2, label=f"CPM {result.cpm:.3f}")
    if result.ci_low is not None and result.ci_high is not None:
        ax.fill_between(result.fps_per_scan, result.ci_low, result.ci_high, facecolor=colour, alpha=0.15,
                        label=f"{CONFIDENCE:.0%} CI (bootstrap over scans, n={result.n_bootstrap_used})")
        ax.plot(result.fps_per_scan, result.ci_low, color=colour, ls=":", lw=1)
        ax.plot(result.fps_per_scan, result.ci_high, color=colour, ls=":", lw=1)
        if result.bootstrap_mean is not None:
            ax.plot(result.fps_per_scan, result.bootstrap_mean, color=colour, ls="--", lw=1, label="bootstrap mean")
    rates = np.asarray(CPM_FP_RATES)
    ax.plot(rates, [result.sensitivities_at[r] for r in CPM_FP_RATES], "o", color=colour, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlim(FROC_GRID_MIN_FPS, FROC_GRID_MAX_FPS)
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(FixedLocator(list(rates)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{r:g}" for r in rates])
    ax.set_yticks(np.arange(0.0, 1.01, 0.1))
    ax.grid(True, which="both", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"{title} ({result.n_scans} scans, {result.n_nodules} nodules)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return target


def write_froc_outputs(result: FrocResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``froc.json`` (atomic) and ``froc.png`` (log-2 FP axis, CI band) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out / "froc.json", result.to_dict())
    png_path = plot_froc(result, out / "froc.png")
    return {"json": json_path, "png": png_path}
