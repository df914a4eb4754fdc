"""The ``nodulenet`` command: thin Typer wrappers over the stage APIs.

Heavy imports (torch, SimpleITK, pydicom, matplotlib) happen inside the commands, so ``nodulenet --help``
is instant. Errors caused by the user's input (:class:`nodulenet.errors.NoduleNetError`) are printed as
one line naming the file and the problem, exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="nodulenet",
    help="Find, confirm and outline lung nodules in chest CT. Research software, not a medical device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
evaluate_app = typer.Typer(help="Evaluate detections (LUNA16 FROC/CPM) and segmentations (Dice/IoU).", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def _console():
    from rich.console import Console

    # soft_wrap: an error line is never folded at 80 columns when stderr is a file or a pipe (paths stay whole).
    return Console(stderr=True, soft_wrap=True)


@app.command()
def version() -> None:
    """Print the nodulenet version."""
    from nodulenet import __version__

    typer.echo(__version__)


@app.command()
def inspect(
    scan: Path = typer.Argument(..., help="A DICOM series folder, .mhd, .nii/.nii.gz or .nrrd."),
    series_uid: Optional[str] = typer.Option(None, help="Pick this SeriesInstanceUID when a folder holds several."),
) -> None:
    """Read a scan and print its geometry (shape, spacing, origin, direction) and HU range."""
    import numpy as np

    from nodulenet.io.scan import read_scan

    vol = read_scan(scan, series_instance_uid=series_uid)
    g = vol.geometry
    typer.echo(f"source        {vol.meta.get('source_path', scan)}")
    for key in ("modality", "patient_id", "series_instance_uid"):
        if vol.meta.get(key):
            typer.echo(f"{key:<13} {vol.meta[key]}")
    typer.echo(f"shape_zyx     {g.shape_zyx}")
    typer.echo(f"spacing_zyx   {tuple(round(s, 4) for s in g.spacing_zyx)} mm")
    typer.echo(f"origin_xyz    {tuple(round(o, 3) for o in g.origin_xyz_mm)} mm (LPS)")
    typer.echo(f"direction     {tuple(round(d, 4) for d in g.direction)}")
    typer.echo(f"values        min {float(np.min(vol.array)):.0f}, max {float(np.max(vol.array)):.0f} ({vol.array.dtype})")


@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Folder for scan, masks, annotations.csv and nodules.json."),
    seed: int = typer.Option(0, help="Seed: the same seed and settings give the same scan, byte for byte."),
    fmt: str = typer.Option("nii.gz", "--format", help="Image format: nii.gz, nrrd, mhd or dicom (a CT series folder scan/; masks nii.gz)."),
    n_nodules: Optional[int] = typer.Option(None, help="Number of nodules (default 4)."),
    adult: bool = typer.Option(False, help="384x384 in-plane grid: adult-sized chest (about 1.7x slower)."),
) -> None:
    """Write a synthetic chest CT with nodules of every kind and their ground truth (world mm, LPS)."""
    from dataclasses import replace

    from nodulenet.preprocess.phantom import PHANTOM_FORMATS, PhantomConfig, write_phantom

    from nodulenet.errors import InputError

    if fmt not in PHANTOM_FORMATS:
        raise InputError(None, f"--format must be one of {', '.join(PHANTOM_FORMATS)}, got {fmt!r}")
    config = PhantomConfig()
    if n_nodules is not None:
        config = replace(config, n_nodules=n_nodules)
    if adult:
        config = replace(config, shape_yx=(384, 384))
    paths = write_phantom(out, seed, config, fmt=fmt)
    for name, path in paths.items():
        typer.echo(f"{name:<14} {path}")


@app.command("import-checkpoint")
def import_checkpoint_cmd(
    checkpoint: Path = typer.Argument(..., help="A published NoduleNet checkpoint (e.g. 200.ckpt: a dict with state_dict)."),
    out: Path = typer.Argument(..., help="Where to write the nodulenet model file (.pt)."),
) -> None:
    """Convert a published NoduleNet checkpoint into a nodulenet model file (weights + config).

    Layers the published forward pass never uses are dropped and listed; a missing or mis-shaped weight is
    an error naming it. ``predict --weights`` also takes the published file directly.
    """
    from nodulenet.errors import InputError
    from nodulenet.model import NoduleNet, to_checkpoint_dict
    from nodulenet.model.checkpoint import (CheckpointMismatchError, import_published_state_dict,
                                            imported_published_config)
    from nodulenet.train.checkpoint_files import load_checkpoint, save_checkpoint

    obj = load_checkpoint(checkpoint)
    config = imported_published_config()
    try:
        state_dict, report = import_published_state_dict(obj, config)
    except CheckpointMismatchError as err:
        raise InputError(checkpoint, f"does not match the published NoduleNet: {err}") from None
    model = NoduleNet(config)
    model.load_state_dict(state_dict)
    save_checkpoint(to_checkpoint_dict(model, config, {"imported_from": str(checkpoint), "epoch": report.epoch}), out)
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")


def _parse_overrides(pairs: list[str]) -> dict:
    from nodulenet.io.config_files import parse_overrides

    return parse_overrides(pairs)


_SET_HELP = "Override one setting, e.g. --set min_readers=2 --set lung.dilation_mm=5 (repeatable)."


def _finish_prepare(summary) -> None:
    if summary.failed:
        _console().print(
            f"[bold red]{len(summary.failed)} case(s) failed[/]; see {Path(summary.out_root) / 'errors.json'}"
        )
        raise typer.Exit(1)


@app.command("prepare-lidc")
def prepare_lidc_cmd(
    src: Path = typer.Argument(..., help="LIDC-IDRI download in TCIA layout (patient/study/series folders)."),
    out: Path = typer.Argument(..., help="Folder for the prepared cases (one sub-folder per case)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of preparation settings."),
    workers: int = typer.Option(1, help="Cases prepared in parallel (each needs ~1.5 GiB of memory)."),
    min_readers: Optional[int] = typer.Option(None, help="Keep nodules marked by at least this many readers (1-4)."),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
    force: bool = typer.Option(False, help="Redo cases that are already done."),
) -> None:
    """Resample, segment lungs, normalise and crop every LIDC-IDRI case; nodules from the readers' XML."""
    from nodulenet.preprocess.config import load_prepare_config
    from nodulenet.preprocess.prepare_dataset import prepare_lidc

    cfg = load_prepare_config(config, _parse_overrides(set_))
    summary = prepare_lidc(src, out, cfg, workers=workers, min_readers=min_readers, force=force)
    _finish_prepare(summary)


@app.command("prepare-luna")
def prepare_luna_cmd(
    mhd_root: Path = typer.Argument(..., help="Folder holding LUNA16 .mhd/.raw files (searched recursively)."),
    annotations: Path = typer.Argument(..., help="LUNA16 annotations.csv."),
    out: Path = typer.Argument(..., help="Folder for the prepared cases."),
    excluded_csv: Optional[Path] = typer.Option(None, help="annotations_excluded.csv, kept as excluded findings."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of preparation settings."),
    workers: int = typer.Option(1, help="Cases prepared in parallel."),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
    force: bool = typer.Option(False, help="Redo cases that are already done."),
) -> None:
    """Prepare LUNA16 scans; nodule masks are spheres of the annotated diameter."""
    from nodulenet.preprocess.config import load_prepare_config
    from nodulenet.preprocess.prepare_dataset import prepare_luna

    cfg = load_prepare_config(config, _parse_overrides(set_))
    summary = prepare_luna(mhd_root, annotations, out, cfg, workers=workers, excluded_csv=excluded_csv, force=force)
    _finish_prepare(summary)


@evaluate_app.command("froc")
def evaluate_froc_cmd(
    candidates: Path = typer.Argument(..., help="LUNA-style candidates CSV: seriesuid,coordX,coordY,coordZ,probability."),
    annotations: Path = typer.Option(..., "--annotations", help="LUNA16 annotations.csv (world mm, LPS)."),
    excluded: Path = typer.Option(..., "--excluded", help="LUNA16 annotations_excluded.csv."),
    seriesuids: Path = typer.Option(..., "--seriesuids", help="LUNA16 seriesuids.csv: the scans evaluated."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for froc.json and froc.png."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of scans for confidence intervals (0: none)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
) -> None:
    """FROC and CPM exactly as the official LUNA16 evaluation script counts them."""
    from nodulenet.evaluate import CPM_FP_RATES, evaluate_froc, write_froc_outputs

    result = evaluate_froc(candidates, annotations, excluded, seriesuids, n_bootstrap=bootstrap, seed=seed)
    paths = write_froc_outputs(result, out)
    ignored = result.n_ignored_unlisted_scan
    if ignored:
        _console().print(
            f"[yellow]warning:[/] {ignored} candidates belong to scans not listed in {seriesuids} and were ignored"
        )
    for rate in CPM_FP_RATES:
        typer.echo(f"sensitivity at {rate:>5g} FP/scan: {result.sensitivities_at[rate]:.4f}")
    typer.echo(f"CPM {result.cpm:.4f} over {result.n_scans} scans, {result.n_nodules} nodules")
    typer.echo(f"wrote {paths['json']} and {paths['png']}")


@evaluate_app.command("seg")
def evaluate_seg_cmd(
    pred_dir: Path = typer.Argument(..., help="Predicted instance label maps, one file per case."),
    gt_dir: Path = typer.Argument(..., help="Reference instance label maps with the same file names."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for seg_metrics.json and the per-nodule CSV."),
) -> None:
    """Dice and IoU per nodule (missed nodules counted as 0, and excluded), as in the NoduleNet paper."""
    from rich.console import Console

    from nodulenet.evaluate import evaluate_segmentation, seg_table, write_seg_outputs

    result = evaluate_segmentation(pred_dir, gt_dir)
    Console().print(seg_table(result))
    if out is not None:
        paths = write_seg_outputs(result, out)
        typer.echo(f"wrote {paths['json']} and {paths['csv']}")


def _register_stage_commands() -> None:
    """Commands whose Typer signatures live beside their stage (importing them pulls in only typer)."""
    from nodulenet.commands.predict import demo_cmd, predict_cmd
    from nodulenet.commands.train import make_splits_cmd, prepare_lidc_synthetic_cmd, prepare_phantoms_cmd, train_cmd

    app.command("predict")(predict_cmd)
    app.command("demo")(demo_cmd)

    app.command("train")(train_cmd)
    app.command("make-splits")(make_splits_cmd)
    app.command("prepare-phantoms")(prepare_phantoms_cmd)
    app.command("prepare-lidc-synthetic")(prepare_lidc_synthetic_cmd)

    from nodulenet.commands.compare import compare_cmd

    app.command("compare")(compare_cmd)

    from nodulenet.commands.serve import serve_cmd

    app.command("serve")(serve_cmd)

    from nodulenet.commands.viewer import viewer_cmd

    app.command("viewer")(viewer_cmd)

    from nodulenet.commands.benchmark import benchmark_app

    app.add_typer(benchmark_app, name="benchmark")


_register_stage_commands()


def main() -> None:
    """Entry point of the ``nodulenet`` script."""
    from nodulenet.errors import NoduleNetError

    from rich.markup import escape

    try:
        app()
    except NoduleNetError as err:
        # escape: a message may hold brackets (paths, `pip install "nodulenet[app]"`) that rich would eat as markup.
        _console().print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
