"""Prepare a whole dataset: find the LIDC-IDRI / LUNA16 cases on disk and run :func:`prepare_case` on each,
in worker processes, resumably.

``<out>/summary.json`` and ``<out>/prepare.log`` describe the run; one failing case is recorded in
``<out>/errors.json`` and the run goes on. A case whose ``done.json`` exists with the same config is skipped
(see :mod:`nodulenet.preprocess.prepare` for the case folder itself).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import nodulenet
from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import write_json_atomic
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.image_files import read_image
from nodulenet.io.lidc_xml import parse_lidc_xml
from nodulenet.io.luna_csv import index_by_seriesuid, read_luna_annotations, read_luna_excluded
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.lidc_nodules import lidc_labels_for_series

from nodulenet.preprocess.prepare import CaseSummary, NoduleAnnotation, is_case_done, prepare_case


# ------------------------------------------------------------------------------------------ finding cases


@dataclass(frozen=True)
class LidcCase:
    """A CT series folder (TCIA layout) with its LIDC XML, to be prepared as ``case_id``."""

    case_id: str
    series_dir: Path
    series_instance_uid: str


@dataclass(frozen=True)
class LunaCase:
    """A LUNA16 ``<seriesuid>.mhd`` file and its annotations.csv rows."""

    case_id: str
    mhd_path: Path
    nodules: tuple[NoduleAnnotation, ...]
    excluded_nodules: tuple[NoduleAnnotation, ...] = ()


def _series_header(folder: Path, names: list[str]) -> pydicom.Dataset | None:
    """Header of the first readable DICOM file in ``folder`` (a damaged file is the worker's to report)."""
    for name in sorted(names)[:5]:
        try:
            return pydicom.dcmread(folder / name, stop_before_pixels=True,
                                   specific_tags=["Modality", "SeriesInstanceUID", "PatientID"])
        except Exception:  # noqa: BLE001 - try the next file; read_dicom_series reports bad files properly
            continue
    return None


def find_lidc_cases(src_root: str | Path) -> tuple[list[LidcCase], list[dict[str, str]]]:
    """CT series folders under ``src_root`` that hold ``.dcm`` files and an ``.xml``; and skipped folders.

    ``case_id`` is the top-level folder under ``src_root`` (the patient, e.g. ``LIDC-IDRI-0001``); when one
    patient has several annotated CT series each id gets ``_<last 8 characters of the series UID>``.
    Non-CT series (chest X-rays) and CT series without any XML are returned as skipped, with the reason.
    """
    root = Path(src_root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the LIDC-IDRI folder holding patient folders)")
    found: list[tuple[str, Path, str]] = []
    skipped: list[dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        dcm = [f for f in filenames if f.lower().endswith(".dcm")]
        if not dcm:
            continue
        folder = Path(dirpath)
        rel = folder.relative_to(root).parts
        patient = rel[0] if rel else root.name
        header = _series_header(folder, dcm)
        if header is None:
            skipped.append({"folder": str(folder), "reason": "no readable DICOM header"})
            continue
        if str(header.get("Modality", "")) != "CT":
            skipped.append({"folder": str(folder), "reason": f"modality {header.get('Modality', '?')}, not CT"})
            continue
        if not any(f.lower().endswith(".xml") for f in filenames):
            skipped.append({"folder": str(folder), "reason": "CT series without an LIDC annotation XML"})
            continue
        found.append((patient, folder, str(header.get("SeriesInstanceUID", ""))))
    counts = Counter(patient for patient, _, _ in found)
    cases = [
        LidcCase(patient if counts[patient] == 1 else f"{patient}_{uid[-8:]}", folder, uid)
        for patient, folder, uid in found
    ]
    return sorted(cases, key=lambda c: c.case_id), skipped


def find_luna_cases(
    mhd_root: str | Path, annotations_csv: str | Path, excluded_csv: str | Path | None = None
) -> list[LunaCase]:
    """Every ``<seriesuid>.mhd`` under ``mhd_root`` (subset folders searched) with its annotations."""
    root = Path(mhd_root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the LUNA16 folder holding subset*/<seriesuid>.mhd)")
    annotations = index_by_seriesuid(read_luna_annotations(annotations_csv))
    excluded = index_by_seriesuid(read_luna_excluded(excluded_csv)) if excluded_csv else {}
    cases: dict[str, LunaCase] = {}
    for path in sorted(root.rglob("*.mhd")):
        uid = path.name[: -len(".mhd")]
        if uid in cases:
            raise InputError(path, f"series {uid} also found at {cases[uid].mhd_path}")
        nodules = tuple(
            NoduleAnnotation(k, a.center_world_xyz_mm, a.diameter_mm, None, {}, {"source": "annotations.csv"})
            for k, a in enumerate(annotations.get(uid, []), start=1)
        )
        skipped = tuple(
            NoduleAnnotation(len(nodules) + k, a.center_world_xyz_mm, a.diameter_mm, None, {},
                             {"source": "annotations_excluded.csv"})
            for k, a in enumerate(excluded.get(uid, []), start=1)
        )
        cases[uid] = LunaCase(uid, path, nodules, skipped)
    return list(cases.values())


# ------------------------------------------------------------------------------------------ workers


def _lidc_inputs(case: LidcCase, config: PrepareConfig) -> dict[str, Any]:
    ct = read_dicom_series(case.series_dir, case.series_instance_uid or None)
    labels = lidc_labels_for_series(case.series_dir, ct, min_readers=config.min_readers, consensus=config.consensus)  # type: ignore[arg-type]
    if labels is None:
        others = []
        for xml in sorted(case.series_dir.glob("*.xml")):
            try:
                others.append(f"{xml.name} annotates series {parse_lidc_xml(xml).series_instance_uid}")
            except InputError as exc:
                others.append(f"{xml.name}: {exc.problem}")
        raise InputError(
            case.series_dir,
            f"no LIDC annotation XML for CT series {ct.meta.get('series_instance_uid')}; " + "; ".join(others),
        )

    def annotation(r: Any) -> NoduleAnnotation:
        extra = {"reader_ids": list(r.reader_ids), "consensus": r.consensus, "volume_mm3": round(r.volume_mm3, 1)}
        return NoduleAnnotation(r.id, r.center_world_xyz_mm, r.diameter_mm, r.n_readers, dict(r.characteristics), extra)

    return {
        "ct": ct,
        "nodules": [annotation(r) for r in labels.nodules],
        "excluded_nodules": [annotation(r) for r in labels.excluded_nodules],
        "nodule_mask": labels.instance_mask,
        "source": {"path": str(case.series_dir), "xml": str(labels.xml_path), "dataset": "LIDC-IDRI",
                   "labels": labels.settings},
    }


def _luna_inputs(case: LunaCase, config: PrepareConfig) -> dict[str, Any]:
    ct = read_image(case.mhd_path)
    ct.meta.setdefault("series_instance_uid", case.case_id)
    return {
        "ct": ct,
        "nodules": list(case.nodules),
        "excluded_nodules": list(case.excluded_nodules),
        "nodule_mask": None,
        "source": {"path": str(case.mhd_path), "dataset": "LUNA16",
                   "labels": {"mask": "spheres of the annotated diameter around the annotated centre",
                              "n_readers": "not in annotations.csv (LUNA16 kept nodules marked by >= 3 of 4)"}},
    }


class _ListHandler(logging.Handler):
    """Collects what the readers log (warnings such as 'several CT series, read the largest') for prepare.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


def _prepare_one(case: LidcCase | LunaCase, out_root: str, config_dict: dict[str, Any]) -> dict[str, Any]:
    """Worker: prepare one case; never raises (a failure comes back as a 'failed' summary)."""
    config = PrepareConfig.from_dict(config_dict)
    t0 = time.perf_counter()
    source_path = str(case.series_dir if isinstance(case, LidcCase) else case.mhd_path)
    handler = _ListHandler()
    logging.getLogger("nodulenet").addHandler(handler)
    try:
        t_read = time.perf_counter()
        inputs = _lidc_inputs(case, config) if isinstance(case, LidcCase) else _luna_inputs(case, config)
        read_seconds = round(time.perf_counter() - t_read, 3)
        summary = prepare_case(inputs.pop("ct"), Path(out_root) / case.case_id, config, case_id=case.case_id, **inputs)
        summary.stage_seconds = {"read": read_seconds, **summary.stage_seconds}
        summary.seconds = round(time.perf_counter() - t0, 3)
        summary.log = handler.lines + summary.log
        return summary.to_dict()
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the run; it is reported
        # Errors about the input (bad file, no lungs found) are one clear line; anything else is a bug
        # whose traceback goes to prepare.log.
        is_input = isinstance(exc, NoduleNetError)
        path = str(exc.path) if isinstance(exc, InputError) and exc.path is not None else source_path
        message = str(exc) if is_input else f"{type(exc).__name__}: {exc}"
        return CaseSummary(
            case_id=case.case_id, status="failed", out_dir=str(Path(out_root) / case.case_id), source=source_path,
            seconds=round(time.perf_counter() - t0, 3), error_file=path, error=message,
            log=handler.lines + ([] if is_input else traceback.format_exc().splitlines()),
        ).to_dict()
    finally:
        logging.getLogger("nodulenet").removeHandler(handler)


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk

    # Several worker processes share the cores; each ITK filter would otherwise start one thread per core.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


# ------------------------------------------------------------------------------------------ the run


@dataclass
class PrepareRunSummary:
    """Outcome of a :func:`prepare_lidc` / :func:`prepare_luna` run (also written as ``summary.json``)."""

    out_root: str
    dataset: str
    seconds: float
    cases: list[CaseSummary]
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for c in self.cases if c.status == status)

    @property
    def failed(self) -> list[CaseSummary]:
        return [c for c in self.cases if c.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_root": self.out_root,
            "dataset": self.dataset,
            "nodulenet_version": nodulenet.__version__,
            "seconds": self.seconds,
            "n_cases": len(self.cases),
            "n_done": self.count("done"),
            "n_skipped": self.count("skipped"),
            "n_failed": self.count("failed"),
            "cases": [{k: v for k, v in c.to_dict().items() if k != "log"} for c in self.cases],
            "skipped_inputs": self.skipped_inputs,
        }


def _file_logger(out_root: Path) -> logging.Logger:
    run_logger = logging.getLogger(f"nodulenet.prepare.run.{id(out_root)}")
    run_logger.setLevel(logging.INFO)
    run_logger.propagate = False
    handler = logging.FileHandler(out_root / "prepare.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    run_logger.addHandler(handler)
    return run_logger


def _errors(cases: list[CaseSummary]) -> list[dict[str, Any]]:
    return [{"case_id": c.case_id, "file": c.error_file, "message": c.error} for c in cases if c.status == "failed"]


def _in_workers(todo: Sequence[LidcCase | LunaCase], out: Path, config_dict: dict[str, Any], workers: int,
                done: Any) -> None:
    """Run ``_prepare_one`` over ``todo`` in ``workers`` spawned processes, calling ``done`` per result."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a forked child can inherit a lock held by the parent's ITK thread pool.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(_prepare_one, case, str(out), config_dict): case for case in todo}
        for future in as_completed(futures):
            case = futures[future]
            try:
                done(CaseSummary(**future.result()))
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory
                done(CaseSummary(case.case_id, "failed", str(out / case.case_id), source=str(case.case_id),
                                 error=f"worker process failed: {type(exc).__name__}: {exc}"))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not start the queued cases
        raise
    pool.shutdown()


def run_cases(
    cases: Sequence[LidcCase | LunaCase],
    out_root: str | Path,
    config: PrepareConfig,
    *,
    dataset: str,
    workers: int = 1,
    force: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
    skipped_inputs: list[dict[str, str]] | None = None,
) -> PrepareRunSummary:
    """Prepare ``cases`` into ``out_root`` (resumable, ``workers`` processes); see the module doc."""
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    run_log = _file_logger(out)
    t0 = time.perf_counter()
    results: list[CaseSummary] = []

    def record(summary: CaseSummary) -> None:
        results.append(summary)
        for line in summary.log:
            run_log.info("%s: %s", summary.case_id, line)
        if summary.status == "failed":
            run_log.error("%s FAILED (%s): %s", summary.case_id, summary.error_file, summary.error)
            write_json_atomic(out / "errors.json", _errors(results))  # visible while the run goes on
        elif summary.status == "done":
            run_log.info("%s done in %.1f s: %d nodule(s), lungs %.2f L, stages %s", summary.case_id, summary.seconds,
                         summary.n_nodules, (summary.lung_volume_ml or 0) / 1000, summary.stage_seconds)
        progress.advance(task_id)

    try:
        run_log.info("prepare %s: %d case(s) -> %s, workers=%d, config %s", dataset, len(cases), out, workers,
                     json.dumps(config.to_dict(), sort_keys=True))
        for s in skipped_inputs or []:
            run_log.info("skipped input %s: %s", s.get("folder"), s.get("reason"))
        finished = [c for c in cases if not force and is_case_done(out / c.case_id, config)]
        finished_ids = {c.case_id for c in finished}
        todo = [c for c in cases if c.case_id not in finished_ids]
        progress = Progress(TextColumn("[bold]prepare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, disable=not show_progress)
        with progress:
            task_id = progress.add_task(dataset, total=len(cases))
            for case in finished:
                record(CaseSummary(case.case_id, "skipped", str(out / case.case_id),
                                   log=["already prepared with this config, skipped"]))
            if min(workers, len(todo)) <= 1:
                for case in todo:
                    record(CaseSummary(**_prepare_one(case, str(out), config.to_dict())))
            else:
                _in_workers(todo, out, config.to_dict(), min(workers, len(todo)), record)
        order = {c.case_id: i for i, c in enumerate(cases)}
        results.sort(key=lambda c: order.get(c.case_id, len(order)))
        summary = PrepareRunSummary(str(out), dataset, round(time.perf_counter() - t0, 2), results,
                                    list(skipped_inputs or []))
        write_json_atomic(out / "errors.json", _errors(results))
        write_json_atomic(out / "summary.json", summary.to_dict())
        run_log.info("finished in %.1f s: %d done, %d skipped, %d failed", summary.seconds, summary.count("done"),
                     summary.count("skipped"), summary.count("failed"))
    finally:
        for handler in list(run_log.handlers):
            handler.close()
            run_log.removeHandler(handler)
    if show_progress:
        console.print(summary_table(summary))
    return summary


def summary_table(summary: PrepareRunSummary) -> Table:
    """A rich table of the run: one row per case."""
    table = Table(title=f"{summary.dataset}: {summary.count('done')} prepared, {summary.count('skipped')} skipped, "
                        f"{summary.count('failed')} failed in {summary.seconds:.0f} s -> {summary.out_root}")
    for column in ("case", "status", "seconds", "nodules", "lungs (L)", "shape (z, y, x)", "note"):
        table.add_column(column, no_wrap=column == "case")
    colours = {"done": "green", "skipped": "dim", "failed": "red"}
    for c in summary.cases:
        table.add_row(
            c.case_id, f"[{colours.get(c.status, 'white')}]{c.status}[/]",
            f"{c.seconds:.1f}" if c.status != "skipped" else "",
            str(c.n_nodules) if c.status == "done" else "",
            f"{c.lung_volume_ml / 1000:.2f}" if c.lung_volume_ml else "",
            "x".join(str(s) for s in c.shape_zyx) if c.shape_zyx else "",
            (c.error or "")[:120],
        )
    return table


def prepare_lidc(
    src_root: str | Path,
    out_root: str | Path,
    config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    min_readers: int | None = None,
    force: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
) -> PrepareRunSummary:
    """Prepare every annotated CT series of an LIDC-IDRI download (TCIA layout) under ``src_root``.

    ``min_readers`` overrides ``config.min_readers`` (nodules marked by fewer readers are listed as
    excluded and left out of the mask).
    """
    config = config or PrepareConfig()
    if min_readers is not None:
        config = config.replace(min_readers=min_readers)
    cases, skipped = find_lidc_cases(src_root)
    if not cases:
        raise InputError(src_root, "no CT series folder with .dcm files and an LIDC .xml found under it")
    return run_cases(cases, out_root, config, dataset="LIDC-IDRI", workers=workers, force=force,
                     show_progress=show_progress, console=console, skipped_inputs=skipped)


def prepare_luna(
    mhd_root: str | Path,
    annotations_csv: str | Path,
    out_root: str | Path,
    config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    excluded_csv: str | Path | None = None,
    force: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
) -> PrepareRunSummary:
    """Prepare every ``<seriesuid>.mhd`` under ``mhd_root``; nodule masks are spheres (see module doc)."""
    config = config or PrepareConfig()
    cases = find_luna_cases(mhd_root, annotations_csv, excluded_csv)
    if not cases:
        raise InputError(mhd_root, "no .mhd file found under it")
    return run_cases(cases, out_root, config, dataset="LUNA16", workers=workers, force=force,
                     show_progress=show_progress, console=console)
