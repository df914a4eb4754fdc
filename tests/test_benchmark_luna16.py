"""``nodulenet benchmark luna16`` end to end on a miniature LUNA16 download the test builds itself.

The tree: phantoms as ``subset0..subset2/<uid>.mhd`` with LUNA16 CSVs (excluded findings, diameter -1 rows, a CRLF
``seriesuids.csv``) and the two real LIDC-IDRI series converted to MetaImage (real direction, spacing and world mm,
their rows of the official LUNA16 files). Three folds of a few fine-tuning steps each, starting from the shipped demo
model so that the FROC is not trivially zero. The run is killed in the middle of fold 1's training and resumed; then:

- the resumed run skips what was finished (preparation, fold 0) and continues fold 1 from its ``last.pt``;
- the merged candidates are the folds' held-out predictions, and one scan's candidates equal a by-hand
  ``nodulenet predict --candidates-only`` with that fold's model;
- ``results.json``'s FROC equals ``nodulenet evaluate froc`` run by hand on the merged candidates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nodulenet.benchmark.mini_luna import write_mini_luna_tree
from nodulenet.cli import app
from nodulenet.infer.weights import shipped_weights_path
from nodulenet.io.luna_csv import read_luna_candidates, read_seriesuids

FOLD_STEPS = 6


def _train_config(path: Path) -> Path:
    # The demo model's network (quarter width), fine-tuned with a tiny learning rate: plumbing, not learning.
    config = {
        "model": "tiny", "init_checkpoint": str(shipped_weights_path()), "epochs": 1, "batch_size": 1,
        "optimizer": "adamw", "lr": 1.0e-6, "rcnn_start_fraction": 0.0, "mask_start_fraction": 0.0, "workers": 0,
        "threads": 1, "val_every_epochs": 0, "log_every_steps": 1, "checkpoint_every_steps": 1, "amp": "off",
        "crop": {"crop_size_zyx": [48, 48, 48], "positive_margin_voxels": 4, "samples_per_epoch": FOLD_STEPS},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def mini_luna(tmp_path_factory: pytest.TempPathFactory, lidc_0001_series: Path, lidc_0002_series: Path,
              luna_root: Path) -> Path:
    root = tmp_path_factory.mktemp("mini_luna")
    write_mini_luna_tree(root, {0: [2000, 2001], 1: [2002], 2: [2003]},
                         real_series={1: [lidc_0001_series], 2: [lidc_0002_series]}, official_csv_dir=luna_root)
    return root


def _command(tree: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nodulenet", "benchmark", "luna16", str(tree), "-o", str(out), "--folds", "3",
            "--config", str(config), "--threads", "1", "--bootstrap", "200", "--no-progress", *extra]


def _run_until_killed(cmd: list[str], marker: Path, log: Path, timeout: float = 400.0) -> None:
    """Start the benchmark and SIGKILL it as soon as ``marker`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                if proc.poll() is not None:
                    raise AssertionError(f"the benchmark ended ({proc.returncode}) before {marker} appeared: "
                                         f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{marker} did not appear within {timeout} s")
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_benchmark_runs_resumes_after_a_kill_and_scores_like_evaluate_froc(mini_luna: Path, tmp_path: Path) -> None:
    config = _train_config(tmp_path / "train.yaml")
    out = tmp_path / "bench"
    fold1_last = out / "folds" / "fold_1" / "train" / "last.pt"
    _run_until_killed(_command(mini_luna, out, config), fold1_last, tmp_path / "first.log")
    state = json.loads((out / "benchmark_state.json").read_text())
    assert set(state["stages"]) == {"prepare", "fold_0.train", "fold_0.predict"}, state["stages"]
    assert not (out / "results.json").exists()

    # Without --resume an existing run is refused, with one clear line.
    refused = subprocess.run(_command(mini_luna, out, config), capture_output=True, text=True, check=False,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr

    resumed = subprocess.run(_command(mini_luna, out, config, "--resume"), capture_output=True, text=True, check=False,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (out / "benchmark.log").read_text()
    for skipped in ("prepare every scan - already done, skipped", "fold 0: train on 2 scans - already done, skipped",
                    "fold 0: predict subset0 (2 scans) - already done, skipped"):
        assert skipped in log
    assert "train fold_1: resuming from last.pt" in log
    train_summary = json.loads((out / "folds" / "fold_1" / "train" / "summary.json").read_text())
    assert train_summary["status"] == "finished" and train_summary["global_step"] == FOLD_STEPS

    # The scans scored: every scan of the tree, the official seriesuids.csv (CRLF) agreeing.
    scans = read_seriesuids(out / "seriesuids.csv")
    assert sorted(scans) == sorted(read_seriesuids(mini_luna / "seriesuids.csv")) and len(scans) == 6

    # Merged candidates = the folds' per-scan outputs; one of them re-predicted by hand gives the same rows.
    merged = read_luna_candidates(out / "candidates.csv")
    per_scan = [c for i in range(3) for d in sorted((out / "folds" / f"fold_{i}" / "predict").iterdir())
                if d.is_dir() for c in read_luna_candidates(d / "candidates.csv")]
    assert sorted(merged, key=repr) == sorted(per_scan, key=repr) and len(merged) > 0
    uid = "1.2.826.0.1.3680043.10.1410.2002"
    runner = CliRunner()
    by_hand = runner.invoke(app, ["predict", str(mini_luna / "subset1" / f"{uid}.mhd"), "-o", str(tmp_path / "hand"),
                                  "--weights", str(out / "folds" / "fold_1" / "train" / "model.pt"),
                                  "--candidates-only", "--threads", "1"])
    assert by_hand.exit_code == 0, by_hand.output
    hand_rows = read_luna_candidates(tmp_path / "hand" / uid / "candidates.csv")
    assert hand_rows == [c for c in merged if c.seriesuid == uid]

    # results.json == `nodulenet evaluate froc` by hand on the merged candidates.
    results = json.loads((out / "results.json").read_text())
    by_hand = runner.invoke(app, ["evaluate", "froc", str(out / "candidates.csv"),
                                  "--annotations", str(mini_luna / "annotations.csv"),
                                  "--excluded", str(mini_luna / "annotations_excluded.csv"),
                                  "--seriesuids", str(out / "seriesuids.csv"), "-o", str(tmp_path / "froc"),
                                  "--bootstrap", "200"])
    assert by_hand.exit_code == 0, by_hand.output
    froc = json.loads((tmp_path / "froc" / "froc.json").read_text())
    overall = results["overall"]
    assert overall["cpm"] == pytest.approx(froc["cpm"], abs=1e-12)
    assert overall["cpm_ci95"] == pytest.approx(froc["cpm_ci"], abs=1e-12)
    assert overall["n_nodules"] == froc["n_nodules"] == 13  # 3 per phantom (the 4th excluded) + LIDC-IDRI-0001's
    assert overall["n_hits"] == froc["n_hits"] and overall["n_false_positives"] == froc["n_false_positives"]
    # The shipped model, barely touched, finds phantom nodules: a FROC that could have gone wrong.
    assert 0.3 < overall["cpm"] <= 1.0, overall
    assert [f["n_scans"] for f in results["folds"]] == [2, 2, 2]
    for name in ("froc.png", "results.md", "benchmark.log"):
        assert (out / name).is_file(), name
    assert "| all folds | 6 | 13 |" in (out / "results.md").read_text()
    assert results["timings"]["prepare_s_per_scan"] > 0 and results["timings"]["predict_s_per_scan"]["network_s"] > 0
