"""Tables of a benchmark run: the per-fold and overall FROC table (rich for the terminal, Markdown for
``results.md``), the segmentation table of the LIDC protocol, and the time per stage per scan."""

from __future__ import annotations

from statistics import mean
from typing import Any

from rich.console import Console
from rich.table import Table

from nodulenet.evaluate import CPM_FP_RATES


def froc_summary(result: Any) -> dict[str, Any]:
    """The figures of one FROC result that go into ``results.json``."""
    return {
        "cpm": result.cpm,
        "cpm_ci95": None if result.cpm_ci is None else list(result.cpm_ci),
        "sensitivities_at": {f"{rate:g}": result.sensitivities_at[rate] for rate in CPM_FP_RATES},
        "n_scans": result.n_scans, "n_nodules": result.n_nodules, "n_hits": result.n_hits,
        "n_false_positives": result.n_false_positives, "n_candidates": result.n_candidates,
        "n_bootstrap": result.n_bootstrap,
    }


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [*((f"fold {f['fold']}", f) for f in results["folds"]), ("all folds", results["overall"])]


def _cells(entry: dict[str, Any]) -> list[str]:
    if entry.get("cpm") is None:
        return [str(entry.get("n_scans", "")), "-", *["-"] * len(CPM_FP_RATES), "no nodule", ""]
    ci = entry.get("cpm_ci95")
    return [str(entry["n_scans"]), str(entry["n_nodules"]),
            *(f"{entry['sensitivities_at'][f'{r:g}']:.3f}" for r in CPM_FP_RATES),
            f"{entry['cpm']:.3f}", "" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"]


HEADER = ["", "scans", "nodules", *(f"{r:g} FP" for r in CPM_FP_RATES), "CPM", "95% CI"]


def luna_table_markdown(results: dict[str, Any]) -> str:
    lines = [f"# {results['dataset']}: {results['protocol']}", "",
             "Sensitivity at 1/8 .. 8 false positives per scan, CPM (their mean) and its bootstrap 95% CI "
             "(scans resampled).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for name, entry in _rows(results):
        lines.append("| " + " | ".join([name, *_cells(entry)]) + " |")
    return "\n".join(lines) + "\n"


def print_luna_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{results['dataset']}: {results['protocol']}")
    for column in HEADER:
        table.add_column(column, justify="right")
    for name, entry in _rows(results):
        table.add_row(name, *_cells(entry), style="bold" if name == "all folds" else None)
    console.print(table)


def timings_per_scan(stages: dict[str, Any], n_folds: int) -> dict[str, Any]:
    """Mean seconds per scan of preparation and of each prediction stage, and training seconds per fold."""
    out: dict[str, Any] = {}
    prepare = stages.get("prepare", {}).get("case_seconds", {})
    if prepare:
        out["prepare_s_per_scan"] = round(mean(prepare.values()), 2)
    per_stage: dict[str, list[float]] = {}
    for i in range(n_folds):
        for seconds in stages.get(f"fold_{i}.predict", {}).get("scan_seconds", {}).values():
            for name, value in seconds.items():
                per_stage.setdefault(name, []).append(float(value))
    out["predict_s_per_scan"] = {name: round(mean(v), 3) for name, v in per_stage.items()}
    out["train_s_per_fold"] = [stages.get(f"fold_{i}.train", {}).get("seconds") for i in range(n_folds)]
    return out


def seg_table_markdown(results: dict[str, Any]) -> str:
    """The LIDC Dice/IoU table (NoduleNet paper, Table 2 layout)."""
    lines = [f"# {results['dataset']}: {results['protocol']}", "",
             "Per-nodule Dice and IoU (mean +- sd); 'missed as 0' counts every reference nodule, 'detected only' "
             "leaves out nodules with no overlapping prediction.", "",
             "| readers | nodules | missed | Dice (missed as 0) | IoU (missed as 0) | Dice (detected only) | "
             "IoU (detected only) |", "|---|---|---|---|---|---|---|"]
    for key, entry in results["segmentation"].items():
        def ms(d: dict[str, Any]) -> str:
            return "-" if d.get("mean") is None else f"{d['mean']:.3f} +- {d['sd']:.3f}"

        zero, detected = entry["missed_as_zero"], entry["detected_only"]
        lines.append(f"| {key} | {entry['n_nodules']} | {entry['n_missed']} | {ms(zero['dice'])} | {ms(zero['iou'])} | "
                     f"{ms(detected['dice'])} | {ms(detected['iou'])} |")
    return "\n".join(lines) + "\n"
