"""Typer commands ``nodulenet predict`` and ``nodulenet demo`` (registered by ``nodulenet.cli``).

Thin wrappers over :mod:`nodulenet.predict_api`; heavy imports (torch, SimpleITK, the model) happen inside the
functions so ``nodulenet --help`` stays instant. Errors with the user's input or options raise
:class:`~nodulenet.errors.NoduleNetError` (one line, exit code 2, printed by ``nodulenet.cli.main``); a cohort in
which some scans failed prints each error and exits with code 1 after finishing the others (code 2 when no scan
was done and every failure was bad input, e.g. a single unreadable scan).

Register with::

    from nodulenet.commands.predict import demo_cmd, predict_cmd
    app.command("predict")(predict_cmd)
    app.command("demo")(demo_cmd)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer


def _passive_openmp_threads() -> None:
    """Make idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    On a shared machine (one of two cores busy with another job) spinning threads wait for the descheduled one at
    every parallel region: the demo network on LIDC-IDRI-0001 took 13.9 s with torch's default 2 threads vs 4.4 s
    with ``OMP_WAIT_POLICY=PASSIVE`` (4.3 s with 1 thread). libgomp reads it when torch is first imported, so this
    runs before any torch import.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Width of the console when the output is not a terminal (a file, a pipe, a CI log): wide enough that no path or
# table row is folded (rich would otherwise wrap at 80 columns, breaking paths a user copies).
REDIRECTED_WIDTH = 1000


def _console() -> Any:
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console = Console(soft_wrap=True, width=REDIRECTED_WIDTH)
    return console


def _slice_text(f: dict[str, Any]) -> str:
    """The centre slice as a reader finds it in a PACS: the DICOM image number, else the z position."""
    ref = f.get("centre_slice")
    if not ref:
        return "-"
    if ref.get("instance_number") is not None:
        return f"image {ref['instance_number']}"
    return f"z {ref['position_z_mm']:.1f} mm"


def _findings_table(result: Any, title: str, limit: int | None = None) -> Any:
    from rich.table import Table

    shown = result.findings if limit is None else result.findings[:limit]
    caption = None if len(shown) == len(result.findings) else \
        f"top {len(shown)} of {len(result.findings)} by score; all in nodules.json"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in ("id", "score", "centre x, y, z (mm, LPS)", "slice", "diameter (mm)", "volume (mm³)", "where"):
        table.add_column(column, justify="left" if column in ("where", "slice") else "right")
    for f in shown:
        x, y, z = f["center_world_xyz_mm"]
        table.add_row(str(f["id"]), f"{f['score']:.3f}", f"{x:.1f}, {y:.1f}, {z:.1f}", _slice_text(f),
                      "-" if f["diameter_mm"] is None else f"{f['diameter_mm']:.1f}",
                      "-" if f["volume_mm3"] is None else f"{f['volume_mm3']:.0f}",
                      f.get("location") or f["side"] or "-")
    return table


def no_findings_line(result: Any, threshold: float) -> str:
    """What a scan without findings gets said: the threshold, and the best candidate below it (where it is)."""
    below = getattr(result, "below_threshold", None) or []
    if not below:
        return f"no nodule scored >= {threshold:g}, and no candidate scored lower either"
    best = below[0]
    x, y, z = best["center_world_xyz_mm"]
    where = _slice_text(best)
    return (f"no nodule scored >= {threshold:g}; the highest candidate scored {best['score']:.3f} at "
            f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS" + ("" if where == "-" else f", {where}")
            + " (listed apart in report.html and nodules.json)")


def print_findings(console: Any, result: Any, title: str, threshold: float, limit: int | None = None) -> None:
    """The nodule table, or the plain no-findings line: every finished scan gets one or the other."""
    if result.findings:
        console.print(_findings_table(result, title, limit=limit))
    else:
        console.print(no_findings_line(result, threshold), highlight=False)


# The demo prints this many findings; nodules.json and report.html hold them all.
DEMO_TABLE_ROWS = 10


def _truth_table(truth: list[dict[str, Any]], findings: list[dict[str, Any]]) -> Any:
    """The phantom's nodules, each with the nearest finding; "found" when that finding's centre lies within the
    nodule's radius (the LUNA16 hit rule)."""
    import math

    from rich.table import Table

    table = Table(title="phantom ground truth", title_justify="left")
    for column in ("id", "kind", "centre x, y, z (mm, LPS)", "diameter (mm)", "nearest finding"):
        table.add_column(column, justify="left" if column in ("kind", "nearest finding") else "right")
    for n in truth:
        x, y, z = n["center_world_xyz_mm"]
        nearest = min(findings, key=lambda f: math.dist(f["center_world_xyz_mm"], n["center_world_xyz_mm"]),
                      default=None)
        if nearest is None:
            match = "missed (no findings)"
        else:
            distance = math.dist(nearest["center_world_xyz_mm"], n["center_world_xyz_mm"])
            found = distance <= n["diameter_mm"] / 2.0
            match = f"{'found' if found else 'missed'}: #{nearest['id']} at {distance:.1f} mm"
        table.add_row(str(n["id"]), n["kind"], f"{x:.1f}, {y:.1f}, {z:.1f}", f"{n['diameter_mm']:.1f}", match)
    return table


def _stage_line(result: Any) -> str:
    stages = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result.stage_seconds.items())
    return f"{result.seconds:.1f} s ({stages}); peak memory {result.peak_rss_mib / 1024:.2f} GiB"


def _options(weights: Optional[Path], device: str, threshold: float, max_memory: Optional[float], precision: str,
             label_format: str, no_dicom: bool, redo: bool, threads: Optional[int],
             series: Optional[str] = None, runtime: str = "auto") -> Any:
    from nodulenet.predict_api import PredictOptions

    return PredictOptions(weights=weights, device=device, threshold=threshold, max_memory_gb=max_memory,
                          precision=precision, label_format=label_format, dicom_outputs=not no_dicom, redo=redo,
                          threads=threads, series_instance_uid=series, runtime=runtime)


def predict_cmd(
    scans: Optional[list[Path]] = typer.Argument(None, help="DICOM series folder(s), .mhd/.nii/.nii.gz/.nrrd file(s), "
                                                 "or a .txt file listing scans (one path per line)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: one sub-folder per scan, plus summary.json."),
    weights_list: list[Path] = typer.Option([], "--weights", help="Checkpoint (nodulenet model.pt or the "
                                            "published NoduleNet .ckpt). Default: the shipped demo model. Repeat "
                                            "it for an ensemble (with --candidates-only)."),
    candidates_only: bool = typer.Option(False, "--candidates-only", help="Write every candidate (LUNA16 "
                                         "candidates.csv, no threshold) and skip the mask head: for FROC scoring."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation (with --candidates-only): none, flips "
                                                  "(+ each axis mirrored: 4 passes) or flips8 (8 passes)."),
    merge: str = typer.Option("wbf", "--merge", help="How TTA passes / ensemble models are merged: wbf (weighted "
                                                     "box fusion) or nms."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda:N; under torchrun each rank takes "
                                                       "cuda:LOCAL_RANK)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Report detections scoring at least this (0..1)."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Memory limit in GB; a scan that would "
                                                                          "not fit runs in overlapping tiles."),
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16 (the backbone in bf16, about 2x faster; "
                                                              "needs native bf16; scores move by up to 0.05), int8 "
                                                              "(the backbone quantised in OpenVINO, calibrated on "
                                                              "phantoms once per weights and cached) or auto "
                                                              "(= fp32)."),
    runtime: str = typer.Option("auto", "--runtime", help="What runs the backbone: torch, onnx (ONNX Runtime), "
                                                          "openvino, or auto (= torch; the other two export the "
                                                          "backbone first and pay off on cohorts)."),
    label_format: str = typer.Option("nii.gz", "--label-format", help="Label map format: nii.gz, nii or nrrd."),
    no_dicom: bool = typer.Option(False, "--no-dicom", help="Do not write DICOM SEG/SR for DICOM input."),
    redo: bool = typer.Option(False, "--redo", help="Recompute scans whose complete output is already there."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: one per core)."),
    series: Optional[str] = typer.Option(None, "--series", help="DICOM: read the series with this SeriesInstanceUID "
                                         "(from the scan's folder, or with --dicomweb from the study; default: the "
                                         "CT series with the most, then thinnest, slices; the choice is logged)."),
    server: Optional[str] = typer.Option(None, "--server", envvar="NODULENET_SERVER",
                                         help="Run on a nodulenet server (http[s]://host:port) instead of here."),
    token: Optional[str] = typer.Option(None, "--token", envvar="NODULENET_TOKEN",
                                        help="The server's bearer token (or a file holding it)."),
    remote: Optional[str] = typer.Option(None, "--remote", help="Run on user@host[:port] over SSH (nodulenet "
                                                                "installed there) instead of here."),
    remote_python: Optional[str] = typer.Option(None, "--remote-python", help="Python on the SSH host that has "
                                                "nodulenet (default: the `nodulenet` command on its PATH)."),
    identity: Optional[Path] = typer.Option(None, "--identity", help="SSH private key (default: agent and "
                                            "~/.ssh keys)."),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help="Trust and remember an SSH "
                                             "host that is not in known_hosts yet (a changed key is always refused)."),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", envvar="NODULENET_KNOWN_HOSTS",
                                               help="known_hosts file for --remote (default ~/.ssh/known_hosts)."),
    dicomweb: Optional[str] = typer.Option(None, "--dicomweb", help="Fetch the scan from this DICOMweb server "
                                           "(QIDO-RS/WADO-RS root, e.g. http://pacs:8042/dicom-web) instead of SCANS."),
    study: Optional[str] = typer.Option(None, "--study", help="With --dicomweb: the StudyInstanceUID."),
    store_results: bool = typer.Option(False, "--store-results", help="With --dicomweb: send seg.dcm and sr.dcm "
                                       "back into the study (STOW-RS)."),
    dicomweb_auth: Optional[str] = typer.Option(None, "--dicomweb-auth", envvar="NODULENET_DICOMWEB_AUTH",
                                                help="none, basic:FILE (FILE holds user:password) or bearer:FILE."),
) -> None:
    """Find, measure and outline nodules in CT scans; write nodules.json, candidates.csv, a label map,
    DICOM SEG + SR (DICOM input) and report.html per scan. With --dicomweb the scan comes from a PACS and
    --store-results sends SEG + SR back (docs/hospital.md). Research software, not a medical device."""
    _passive_openmp_threads()
    from nodulenet.errors import NoduleNetError
    from nodulenet.predict_api import predict_scans

    from dataclasses import replace

    weights = weights_list[0] if weights_list else None
    options = replace(_options(weights, device, threshold, max_memory, precision, label_format, no_dicom, redo,
                               threads, series, runtime), candidates_only=candidates_only,
                      extra_weights=tuple(weights_list[1:]), tta=tta, merge=merge)
    console = _console()
    if server and remote:
        raise NoduleNetError("--server and --remote are two ways to run elsewhere: give one of them")
    if remote and (candidates_only or len(weights_list) > 1):
        raise NoduleNetError("--candidates-only and several --weights run here only, not with --remote")
    if dicomweb is None and (study or store_results):  # not --dicomweb-auth: it may come from the env
        raise NoduleNetError("--study/--store-results go with --dicomweb URL")
    if dicomweb is not None:
        if server or remote:
            raise NoduleNetError("--dicomweb fetches the scan and predicts here: it cannot be combined with --server "
                                 "or --remote")
        if scans:
            raise NoduleNetError("--dicomweb reads the scan from the DICOMweb server: give no SCANS with it")
        if not study:
            raise NoduleNetError("--dicomweb needs --study STUDY_INSTANCE_UID")
    if server and series:
        raise NoduleNetError("--series cannot be used with --server: upload the chosen series' folder instead")

    def report(result: Any) -> None:
        if result.status == "failed":
            console.print(f"[bold red]failed[/] {result.scan}: {result.error}", highlight=False)
        elif result.status == "skipped":
            console.print(f"[dim]skipped[/] {result.scan}: already done in {result.out_dir}", highlight=False)
        else:
            console.print(f"[green]done[/] {result.scan}: {result.n_findings} finding(s) -> {result.out_dir} "
                          f"[dim]({_stage_line(result)})[/]", highlight=False)
            print_findings(console, result, f"{result.n_findings} nodule(s) in {result.name}", threshold,
                           limit=DEMO_TABLE_ROWS)

    if dicomweb is not None:
        from nodulenet.pacs.auth import parse_auth
        from nodulenet.pacs.predict_dicomweb import predict_from_dicomweb

        fetched = predict_from_dicomweb(dicomweb, study, out, options, series_uid=series,  # type: ignore[arg-type]
                                        auth=parse_auth(dicomweb_auth), store_results=store_results,
                                        say=lambda text: console.print(text, highlight=False), on_result=report)
        run = fetched.run
    elif server:
        # The server runs its own model on its own device: options that choose those here would be ignored.
        local_only = {"--weights": weights is not None, "--device": device != "cpu",
                      "--candidates-only": candidates_only, "--tta": tta != "none",
                      "--max-memory": max_memory is not None, "--precision": precision != "auto",
                      "--runtime": runtime != "auto",
                      "--threads": threads is not None}
        given = [flag for flag, used in local_only.items() if used]
        if given:
            raise NoduleNetError(f"{', '.join(given)} cannot be used with --server: the server runs its own model "
                                 f"and device (see `GET /v1/info`)")
        from nodulenet.serve.client_predict import run_on_server

        run = run_on_server(scans or [], out, url=server, token=token, options=options, progress=True,
                            on_result=report)
    elif remote:
        from nodulenet.remote.ssh import predict_over_ssh

        run = predict_over_ssh(scans or [], out, target=remote, options=options, remote_python=remote_python,
                               identity_file=identity, accept_new_host_key=accept_new_host_key,
                               known_hosts=known_hosts, progress=True, on_result=report)
    else:
        run = predict_scans(scans or [], out, options, progress=True, on_result=report)
    done = sum(r.status != "failed" for r in run.results)
    console.print(f"{done} of {len(run.results)} scan(s) done; summary: {run.summary_path}", highlight=False)
    if run.failed:
        console.print(f"[bold red]{len(run.failed)} scan(s) failed[/] (errors above and in {run.summary_path.name})")
        # Nothing done and every failure the input's fault (a NoduleNetError keeps no traceback): exit 2, like any
        # other bad input. A cohort with some scans done, or an unexpected crash, exits 1.
        bad_input = len(run.failed) == len(run.results) and all(r.traceback is None for r in run.failed)
        raise typer.Exit(2 if bad_input else 1)


def demo_cmd(
    scan: Optional[Path] = typer.Argument(None, help="A scan to use instead of a generated phantom chest CT."),
    out: Path = typer.Option(Path("nodulenet-demo"), "-o", "--out", help="Output folder."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint to use instead of the shipped model."),
    seed: int = typer.Option(0, "--seed", help="Phantom seed (the same seed gives the same scan)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Report detections scoring at least this (0..1)."),
) -> None:
    """Generate a phantom chest CT (or take SCAN), find its nodules with the shipped model and write every output
    (report.html included). Prints where they are and the nodules found."""
    _passive_openmp_threads()
    from nodulenet.predict_api import PredictOptions, run_demo

    console = _console()
    demo = run_demo(out, scan, seed=seed, options=PredictOptions(weights=weights, threshold=threshold, redo=True))
    result = demo.result
    if result.status == "failed":
        console.print(f"[bold red]failed[/] {result.scan}: {result.error}", highlight=False)
        raise typer.Exit(1)
    if demo.truth is not None:
        console.print(f"phantom scan: {demo.scan} (true nodules: {demo.scan.parent / 'annotations.csv'})",
                      highlight=False)
    print_findings(console, result, f"{result.n_findings} nodule(s) found in {_stage_line(result)}", threshold,
                   limit=DEMO_TABLE_ROWS)
    if demo.truth is not None:
        console.print(_truth_table(demo.truth, result.findings))
    files = result.details.get("files", {})
    console.print(f"outputs in {result.out_dir}:", highlight=False)
    for kind, path in files.items():
        console.print(f"  {kind:<15} {path}", highlight=False)
