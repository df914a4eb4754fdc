"""``nodulenet benchmark lidc``: LIDC-IDRI cross-validation with the NoduleNet paper's Table 2 protocol.

DATA_ROOT is an LIDC-IDRI download in TCIA layout (patient / study / series folders with the readers' XML).

Stages (resumable like :mod:`.luna16_api`, same ``benchmark_state.json`` / ``benchmark.log``):

1. **prepare** every annotated CT series (:func:`nodulenet.preprocess.prepare_dataset.prepare_lidc`; training nodules:
   ``PrepareConfig.min_readers``, default 3, mask = ``consensus`` of the readers' outlines);
2. **folds** by patient (:func:`nodulenet.data.splits.make_splits`, ``--folds``, default 6 as the paper);
3. per fold **train**, then **predict** the held-out series from the ORIGINAL DICOM (full prediction with masks at
   ``--threshold``): a label map per case on the scan's own grid;
4. **evaluate** per nodule Dice and IoU (:func:`nodulenet.evaluate.evaluate_segmentation`) against the reference
   nodules marked by >= 3 and by >= 4 of the 4 readers (each a label map on the same grid, ``OUT/seg/reference_ge3``
   and ``reference_ge4``), with both conventions for missed nodules (counted as 0; left out). ``OUT/results.json``,
   ``OUT/results.md``, and ``OUT/seg/ge<k>/`` (``seg_metrics.json`` + the per-nodule CSV).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import write_json_atomic, write_text_atomic

from .folds import fold_paths, fold_train_config, predict_fold, train_fold
from .luna16_api import BenchmarkResult, _device
from .report import seg_table_markdown
from .state import StageAnnouncer, benchmark_log, open_state

READER_LEVELS = (3, 4)


def _write_references(case_id: str, series_dir: Path, series_uid: str, seg_root: Path, consensus: str) -> None:
    """Reference label maps of one case: nodules of >= 3 and of >= 4 readers, on the scan's own grid."""
    from nodulenet.io.dicom import read_dicom_series
    from nodulenet.io.image_files import write_image
    from nodulenet.preprocess.lidc_nodules import lidc_labels_for_series

    ct = read_dicom_series(series_dir, series_uid or None)
    for level in READER_LEVELS:
        path = seg_root / f"reference_ge{level}" / f"{case_id}.nii.gz"
        if path.is_file():
            continue
        labels = lidc_labels_for_series(series_dir, ct, min_readers=level, consensus=consensus)  # type: ignore[arg-type]
        if labels is None:
            raise InputError(series_dir, "no LIDC annotation XML for this series")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(labels.instance_mask, path)


def benchmark_lidc(data_root: str | Path, out_dir: str | Path, *, train_config: Any, folds: int = 6, seed: int = 0,
                   prepare_config: Any = None, gpus: int = 0, workers: int = 1, threshold: float = 0.5,
                   threads: int | None = None, resume: bool = False, show_progress: bool = True,
                   console: Console | None = None) -> BenchmarkResult:
    """Run (or resume) the LIDC-IDRI protocol of the module doc; returns ``results.json``'s content."""
    from nodulenet.data.cases import patient_id_for
    from nodulenet.data.splits import make_splits, read_split, write_splits
    from nodulenet.evaluate import evaluate_segmentation, write_seg_outputs
    from nodulenet.preprocess.config import PrepareConfig
    from nodulenet.preprocess.prepare_dataset import find_lidc_cases, run_cases

    console = console or Console(stderr=True)
    out = Path(out_dir)
    prepare_config = prepare_config or PrepareConfig()
    cases, skipped_inputs = find_lidc_cases(data_root)
    if not cases:
        raise InputError(data_root, "no CT series folder with .dcm files and an LIDC .xml found under it")
    by_id = {c.case_id: c for c in cases}
    device = _device(gpus)
    settings = {"data_root": str(Path(data_root).resolve()), "folds": folds, "seed": seed,
                "train": train_config.to_dict(), "prepare": prepare_config.to_dict(), "threshold": threshold,
                "gpus": gpus, "workers": workers, "threads": threads}
    state = open_state(out, "lidc", settings, resume)
    with benchmark_log(out) as log:
        announce = StageAnnouncer(log, 2 + 2 * folds, console if show_progress else None)
        prepared = out / "prepared"
        announce(f"prepare {len(cases)} series", state.done("prepare"))
        if not state.done("prepare"):
            summary = run_cases(cases, prepared, prepare_config, dataset="LIDC-IDRI", workers=workers,
                                show_progress=show_progress, console=console, skipped_inputs=skipped_inputs)
            if summary.failed:
                first = summary.failed[0]
                raise InputError(first.error_file or first.source, f"preparation failed: {first.error}")
            state.finish("prepare", seconds=summary.seconds, n_cases=len(summary.cases),
                         case_seconds={c.case_id: c.seconds for c in summary.cases if c.status == "done"})
        splits_dir = out / "splits"
        if not (splits_dir / "splits.json").is_file():
            patients = {c.case_id: patient_id_for(c.case_id) for c in cases}
            try:
                splits = make_splits(patients, folds, seed)
            except ValueError as exc:
                raise NoduleNetError(f"{data_root}: {exc}") from None
            write_splits(splits, patients, splits_dir, [str(prepared)])
        seg_root = out / "seg"
        for i in range(folds):
            paths = fold_paths(out, i)
            split = read_split(splits_dir / f"fold_{i}.json")
            paths.root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(splits_dir / f"fold_{i}.json", paths.split)
            key = f"fold_{i}.train"
            announce(f"fold {i}: train on {len(split.train)} series", state.done(key))
            if not state.done(key):
                summary = train_fold(fold_train_config(train_config, prepared, paths.split), paths, gpus=gpus,
                                     show_progress=show_progress, log=log)
                state.finish(key, seconds=summary["benchmark_seconds"], steps=summary.get("global_step"))
            key = f"fold_{i}.predict"
            announce(f"fold {i}: predict {len(split.test)} held-out series", state.done(key))
            if not state.done(key):
                test = [by_id[c] for c in split.test]
                run = predict_fold([c.series_dir for c in test], paths, weights=paths.model, candidates_only=False,
                                   device=device, threshold=threshold, threads=threads, show_progress=show_progress)
                for case, result in zip(test, run.results):
                    files = result.details.get("files") or {}  # a skipped (already done) scan lists none
                    label_map = Path(files.get("label_map") or Path(result.out_dir) / "labels.nii.gz")
                    target = seg_root / "predicted" / f"{case.case_id}.nii.gz"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(label_map, target)
                    _write_references(case.case_id, case.series_dir, case.series_instance_uid, seg_root,
                                      prepare_config.consensus)
                state.finish(key, scan_seconds={r.name: r.stage_seconds for r in run.results})

        announce("score Dice / IoU per nodule", False)
        segmentation = {}
        for level in READER_LEVELS:
            result = evaluate_segmentation(seg_root / "predicted", seg_root / f"reference_ge{level}")
            write_seg_outputs(result, seg_root / f"ge{level}")
            d = result.to_dict()
            d.pop("nodules")
            segmentation[f">= {level} readers"] = d
        results = {"dataset": "LIDC-IDRI", "protocol": f"{folds}-fold cross-validation by patient (NoduleNet Table 2)",
                   "segmentation": segmentation, "threshold": threshold,
                   "consensus": prepare_config.consensus, "n_cases": len(cases), "settings": state.settings}
        write_json_atomic(out / "results.json", results)
        write_text_atomic(out / "results.md", seg_table_markdown(results))
        state.finish("evaluate")
        if show_progress:
            console.print(seg_table_markdown(results))
        return BenchmarkResult(out, results, announce.skipped)
