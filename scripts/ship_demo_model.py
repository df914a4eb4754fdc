"""Ship a finished demo training run: ``src/nodulenet/weights/demo.pt`` and its ``MODEL_CARD.md``.

The card is generated from the run folders (``summary.json``: training time, best epoch, validation FROC of every
validation) and from the held-out benchmark record (``benchmarks/results/demo_model_quality.json``, made with
``benchmarks/demo_model_quality.py --weights <run>/best.pt``), so every figure on it comes from a file.

    .venv/bin/python scripts/ship_demo_model.py --stage1 runs/demo/run --stage2 runs/demo/run2 \
        [--heldout benchmarks/results/demo_model_quality.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "nodulenet" / "weights"
RATES = ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0")


def _froc_rows(history: list[dict[str, Any]], stage: str) -> list[str]:
    rows = []
    for entry in history:
        sens = " / ".join(f"{entry['sensitivities_at'][r]:.3f}" for r in RATES)
        rows.append(f"| {stage} | {entry['epoch']} | {entry['cpm']:.4f} | {entry['n_candidates']} | {sens} |")
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", type=Path, required=True)
    parser.add_argument("--stage2", type=Path, default=None)
    parser.add_argument("--heldout", type=Path, default=REPO / "benchmarks" / "results" / "demo_model_quality.json")
    args = parser.parse_args()

    import torch

    from nodulenet.infer.weights import load_model
    from nodulenet.io.atomic import write_text_atomic
    from nodulenet.machine import machine_info
    from nodulenet.train.checkpoint_files import export_model

    final = args.stage2 or args.stage1
    summaries = {"stage 1": json.loads((args.stage1 / "summary.json").read_text())}
    if args.stage2:
        summaries["stage 2"] = json.loads((args.stage2 / "summary.json").read_text())
    checkpoint = torch.load(final / "best.pt", map_location="cpu", weights_only=False)
    if "prepare_config" not in (checkpoint.get("extra") or {}):
        raise SystemExit(f"{final / 'best.pt'} records no prepare_config: predict could not repeat its preprocessing")
    out = export_model(checkpoint, WEIGHTS / "demo.pt")
    # Loading the shipped file the way predict does gives its digest and proves it loads.
    shipped = load_model(out, "cpu")
    sha = shipped.weights_sha256
    size_mib = out.stat().st_size / 2**20
    n_params = sum(int(p.numel()) for p in shipped.model.parameters())
    config = json.loads((final / "config.json").read_text())
    commands = {name: json.loads((run / "config.json").read_text()).get("command", "?")
                for name, run in (("stage 1", args.stage1), ("stage 2", args.stage2)) if run is not None}
    total_seconds = sum(s["train_seconds"] for s in summaries.values())
    best = summaries["stage 2" if args.stage2 else "stage 1"]
    heldout = json.loads(args.heldout.read_text()) if args.heldout.is_file() else None
    machine = machine_info()

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
        f"| network | NoduleNet, quarter width (`model: {config['train']['model']}`), {n_params:,} parameters |",
        f"| weights | the best validation epoch ({best['best_epoch']}) of the last stage |",
        "| data | `bash configs/train_demo.sh` builds it: small seeded phantom chests (seeds 100-135, 4 nodules each, "
        "five kinds, 3-30 mm) and LIDC-IDRI-0001/-0002 with 6 synthetic nodules inserted in their real lungs, their "
        "real nodules kept; 6 folds by patient (seed 0): fold 0 trains on 24 cases, validates on 7, and leaves a "
        "test group untouched |",
        "| preprocessing | published defaults (1 mm, HU -1200..600 to 0..255, pad 170), recorded in the checkpoint "
        "(`extra.prepare_config`) |",
    ]
    for name, command in commands.items():
        lines.append(f"| {name} command | `{command}` |")
    lines += [
        "| stage 1 | `configs/train_demo.yaml`: AdamW lr 1e-3, batch 4, 64^3 crops (70 % positive, 20 % lung, 10 % "
        "random), published stage order (RCNN from 1/3, mask from 2/5), seed 0 |",
    ]
    if args.stage2:
        lines.append("| stage 2 | `configs/train_demo_stage2.yaml`: from stage 1's best weights, every head from the "
                     "first step, AdamW lr 5e-4, hard negatives mined from the model's own false positives every 5 "
                     "epochs (15 % of crops), seed 1 |")
    lines += [
        f"| training time | {_minutes(total_seconds)} in all: "
        + ", ".join(f"{k} {_minutes(v['train_seconds'])}" for k, v in summaries.items())
        + f", on {machine.get('cpu', 'CPU')} ({machine.get('cpu_count', '?')} cores, 1 torch thread, shared with "
        f"other jobs), PyTorch {torch.__version__} |",
        f"| best validation CPM | **{best['best_cpm']:.4f}** (LUNA16 rules, 28 nodules in 7 whole validation cases) |",
    ]
    if heldout:
        fig = heldout["figures"]
        seeds = fig["seeds"]
        lines.append(f"| held-out phantoms | **CPM {fig['cpm']:.3f}** on {len(seeds)} phantoms never used in "
                     f"training (seeds {seeds[0]}..{seeds[-1]}), {fig['n_hits']}/{fig['n_nodules']} nodules hit, "
                     f"through the whole `nodulenet predict` path (`benchmarks/demo_model_quality.py`, "
                     f"{heldout['time_utc']}) |")
    lines += ["", "Validation FROC over training (sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per scan):", "",
              "| stage | epoch | CPM | candidates | sensitivities |", "|---|---|---|---|---|"]
    for name, summary in summaries.items():
        lines += _froc_rows(summary["history"], name)
    lines += [
        "",
        "Known limits: trained on synthetic nodules in mostly synthetic chests, small crops and about two hours of "
        "one CPU core; expect false positives and missed nodules on real scans. Stage 2's data were prepared before "
        "the lung-mask fix of 2026-11-25 (the second lung judged by its ratio to the first): in 3 of the 36 training "
        "phantoms (seeds 104, 105, 113) one lung was padded away with its nodules. Train on LIDC-IDRI with "
        "`configs/train_published.yaml` for research use. LIDC-IDRI images: The Cancer Imaging Archive (TCIA), "
        "CC BY 3.0.",
        "",
    ]
    card = write_text_atomic(WEIGHTS / "MODEL_CARD.md", "\n".join(lines))
    print(f"wrote {out} ({size_mib:.1f} MiB, sha256 {sha[:16]}...) and {card}")


if __name__ == "__main__":
    main()
