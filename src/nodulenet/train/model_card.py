"""A model card for a finished run, written from the run's own records (``config.json``, ``summary.json``).

It states what a user of the weights must know: the exact command, the data and split, the seed, how long it took on
which hardware, the validation FROC, the file's size, and that such a model is not for diagnosis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nodulenet.io.atomic import write_text_atomic
from nodulenet.machine import machine_info

DISCLAIMER = ("Research software. This model was not trained on patient-level clinical data; not for diagnosis. "
              "It is not a medical device and must not be used to make clinical decisions.")


def _cpm_table(history: list[dict[str, Any]]) -> list[str]:
    rows = ["| epoch | CPM | sens. @ 0.125 / 0.25 / 0.5 / 1 / 2 / 4 / 8 FPs per scan | nodules | cases |",
            "|---|---|---|---|---|"]
    for h in history:
        if h.get("cpm") is None:
            rows.append(f"| {h.get('epoch')} | n/a | {h.get('note', '')} | {h.get('n_nodules')} | {h.get('n_cases')} |")
            continue
        sens = " / ".join(f"{v:.3f}" for v in (h.get("sensitivities_at") or {}).values())
        rows.append(f"| {h['epoch']} | {h['cpm']:.4f} | {sens} | {h['n_nodules']} | {h['n_cases']} |")
    return rows


def write_model_card(run_dir: str | Path, title: str | None = None, notes: str = "") -> Path:
    """Write ``MODEL_CARD.md`` into ``run_dir`` from its ``config.json`` and ``summary.json``."""
    run = Path(run_dir)
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    train_cfg, resolved, model_cfg = config["train"], config["resolved"], config["model"]
    model_file = run / "model.pt"
    size_mb = model_file.stat().st_size / 1e6 if model_file.exists() else None
    hours = summary["train_seconds"] / 3600.0
    lines = [
        f"# {title or 'NoduleNet model: ' + run.name}",
        "",
        f"**{DISCLAIMER}**",
        "",
        "## What it is",
        f"- Network: NoduleNet ({model_cfg.get('name')}), {resolved['n_parameters']:,} parameters; "
        f"weights file `model.pt` ({size_mb:.1f} MB)" if size_mb else "- Network: NoduleNet",
        f"- Input: prepared cases (1 mm isotropic, lung-masked, uint8 HU window [-1200, 600]); output boxes "
        "(z0, y0, x0, z1, y1, x1) in voxels and masks, scores = RCNN nodule probability.",
        "",
        "## How it was trained",
        f"- Command: `{config.get('command') or 'see config.json'}`",
        f"- Data: {', '.join(train_cfg['prepared_roots'])}; split {train_cfg.get('split_file') or 'explicit lists'}; "
        f"{len(config['cases']['train'])} training cases ({config.get('n_train_nodules')} nodules), "
        f"{len(config['cases']['val'])} validation cases; {len(config.get('skipped_cases', []))} skipped.",
        f"- Training cases: {', '.join(config['cases']['train'])}",
        f"- Validation cases: {', '.join(config['cases']['val']) or 'none'}",
        f"- Seed {train_cfg['seed']}; {summary['epochs_completed']} epochs, {summary['global_step']} steps of "
        f"{train_cfg['batch_size']} crops of {'x'.join(map(str, train_cfg['crop']['crop_size_zyx']))} voxels; "
        f"optimizer {train_cfg['optimizer']} lr {resolved['base_lr']}; heads from epochs "
        f"{resolved['stage_start_epochs']}; AMP {resolved['amp_dtype']}.",
        f"- Time: {hours:.2f} h of training ({summary['samples_per_second']:.2f} crops/s) on "
        f"{json.dumps(machine_info())}, {resolved['world_size']} process(es).",
        "- Full settings: `config.json`; log: `train.log`; TensorBoard: `tensorboard/`.",
        "",
        "## Validation (LUNA16 FROC rules, whole cases, no bootstrap)",
        f"Best CPM {summary['best_cpm']:.4f} after epoch {summary['best_epoch']} (the shipped weights)."
        if summary.get("best_cpm") is not None else "No validation CPM (no validation cases with nodules).",
        "",
        *_cpm_table(summary.get("history") or []),
        "",
        "## Limits",
        "- Validated on the cases listed above only; performance on real clinical scans is unknown.",
        "- " + DISCLAIMER,
    ]
    if notes:
        lines += ["", "## Notes", notes]
    return write_text_atomic(run / "MODEL_CARD.md", "\n".join(lines) + "\n")
