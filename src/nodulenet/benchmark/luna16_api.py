"""``nodulenet benchmark luna16``: from the LUNA16 download to the cross-validated LUNA16 CPM, in one resumable run.

DATA_ROOT is the download as distributed: ``subset0 .. subset9/<seriesuid>.mhd`` (+ ``.raw``), ``annotations.csv``,
``annotations_excluded.csv`` and ``seriesuids.csv`` (at the top or under ``evaluationScript/annotations/``, where
the official archive has them); ``seg-lungs-LUNA16`` may be there and is not used (our own lung mask is part of
the preparation the model was trained with).

Stages (``OUT/benchmark_state.json`` records each, ``OUT/benchmark.log`` narrates them):

1. **prepare** every scan of the subsets into ``OUT/prepared`` (:func:`nodulenet.preprocess.prepare_dataset.run_cases`:
   parallel, resumable), excluded findings kept as such;
2. **folds** = the official subsets: fold ``i`` tests on subset ``i``, validates (checkpoint choice) on subset
   ``i + 1 mod k`` and trains on the rest (``OUT/folds/fold_<i>/split.json``, the ``make-splits`` format);
3. per fold **train** (:func:`.folds.train_fold`) and **predict** its test subset from the ORIGINAL ``.mhd`` files in
   candidates-only mode (every candidate, no mask head): ``fold_<i>/candidates.csv``;
4. **evaluate**: the folds' candidates merged into ``OUT/candidates.csv`` and scored exactly as ``nodulenet evaluate
   froc`` does (:func:`nodulenet.evaluate.evaluate_froc`, bootstrap CI) against the official annotation files over
   the scans of the tree (``OUT/seriesuids.csv``); per fold too. ``OUT/results.json``, ``OUT/results.md`` (the
   table), ``OUT/froc.json`` and ``OUT/froc.png``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import write_json_atomic, write_text_atomic

from .folds import fold_paths, fold_train_config, predict_fold, train_fold
from .report import (
    froc_summary,
    luna_table_markdown,
    print_luna_table,
    timings_per_scan,
)
from .state import StageAnnouncer, benchmark_log, open_state

_SUBSET = re.compile(r"^subset(\d+)$")
EXCLUDED_NAME = "annotations_excluded.csv"


@dataclass(frozen=True)
class LunaTree:
    """What was found in DATA_ROOT."""

    root: Path
    subsets: dict[int, list[Path]]  # subset number -> its .mhd files, sorted
    annotations: Path
    excluded: Path | None
    seriesuids: Path | None

    def uid_of(self, mhd: Path) -> str:
        return mhd.name[: -len(".mhd")]


def _find_file(root: Path, name: str, given: Path | None) -> Path | None:
    if given is not None:
        if not given.is_file():
            raise InputError(given, "file not found")
        return given
    for candidate in (root / name, root / "evaluationScript" / "annotations" / name):
        if candidate.is_file():
            return candidate
    return None


def find_luna_tree(root: str | Path, *, annotations: Path | None = None, excluded: Path | None = None,
                   seriesuids: Path | None = None) -> LunaTree:
    """The subsets and CSV files of a LUNA16 download (see the module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the LUNA16 download: subset0..subset9, annotations.csv)")
    subsets: dict[int, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found = _SUBSET.match(sub.name)
        if found:
            subsets[int(found.group(1))] = sorted(sub.rglob("*.mhd"))
    if not subsets:
        raise InputError(root, "no subset<N> folder found (the LUNA16 download holds subset0 .. subset9)")
    ann = _find_file(root, "annotations.csv", annotations)
    if ann is None:
        raise InputError(root, "no annotations.csv found (give it with --annotations)")
    return LunaTree(root, subsets, ann, _find_file(root, EXCLUDED_NAME, excluded),
                    _find_file(root, "seriesuids.csv", seriesuids))


def luna_folds(tree: LunaTree, n_folds: int) -> list[dict[str, list[str]]]:
    """Fold ``i``: test subset ``i``, validation subset ``i + 1 mod k``, training the rest (series UIDs)."""
    numbers = sorted(tree.subsets)
    if numbers != list(range(n_folds)):
        raise InputError(tree.root, f"--folds {n_folds} needs subset0 .. subset{n_folds - 1}; found "
                                    f"{', '.join(f'subset{n}' for n in numbers)}")
    empty = [n for n in numbers if not tree.subsets[n]]
    if empty:
        raise InputError(tree.root / f"subset{empty[0]}", "holds no .mhd file")
    uids = {n: [tree.uid_of(p) for p in tree.subsets[n]] for n in numbers}
    folds = []
    for i in numbers:
        val = (i + 1) % n_folds if n_folds > 2 else None
        train = sorted(u for n in numbers if n not in (i, val) for u in uids[n])
        folds.append({"train": train, "val": sorted(uids[val]) if val is not None else [], "test": sorted(uids[i])})
    return folds


@dataclass
class BenchmarkResult:
    """What :func:`benchmark_luna16` / :func:`benchmark_lidc` wrote; ``results`` is ``results.json``."""

    out_dir: Path
    results: dict[str, Any]
    skipped_stages: list[str] = field(default_factory=list)


def _write_fold_split(path: Path, fold: int, k: int, cases: dict[str, list[str]]) -> None:
    from nodulenet.data.splits import SPLIT_FORMAT

    write_json_atomic(path, {"format": SPLIT_FORMAT, "fold": fold, "k": k, "seed": 0, **cases,
                             "rule": "LUNA16 official subsets: test = subset i, val = subset (i+1) % k"})


def _merge_candidates(csv_files: Sequence[Path], out: Path) -> int:
    from nodulenet.io.luna_csv import read_luna_candidates, write_luna_candidates

    rows = [c for path in csv_files for c in read_luna_candidates(path)]
    write_luna_candidates(out, rows)
    return len(rows)


def _device(gpus: int) -> str:
    """``cuda`` for ``gpus > 0`` (refused without a GPU: the run would take weeks on a CPU unnoticed), else cpu."""
    if gpus < 0:
        raise NoduleNetError(f"--gpus must be >= 0, got {gpus}")
    if gpus == 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise NoduleNetError(f"--gpus {gpus}: this PyTorch sees {found} CUDA GPU(s); use --gpus 0 for the CPU")
    return "cuda"


def benchmark_luna16(data_root: str | Path, out_dir: str | Path, *, train_config: Any, folds: int = 10,
                     prepare_config: Any = None, gpus: int = 0, workers: int = 1, tta: str = "none",
                     threads: int | None = None, resume: bool = False, annotations: Path | None = None,
                     excluded: Path | None = None, seriesuids: Path | None = None, n_bootstrap: int = 1000,
                     show_progress: bool = True, console: Console | None = None) -> BenchmarkResult:
    """Run (or resume) the whole LUNA16 protocol of the module doc; returns ``results.json``'s content."""
    from nodulenet.evaluate import evaluate_froc, write_froc_outputs
    from nodulenet.io.luna_csv import read_seriesuids
    from nodulenet.preprocess.config import PrepareConfig
    from nodulenet.preprocess.prepare_dataset import find_luna_cases, run_cases

    console = console or Console(stderr=True)
    out = Path(out_dir)
    tree = find_luna_tree(data_root, annotations=annotations, excluded=excluded, seriesuids=seriesuids)
    fold_cases = luna_folds(tree, folds)
    prepare_config = prepare_config or PrepareConfig()
    settings = {"data_root": str(Path(data_root).resolve()), "folds": folds, "train": train_config.to_dict(),
                "prepare": prepare_config.to_dict(), "tta": tta, "gpus": gpus, "workers": workers,
                "threads": threads, "annotations": str(tree.annotations), "n_bootstrap": n_bootstrap}
    device = _device(gpus)
    state = open_state(out, "luna16", settings, resume)
    with benchmark_log(out) as log:
        announce = StageAnnouncer(log, 2 + 2 * folds, console if show_progress else None)
        log.info("benchmark luna16: %s -> %s, %d folds, %d scans (%s), resume=%s", tree.root, out, folds,
                 sum(len(v) for v in tree.subsets.values()),
                 ", ".join(f"subset{n}: {len(v)}" for n, v in sorted(tree.subsets.items())), resume)
        prepared = out / "prepared"
        excluded_csv = tree.excluded
        if excluded_csv is None:  # an empty list keeps evaluate_froc's interface; said in the log
            excluded_csv = out / EXCLUDED_NAME
            write_text_atomic(excluded_csv, "seriesuid,coordX,coordY,coordZ,diameter_mm\n")
            log.warning("no %s in %s: scored without excluded findings", EXCLUDED_NAME, tree.root)

        # 1. prepare
        announce("prepare every scan", state.done("prepare"))
        if not state.done("prepare"):
            cases = [c for n in sorted(tree.subsets) for c in find_luna_cases(tree.root / f"subset{n}",
                                                                               tree.annotations, tree.excluded)]
            summary = run_cases(cases, prepared, prepare_config, dataset="LUNA16", workers=workers,
                                show_progress=show_progress, console=console)
            if summary.failed:
                first = summary.failed[0]
                raise InputError(first.error_file or first.source, f"preparation failed: {first.error} "
                                 f"({len(summary.failed)} case(s) failed; see {prepared / 'errors.json'})")
            state.finish("prepare", seconds=summary.seconds, n_cases=len(summary.cases),
                         case_seconds={c.case_id: c.seconds for c in summary.cases if c.status == "done"})

        # 2.-3. per fold: train, predict the held-out subset
        for i, cases in enumerate(fold_cases):
            paths = fold_paths(out, i)
            _write_fold_split(paths.split, i, folds, cases)
            key = f"fold_{i}.train"
            announce(f"fold {i}: train on {len(cases['train'])} scans", state.done(key))
            if not state.done(key):
                summary = train_fold(fold_train_config(train_config, prepared, paths.split), paths, gpus=gpus,
                                     show_progress=show_progress, log=log)
                state.finish(key, seconds=summary["benchmark_seconds"], steps=summary.get("global_step"),
                             best_cpm=summary.get("best_cpm"))
            key = f"fold_{i}.predict"
            announce(f"fold {i}: predict subset{i} ({len(cases['test'])} scans)", state.done(key))
            if not state.done(key):
                run = predict_fold(tree.subsets[i], paths, weights=paths.model, candidates_only=True,
                                   device=device, tta=tta, threads=threads, show_progress=show_progress)
                n = _merge_candidates([Path(r.out_dir) / "candidates.csv" for r in run.results],
                                      paths.root / "candidates.csv")
                write_text_atomic(paths.root / "seriesuids.csv", "".join(f"{u}\n" for u in cases["test"]))
                state.finish(key, n_candidates=n, scan_seconds={r.name: r.stage_seconds for r in run.results})
                log.info("fold %d: %d candidates on %d scans", i, n, len(run.results))

        # 4. merge + evaluate
        announce("merge and score (LUNA16 FROC)", False)
        scans = [u for cases in fold_cases for u in cases["test"]]
        n_candidates = _merge_candidates([fold_paths(out, i).root / "candidates.csv" for i in range(folds)],
                                         out / "candidates.csv")
        write_text_atomic(out / "seriesuids.csv", "".join(f"{u}\n" for u in scans))
        if tree.seriesuids is not None:
            listed = set(read_seriesuids(tree.seriesuids))
            missing, unlisted = listed - set(scans), set(scans) - listed
            if missing:
                log.warning("%d scans listed in %s are not in the tree (a partial download?): scored without them",
                            len(missing), tree.seriesuids)
            if unlisted:
                log.warning("%d scans of the tree are not listed in %s: scored too", len(unlisted), tree.seriesuids)
        t0 = time.perf_counter()
        overall = evaluate_froc(out / "candidates.csv", tree.annotations, excluded_csv, out / "seriesuids.csv",
                                n_bootstrap=n_bootstrap, seed=0)
        write_froc_outputs(overall, out)
        per_fold = []
        for i in range(folds):
            paths = fold_paths(out, i)
            try:
                fold_result = evaluate_froc(paths.root / "candidates.csv", tree.annotations, excluded_csv,
                                            paths.root / "seriesuids.csv", n_bootstrap=n_bootstrap, seed=0)
            except InputError as exc:  # a fold without any nodule has no sensitivity
                log.warning("fold %d not scored on its own: %s", i, exc.problem)
                per_fold.append({"fold": i, "n_scans": len(fold_cases[i]["test"]), "cpm": None})
                continue
            write_froc_outputs(fold_result, paths.root)
            per_fold.append({"fold": i, **froc_summary(fold_result)})
        results = {
            "dataset": "LUNA16", "protocol": f"{folds}-fold cross-validation on the official subsets",
            "overall": froc_summary(overall), "folds": per_fold, "n_candidates": n_candidates,
            "files": {"candidates": str(out / "candidates.csv"), "seriesuids": str(out / "seriesuids.csv"),
                      "annotations": str(tree.annotations), "annotations_excluded": str(excluded_csv),
                      "froc_json": str(out / "froc.json"), "froc_png": str(out / "froc.png")},
            "timings": timings_per_scan(state.stages, folds),
            "evaluate_seconds": round(time.perf_counter() - t0, 2),
            "settings": state.settings,
        }
        write_json_atomic(out / "results.json", results)
        write_text_atomic(out / "results.md", luna_table_markdown(results))
        state.finish("evaluate", cpm=overall.cpm)
        log.info("CPM %.4f over %d scans, %d nodules (95%% CI %s)", overall.cpm, overall.n_scans, overall.n_nodules,
                 overall.cpm_ci)
        if show_progress:
            print_luna_table(results, console)
        return BenchmarkResult(out, results, announce.skipped)
