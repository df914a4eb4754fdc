"""Typer command functions of the training stage (registered by ``nodulenet.cli``; heavy imports inside).

- ``nodulenet train``: :func:`nodulenet.train.loop.train` (also under ``torchrun --nproc_per_node N -m nodulenet
  train ...`` for DDP);
- ``nodulenet make-splits``: k-fold cross-validation files by patient (:mod:`nodulenet.data.splits`);
- ``nodulenet prepare-phantoms``: phantom chest CTs written as prepared cases (:mod:`nodulenet.data.synthetic`);
- ``nodulenet prepare-lidc-synthetic``: one LIDC-IDRI scan with synthetic nodules inserted, as a prepared case.

``python -m nodulenet.train <command>`` runs the same commands without the main CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

_SET_HELP = "Override any setting, e.g. --set crop.positive_fraction=0.7 --set augment.noise_sigma=0 (repeatable)."


def _overrides(pairs: list[str], **named: Any) -> dict[str, Any]:
    from nodulenet.io.config_files import parse_overrides

    return {**{key: value for key, value in named.items() if value is not None}, **parse_overrides(pairs)}


def train_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, logs, TensorBoard, config.json."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON training config (see configs/)."),
    data: list[Path] = typer.Option([], "--data", help="Folder of prepared cases (repeatable)."),
    split: Optional[Path] = typer.Option(None, help="fold_<i>.json from make-splits: training and validation cases."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (published 200)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size, split over DDP processes (published 16)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd (published) or adamw."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (default 0.01 SGD, 0.001 AdamW)."),
    crop_size: Optional[int] = typer.Option(None, help="Cubic crop size in voxels, a multiple of 16 (published 128)."),
    model: Optional[str] = typer.Option(None, help="Base network: published or tiny."),
    model_width: Optional[float] = typer.Option(None, help="Channel multiplier of the network (e.g. 0.5)."),
    amp: Optional[str] = typer.Option(None, help="auto, off, bf16 or fp16."),
    workers: Optional[int] = typer.Option(None, help="Data-loader worker processes per training process."),
    threads: Optional[int] = typer.Option(None, help="Torch threads of each training process."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights, crops and sampling."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    val_every: Optional[int] = typer.Option(None, help="Validate every N epochs (0: never)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Also write last.pt every N steps."),
    init_checkpoint: Optional[Path] = typer.Option(None, help="Start from these weights (ours or published)."),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last.pt, exactly."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this training checkpoint instead."),
    no_progress: bool = typer.Option(False, help="No progress bar (logs still go to train.log)."),
) -> None:
    """Train NoduleNet on prepared cases (published schedule by default; DDP under torchrun)."""
    from nodulenet.train.config import load_train_config
    from nodulenet.train.loop import train

    overrides = _overrides(
        set_, prepared_roots=[str(p) for p in data] or None, split_file=str(split) if split else None,
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
        **{"crop.crop_size_zyx": [crop_size] * 3 if crop_size else None}, model=model, model_width=model_width,
        amp=amp, workers=workers, threads=threads, seed=seed, max_steps=max_steps, val_every_epochs=val_every,
        checkpoint_every_steps=checkpoint_every, init_checkpoint=str(init_checkpoint) if init_checkpoint else None,
    )
    resuming: bool | Path = resume_from if resume_from is not None else resume
    if not resuming or config is not None:
        cfg = load_train_config(config, overrides)
    elif overrides:
        # Resumed with a few flags: apply them to the stored settings (train() refuses ones that change the run).
        from nodulenet.train.checkpoint_files import LAST, load_checkpoint, resume_parts
        from nodulenet.train.config import TrainConfig

        path = resume_from if resume_from is not None else out / LAST
        cfg = TrainConfig.from_dict(resume_parts(load_checkpoint(path), path)[1], source=path).with_overrides(overrides)
    else:
        cfg = None  # the stored settings
    summary = train(cfg, out, resume=resuming, show_progress=not no_progress)
    typer.echo(f"{summary.status}: {summary.global_step} steps, {summary.epochs_completed} epochs, "
               f"best CPM {summary.best_cpm if summary.best_cpm is not None else 'n/a'}; outputs in {summary.out_dir}")


def make_splits_cmd(
    data: list[Path] = typer.Argument(..., help="Folder(s) of prepared cases."),
    out: Path = typer.Option(..., "--out", help="Folder for fold_<i>.json and splits.json."),
    folds: int = typer.Option(6, help="Number of folds (published NoduleNet: 6)."),
    seed: int = typer.Option(0, help="Seed of the patient shuffle."),
    patient_map: Optional[Path] = typer.Option(None, help="CSV case_id,patient_id for cases whose id does not "
                                                            "name the patient (LUNA16 series UIDs)."),
) -> None:
    """Write k-fold cross-validation splits by patient (test fold i, validation fold i+1, training the rest)."""
    import csv
    import json

    from nodulenet.data.cases import find_case_dirs, patient_id_for
    from nodulenet.data.splits import make_splits, write_splits
    from nodulenet.errors import InputError

    mapping: dict[str, str] = {}
    if patient_map is not None:
        try:
            with open(patient_map, newline="", encoding="utf-8") as f:
                mapping = {row[0].strip(): row[1].strip() for row in csv.reader(f) if len(row) >= 2}
        except OSError as exc:
            raise InputError(patient_map, f"cannot read ({exc.strerror or exc})") from None
    case_patients: dict[str, str] = {}
    for case_dir in find_case_dirs(data):
        source = None
        try:
            source = json.loads((case_dir / "nodules.json").read_text()).get("source")
        except (OSError, ValueError):
            pass  # a broken case is reported when training loads it; it still needs a fold
        case_patients[case_dir.name] = mapping.get(case_dir.name) or patient_id_for(case_dir.name, source)
    if not case_patients:
        raise InputError(data[0], "no prepared case folder found")
    try:
        splits = make_splits(case_patients, folds, seed)
    except ValueError as exc:
        raise InputError(data[0], str(exc)) from None
    paths = write_splits(splits, case_patients, out, [str(p) for p in data])
    typer.echo(f"{len(case_patients)} cases of {len(set(case_patients.values()))} patients -> {len(paths)} folds "
               f"in {out}")


def prepare_phantoms_cmd(
    out: Path = typer.Argument(..., help="Folder for the prepared phantom cases (phantom-<seed>)."),
    n: int = typer.Option(20, help="Number of phantoms."),
    first_seed: int = typer.Option(0, help="Seeds first_seed .. first_seed + n - 1."),
    n_nodules: int = typer.Option(3, help="Nodules per phantom."),
    adult: bool = typer.Option(False, help="Adult-sized chests (288 x 288 at 0.75 mm) instead of small ones."),
    ground_glass: str = typer.Option("classic", "--ground-glass", help="Ground-glass nodules: classic (as the "
                                     "shipped model was trained) or varied (faint, 10-30 mm, irregular, as real "
                                     "ones)."),
    force: bool = typer.Option(False, help="Redo finished cases."),
) -> None:
    """Generate seeded phantom chest CTs and write them as prepared cases, ready for training."""
    from dataclasses import replace

    from nodulenet.data.synthetic import SMALL_PHANTOM, prepare_phantom_cases
    from nodulenet.preprocess.phantom import PhantomConfig

    from nodulenet.errors import NoduleNetError

    try:
        phantom = replace(PhantomConfig() if adult else SMALL_PHANTOM, n_nodules=n_nodules,
                          ground_glass_style=ground_glass)
    except ValueError as exc:
        raise NoduleNetError(f"--ground-glass: {exc}") from None
    summaries = prepare_phantom_cases(out, range(first_seed, first_seed + n), phantom, force=force)
    done = sum(1 for s in summaries if s.status == "done")
    typer.echo(f"{done} prepared, {len(summaries) - done} already there, in {out}")


def prepare_lidc_synthetic_cmd(
    series: Path = typer.Argument(..., help="An LIDC-IDRI CT series folder (DICOM files + the readers' XML)."),
    out: Path = typer.Argument(..., help="Case folder to write."),
    seed: int = typer.Option(0, help="Seed of the inserted nodules."),
    n_nodules: int = typer.Option(4, help="Synthetic nodules to insert (real nodules are kept)."),
) -> None:
    """Insert synthetic nodules into a real LIDC scan's lungs and prepare it as a training case."""
    from nodulenet.data.synthetic import prepare_lidc_with_inserted_nodules

    summary = prepare_lidc_with_inserted_nodules(series, out, seed, n_nodules)
    typer.echo(f"{summary.case_id}: {summary.n_nodules} nodules ({n_nodules} inserted) -> {summary.out_dir}")


def build_app() -> typer.Typer:
    """A stand-alone Typer app of these commands (``python -m nodulenet.train``)."""
    app = typer.Typer(name="nodulenet-train", no_args_is_help=True, pretty_exceptions_enable=False,
                      add_completion=False, help="NoduleNet training commands.")
    app.command("train")(train_cmd)
    app.command("make-splits")(make_splits_cmd)
    app.command("prepare-phantoms")(prepare_phantoms_cmd)
    app.command("prepare-lidc-synthetic")(prepare_lidc_synthetic_cmd)
    return app


def main() -> None:
    import sys

    from rich.console import Console

    from nodulenet.errors import NoduleNetError

    try:
        build_app()()
    except NoduleNetError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)
