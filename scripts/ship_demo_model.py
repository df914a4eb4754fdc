"""Ship the demo model: ``src/nodulenet/weights/demo.pt``, its lineage (``demo_lineage.json``) and ``MODEL_CARD.md``.

The demo model is trained in stages, each continuing from the last one's weights. ``demo_lineage.json`` records every
stage (config, command, data, hardware, training time, validation FROC); the card is written from it and from the
held-out benchmark records, so every figure on the card comes from a file.

    # record a finished (or stopped) training run as a stage; its figures come from the run's last.pt
    .venv/bin/python scripts/ship_demo_model.py add-stage --name "stage 4" --run runs/gpu/run2 \\
        --config configs/train_demo_gpu2.yaml --init "stage 3 last.pt" --data "..." --hardware "..." --summary "..."
    # export the weights to ship (best.pt of the last stage), calibrate its operating point, write the card
    .venv/bin/python scripts/ship_demo_model.py ship --weights runs/gpu/run2/best.pt \\
        --calibrate-cases runs/gpu/data/calib_adult --fp-per-scan 0.25 \\
        --heldout benchmarks/results/demo_model_quality.json --heldout benchmarks/results/demo_model_quality_2000.json

The operating point (``nodulenet.train.calibrate``): the nodule logit is shifted so that score 0.5, predict's default
threshold, lets through ``--fp-per-scan`` false positives per scan on the calibration cases; the ranking, and so
FROC and CPM, do not change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "nodulenet" / "weights"
LINEAGE = WEIGHTS / "demo_lineage.json"
RATES = ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0")


def _read_lineage() -> dict[str, Any]:
    return json.loads(LINEAGE.read_text())


def _write_json(path: Path, data: Any) -> None:
    from nodulenet.io.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def add_stage(args: argparse.Namespace) -> None:
    """Append (or replace, by name) one stage, its figures read from the run's ``last.pt`` training state."""
    import torch

    last = torch.load(args.run / "last.pt", map_location="cpu", weights_only=False)
    state = last["extra"]["train_state"]
    train = last["extra"]["train_config"]
    config_json = json.loads((args.run / "config.json").read_text())
    steps_per_epoch = config_json["resolved"]["steps_per_epoch"]
    finished = state["epoch"] >= train["epochs"]
    stage = {
        "name": args.name, "config": args.config, "init": args.init,
        "command": args.command or config_json.get("command", "?"),
        "summary": args.summary, "data": args.data, "hardware": args.hardware,
        "train_minutes": round(state["train_seconds"] / 60, 1),
        "epochs": train["epochs"], "global_step": state["global_step"], "samples_seen": state["samples_seen"],
        "stopped": None if finished else (
            f"stopped after {state['epoch']} of {train['epochs']} epochs" if state["step_in_epoch"] == 0 else
            f"stopped in epoch {state['epoch']} at step {state['step_in_epoch']} of {steps_per_epoch}"),
        "best_epoch": state["best_epoch"], "best_cpm": state["best_cpm"],
        "validation": f"{len(config_json['cases']['val'])} whole cases" if config_json.get("cases") else "none",
        "history": [{k: h[k] for k in ("epoch", "cpm", "n_candidates", "sensitivities_at")}
                    for h in state.get("history", [])],
    }
    lineage = _read_lineage()
    lineage["stages"] = [s for s in lineage["stages"] if s["name"] != args.name] + [stage]
    _write_json(LINEAGE, lineage)
    print(f"{args.name}: {stage['train_minutes']} min, {stage['global_step']} steps, best CPM {stage['best_cpm']}"
          f"{'; ' + stage['stopped'] if stage['stopped'] else ''} -> {LINEAGE}")


def _froc_rows(stage: dict[str, Any]) -> list[str]:
    rows = []
    for entry in stage["history"]:
        sens = " / ".join(f"{entry['sensitivities_at'][r]:.3f}" for r in RATES)
        rows.append(f"| {stage['name']} | {entry['epoch']} | {entry['cpm']:.4f} | {entry['n_candidates']} | {sens} |")
    return rows


def ship(args: argparse.Namespace) -> None:
    """Export ``--weights`` (a training checkpoint) as demo.pt and write the card from the lineage."""
    import torch

    from nodulenet.infer.weights import load_model
    from nodulenet.io.atomic import write_text_atomic
    from nodulenet.train.calibrate import apply_logit_shift
    from nodulenet.train.checkpoint_files import export_model

    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=False)
    if "prepare_config" not in (checkpoint.get("extra") or {}):
        raise SystemExit(f"{args.weights} records no prepare_config: predict could not repeat its preprocessing")
    state = checkpoint["extra"].get("train_state") or {}
    operating_point = None
    if args.calibrate_cases is not None:
        operating_point = _calibrate(args.weights, args.calibrate_cases, args.fp_per_scan)
        apply_logit_shift(checkpoint["state_dict"], operating_point.logit_shift)
        checkpoint["extra"]["operating_point"] = {**operating_point.to_dict(),
                                                  "calibration_cases_root": str(args.calibrate_cases)}
    out = export_model(checkpoint, WEIGHTS / "demo.pt")
    shipped = load_model(out, "cpu")  # loading it the way predict does proves it loads and gives its digest
    sha = shipped.weights_sha256
    size_mib = out.stat().st_size / 2**20
    n_params = sum(int(p.numel()) for p in shipped.model.parameters())
    lineage = _read_lineage()
    stages = lineage["stages"]
    last = stages[-1]
    total_minutes = sum(s["train_minutes"] for s in stages)

    lines = [
        "# NoduleNet demo model (`demo.pt`)",
        "",
        "**Research software. Not trained on patient-level clinical data; not for diagnosis.** This model is not a "
        "medical device and must not be used to make clinical decisions. It exists so that `nodulenet demo` and "
        "`nodulenet predict` run out of the box and show the whole chain; it is far from the published NoduleNet's "
        "accuracy on LIDC-IDRI.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `demo.pt`, {size_mib:.1f} MiB, sha256 `{sha}` |",
        f"| network | NoduleNet, quarter width (`model: tiny`), {n_params:,} parameters |",
        f"| weights | `{args.weights.name}` of {last['name']}: the best validation epoch ({state.get('best_epoch')}, "
        f"CPM {state.get('best_cpm', float('nan')):.4f} on {last['validation']}) |",
        "| preprocessing | published defaults (1 mm, HU -1200..600 to 0..255, pad 170), recorded in the checkpoint "
        "(`extra.prepare_config`) |",
        f"| training time | {total_minutes:.0f} min in all: "
        + ", ".join(f"{s['name']} {s['train_minutes']:.0f} min" for s in stages) + " |",
    ]
    if operating_point is not None:
        op = operating_point
        lines.append(
            f"| operating point | score 0.5 (predict's default threshold) = {op.fp_per_scan:g} false positives per scan "
            f"on {op.n_scans} calibration cases ({op.cases[0]} .. {op.cases[-1]} under `{args.calibrate_cases}`, used "
            f"for nothing else): the nodule logit is lowered by {op.logit_shift:.3f}, which keeps the ranking (FROC, CPM) "
            f"and moves 0.5 from {op.false_positives_at_half_before} to {op.false_positives_at_half} false positives "
            f"on them (sensitivity {op.sensitivity_at_half_before:.3f} -> {op.sensitivity_at_half:.3f}, "
            f"{op.n_nodules} nodules) |")
    for record_path in args.heldout:
        record = json.loads(record_path.read_text())
        fig = record["figures"]
        seeds = fig["seeds"]
        lines.append(f"| held-out phantoms | **CPM {fig['cpm']:.3f}** on {len(seeds)} phantoms never used in training "
                     f"or validation (seeds {seeds[0]}..{seeds[-1]}), {fig['n_hits']}/{fig['n_nodules']} nodules hit, "
                     f"{fig['n_false_positives']} false positives at threshold 0.05, through the whole `nodulenet "
                     f"predict` path (`benchmarks/demo_model_quality.py`, {record['time_utc']}) |")
    lines += ["", "## Stages", "", "Each stage starts from the weights named under *init*; the data are built by "
              "`configs/train_demo.sh` (stages 1-2) and by the commands in the header of each stage's config.", ""]
    for s in stages:
        lines += [f"### {s['name']}", "", "| | |", "|---|---|",
                  f"| config | `{s['config']}`: {s['summary']} |",
                  f"| init | {s['init'] or 'random'} |",
                  f"| command | `{s['command']}` |",
                  f"| data | {s['data']} |",
                  f"| hardware | {s['hardware']} |",
                  f"| training time | {s['train_minutes']:.0f} min |"
                  + (f" ({s['stopped']})" if s.get("stopped") else "")]
        if s.get("best_cpm") is not None:
            lines.append(f"| best validation CPM | {s['best_cpm']:.4f} (epoch {s['best_epoch']}, {s['validation']}) |")
        lines.append("")
    lines += ["## Validation FROC over training", "",
              "Sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan (LUNA16 rules, whole validation "
              "cases; each stage has its own validation cases):", "",
              "| stage | epoch | CPM | candidates | sensitivities |", "|---|---|---|---|---|"]
    for s in stages:
        lines += _froc_rows(s)
    lines += [
        "",
        "Known limits: trained on synthetic nodules in mostly synthetic chests and the two LIDC-IDRI patients in "
        "`../shared/data`, with small crops; expect false positives and missed nodules on real scans. Train on "
        "LIDC-IDRI with `configs/train_published.yaml` for research use. LIDC-IDRI images: The Cancer Imaging "
        "Archive (TCIA), CC BY 3.0.",
        "",
    ]
    card = write_text_atomic(WEIGHTS / "MODEL_CARD.md", "\n".join(lines))
    print(f"wrote {out} ({size_mib:.1f} MiB, sha256 {sha[:16]}...) and {card}")


def _calibrate(weights: Path, cases_root: Path, fp_per_scan: float) -> Any:
    import torch

    from nodulenet.data.cases import find_case_dirs, load_cases
    from nodulenet.infer.weights import load_model
    from nodulenet.train.calibrate import calibrate_operating_point

    report = load_cases(find_case_dirs([cases_root]))
    if report.problems or not report.cases:
        raise SystemExit(f"calibration cases under {cases_root}: {len(report.cases)} loaded, problems {report.problems}")
    torch.set_num_threads(2)
    op = calibrate_operating_point(load_model(weights, "cpu").model, report.cases, fp_per_scan)
    print(f"operating point: logit shift {op.logit_shift:.3f}; at 0.5 {op.false_positives_at_half_before} -> "
          f"{op.false_positives_at_half} false positives, sensitivity {op.sensitivity_at_half_before:.3f} -> "
          f"{op.sensitivity_at_half:.3f} on {op.n_scans} cases")
    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    add = sub.add_parser("add-stage", help="record a training run as a stage of the demo model")
    add.add_argument("--name", required=True)
    add.add_argument("--run", type=Path, required=True, help="the run folder (its last.pt and config.json)")
    add.add_argument("--config", required=True, help="the training config, as a repository path")
    add.add_argument("--init", default=None, help="where its weights started")
    add.add_argument("--command", default=None, help="the training command (default: the run's config.json)")
    add.add_argument("--summary", required=True, help="what the config does, in a sentence")
    add.add_argument("--data", required=True)
    add.add_argument("--hardware", required=True)
    add.set_defaults(func=add_stage)
    shp = sub.add_parser("ship", help="export the weights and write MODEL_CARD.md")
    shp.add_argument("--weights", type=Path, required=True, help="training checkpoint to ship (best.pt)")
    shp.add_argument("--heldout", type=Path, action="append", default=[], help="demo_model_quality record(s)")
    shp.add_argument("--calibrate-cases", type=Path, default=None, help="prepared cases to set the operating point on")
    shp.add_argument("--fp-per-scan", type=float, default=0.25, help="false positives per scan that score >= 0.5")
    shp.set_defaults(func=ship)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
