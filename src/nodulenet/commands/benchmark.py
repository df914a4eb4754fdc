"""Typer commands ``nodulenet benchmark luna16`` and ``nodulenet benchmark lidc`` (registered by ``nodulenet.cli``;
heavy imports inside the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

benchmark_app = typer.Typer(help="Cross-validated benchmarks: from a LUNA16 / LIDC-IDRI download to the paper's "
                                 "tables (prepare, train per fold, predict held-out, score). See docs/benchmark.md.",
                            no_args_is_help=True)

# The options both benchmarks take, with the same meaning (one definition, so their --help cannot drift apart).
_OUT = typer.Option(..., "-o", "--out", help="Folder for everything: prepared cases, folds, results.")
_CONFIG = typer.Option(None, "--config", help="Training config YAML/JSON (default: published).")
_SET = typer.Option([], "--set", help="Override a training setting, e.g. --set epochs=100 --set batch_size=8 "
                                     "(repeatable).")
_PREPARE_CONFIG = typer.Option(None, "--prepare-config", help="Preparation settings YAML/JSON.")
_GPUS = typer.Option(0, "--gpus", help="GPUs: 0 = CPU, 1 = one GPU, N > 1 = DDP training via torchrun.")
_THREADS = typer.Option(None, "--threads", help="CPU threads of the prediction.")
_RESUME = typer.Option(False, "--resume", help="Continue a killed run in OUT without redoing finished work.")
_NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars (the log still goes to "
                                                        "OUT/benchmark.log).")


def _train_config(config: Path | None, set_: list[str]) -> Any:
    from nodulenet.io.config_files import parse_overrides
    from nodulenet.train.config import load_train_config

    return load_train_config(config, parse_overrides(set_))


def _prepare_config(prepare_config: Path | None) -> Any:
    from nodulenet.preprocess.config import load_prepare_config

    return load_prepare_config(prepare_config)


@benchmark_app.command("luna16")
def luna16_cmd(
    data_root: Path = typer.Argument(..., help="The LUNA16 download: subset0..subset9/*.mhd, annotations.csv, "
                                               "annotations_excluded.csv, seriesuids.csv."),
    out: Path = _OUT,
    folds: int = typer.Option(10, "--folds", help="Number of folds = subsets subset0..subset<folds-1>."),
    config: Path | None = _CONFIG,
    set_: list[str] = _SET,
    prepare_config: Path | None = _PREPARE_CONFIG,
    gpus: int = _GPUS,
    workers: int = typer.Option(1, "--workers", help="Scans prepared in parallel."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation of the held-out prediction: none, flips, "
                                                  "flips8."),
    threads: int | None = _THREADS,
    resume: bool = _RESUME,
    annotations: Path | None = typer.Option(None, "--annotations", help="annotations.csv (default: found in "
                                                                           "DATA_ROOT)."),
    excluded: Path | None = typer.Option(None, "--excluded", help="annotations_excluded.csv."),
    seriesuids: Path | None = typer.Option(None, "--seriesuids", help="seriesuids.csv."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the CPM's CI (0: none)."),
    no_progress: bool = _NO_PROGRESS,
) -> None:
    """LUNA16 10-fold cross-validation on the official subsets: prepare, train per fold, predict every candidate
    of the held-out subset, merge, score (FROC/CPM with bootstrap CI). Writes OUT/results.json and results.md."""
    from nodulenet.benchmark.luna16_api import benchmark_luna16

    result = benchmark_luna16(data_root, out, train_config=_train_config(config, set_), folds=folds,
                              prepare_config=_prepare_config(prepare_config), gpus=gpus, workers=workers, tta=tta,
                              threads=threads, resume=resume, annotations=annotations, excluded=excluded,
                              seriesuids=seriesuids, n_bootstrap=bootstrap, show_progress=not no_progress)
    overall = result.results["overall"]
    typer.echo(f"CPM {overall['cpm']:.4f} over {overall['n_scans']} scans, {overall['n_nodules']} nodules; "
               f"results in {out / 'results.json'}")


@benchmark_app.command("lidc")
def lidc_cmd(
    data_root: Path = typer.Argument(..., help="LIDC-IDRI download in TCIA layout (patient/study/series folders "
                                               "with the readers' XML)."),
    out: Path = _OUT,
    folds: int = typer.Option(6, "--folds", help="Folds by patient (the paper: 6)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient shuffle of the folds."),
    config: Path | None = _CONFIG,
    set_: list[str] = _SET,
    prepare_config: Path | None = _PREPARE_CONFIG,
    gpus: int = _GPUS,
    workers: int = typer.Option(1, "--workers", help="Series prepared in parallel."),
    threshold: float = typer.Option(0.5, "--threshold", help="Detections scoring at least this get a mask."),
    threads: int | None = _THREADS,
    resume: bool = _RESUME,
    no_progress: bool = _NO_PROGRESS,
) -> None:
    """LIDC-IDRI cross-validation by patient with the paper's Table 2 protocol: per-nodule Dice and IoU (mean +- sd)
    against nodules of >= 3 and >= 4 readers, missed nodules as 0 and left out. Writes OUT/results.json and .md."""
    from nodulenet.benchmark.lidc_api import benchmark_lidc

    result = benchmark_lidc(data_root, out, train_config=_train_config(config, set_), folds=folds, seed=seed,
                            prepare_config=_prepare_config(prepare_config), gpus=gpus, workers=workers,
                            threshold=threshold, threads=threads, resume=resume, show_progress=not no_progress)
    for level, entry in result.results["segmentation"].items():
        dice = entry["missed_as_zero"]["dice"]
        mean = "-" if dice["mean"] is None else f"{dice['mean']:.4f} +- {dice['sd']:.4f}"
        typer.echo(f"{level}: {entry['n_nodules']} nodules, {entry['n_missed']} missed, Dice (missed as 0) {mean}")
    typer.echo(f"results in {out / 'results.json'}")
