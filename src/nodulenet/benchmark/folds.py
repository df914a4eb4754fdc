"""The per-fold stages of a benchmark: train one model (``nodulenet train``'s function, or torchrun for DDP) and
predict its held-out scans with it.

Both are resumable on their own: training continues from the fold's ``last.pt``, prediction skips scans whose
complete output is there. Paths of one fold live under ``OUT/folds/fold_<i>/``: ``split.json`` (the
``make-splits`` format), ``train_config.json``, ``train/`` (the training run), ``predict/`` (predict's folders).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import NoduleNetError
from nodulenet.io.atomic import write_json_atomic


@dataclass(frozen=True)
class FoldPaths:
    root: Path

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def train_config(self) -> Path:
        return self.root / "train_config.json"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def model(self) -> Path:
        from nodulenet.train.checkpoint_files import FINAL_MODEL

        return self.train_dir / FINAL_MODEL

    @property
    def predict_dir(self) -> Path:
        return self.root / "predict"


def fold_paths(out: Path, fold: int) -> FoldPaths:
    return FoldPaths(out / "folds" / f"fold_{fold}")


def fold_train_config(base: Any, prepared_root: Path, split_file: Path) -> Any:
    """The run's training settings with this fold's cases (everything else as the user gave it)."""
    return base.with_overrides({"prepared_roots": [str(prepared_root)], "split_file": str(split_file),
                                "train_cases": None, "val_cases": None})


def _torchrun_command(paths: FoldPaths, gpus: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "nodulenet", "train", "--config", str(paths.train_config), "--out", str(paths.train_dir),
           "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def train_fold(config: Any, paths: FoldPaths, *, gpus: int = 0, show_progress: bool = True,
               log: logging.Logger | None = None) -> dict[str, Any]:
    """Train (or finish training) the fold's model; returns the training summary as a dict.

    ``gpus > 1`` runs ``torchrun --nproc_per_node gpus -m nodulenet train`` (DDP, one process per GPU);
    otherwise :func:`nodulenet.train.loop.train` in this process (GPU 0 when there is one, else the CPU).
    """
    import json

    from nodulenet.train.checkpoint_files import LAST
    from nodulenet.train.loop import train

    write_json_atomic(paths.train_config, {"train": config.to_dict()})
    resume = (paths.train_dir / LAST).is_file()
    if log:
        log.info("train %s: %s", paths.root.name, "resuming from last.pt" if resume else "starting")
    t0 = time.perf_counter()
    if gpus > 1:
        cmd = _torchrun_command(paths, gpus, resume)
        if log:
            log.info("running %s", " ".join(cmd))
        done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
        if done.returncode != 0:
            raise NoduleNetError(f"{paths.train_dir}: torchrun training exited with code {done.returncode} "
                                 f"(see {paths.train_dir / 'train.log'})")
        summary = json.loads((paths.train_dir / "summary.json").read_text())
    else:
        summary = train(config, paths.train_dir, resume=resume,
                        show_progress=show_progress).to_dict()
    if summary.get("status") != "finished" or not paths.model.is_file():
        raise NoduleNetError(f"{paths.train_dir}: training ended as {summary.get('status')!r} without "
                             f"{paths.model.name} (max_steps reached before the last epoch?); see train.log")
    summary["benchmark_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def predict_fold(scans: Sequence[Path], paths: FoldPaths, *, weights: Path, candidates_only: bool, device: str,
                 tta: str = "none", threshold: float = 0.5, threads: int | None = None,
                 show_progress: bool = True) -> Any:
    """Predict ``scans`` with the fold's model into ``paths.predict_dir``; returns the :class:`PredictRun`.

    Candidates-only (LUNA16 FROC: every candidate, no masks) or the full prediction (LIDC Dice/IoU: label maps).
    Failed scans are an error: a benchmark that silently drops scans would score a different cohort.
    """
    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import PredictOptions, Predictor, predict_scans

    options = PredictOptions(weights=weights, device=device, candidates_only=candidates_only, tta=tta,
                             threshold=0.0 if candidates_only else threshold, dicom_outputs=False, threads=threads)
    run = predict_scans(list(scans), paths.predict_dir, shard=Shard(rank=0, world_size=1, local_rank=0),
                        progress=show_progress, predictor=Predictor(options))
    if run.failed:
        first = run.failed[0]
        raise NoduleNetError(f"{first.scan}: prediction failed ({first.error}); {len(run.failed)} of "
                             f"{len(run.results)} scan(s) of {paths.root.name} failed, see {run.summary_path}")
    return run
