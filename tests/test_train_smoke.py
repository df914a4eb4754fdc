"""Smoke test of the whole training path on phantom cases: tiny network, 64^3 crops, all heads from the start.

Losses must be finite and fall; the run must leave its documented outputs (config, log, TensorBoard, checkpoints,
validation history, shipped model). Also the CLI commands (make-splits, train) end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nodulenet.data.synthetic import prepare_phantom_cases
from nodulenet.model import model_from_checkpoint_dict
from nodulenet.train.checkpoint_files import load_checkpoint
from nodulenet.commands.train import build_app
from nodulenet.train.config import TrainConfig
from nodulenet.train.loop import train

HEADS = ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask")



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_losses_are_finite_and_fall(phantom_root: Path, tmp_path: Path,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    steps = 12
    val_root = tmp_path_factory.getbasetemp() / "phantom_val_cases"
    prepare_phantom_cases(val_root, [4])
    cfg = TrainConfig.from_dict(dict(
        prepared_roots=[str(phantom_root), str(val_root)], train_cases=["phantom-00001", "phantom-00003"],
        val_cases=["phantom-00004"],
        model="tiny", model_config={"blocks_per_stage": [1] * 6, "rpn_train_pre_nms_top_n": 500,
                                    "rpn_train_post_nms_top_n": 50},
        crop={"crop_size_zyx": [64, 64, 64], "positive_margin_voxels": 6, "samples_per_epoch": 2 * steps},
        epochs=1, batch_size=2, workers=0, optimizer="adamw", rcnn_start_fraction=0.0, mask_start_fraction=0.0,
        val_every_epochs=1, seed=0, log_every_steps=4,
    ))
    history: list[dict[str, float]] = []
    summary = train(cfg, tmp_path / "run", show_progress=False, on_step=lambda state, losses: history.append(losses))
    assert summary.status == "finished" and len(history) == steps
    for head in (*HEADS, "total"):
        values = np.array([h[head] for h in history])
        assert np.all(np.isfinite(values)), head
        assert values[-4:].mean() < values[:4].mean(), (head, values.round(3))
    totals = np.array([h["total"] for h in history])
    assert totals[-4:].mean() < 0.6 * totals[:4].mean(), totals.round(3)

    out = tmp_path / "run"
    for name in ("config.json", "train.log", "last.pt", "model.pt", "summary.json", "history.json",
                 "skipped_cases.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"loss/{h}" for h in (*HEADS, "total")} | {"train/lr", "val/cpm", "train/grad_norm"} <= tags
    assert [e.step for e in events.Scalars("loss/total")] == [4, 8, 12]  # log_every_steps=4
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["steps_per_epoch"] == steps and config["model"]["blocks_per_stage"] == [1] * 6
    assert TrainConfig.from_dict(config["train"]) == cfg
    log = (out / "train.log").read_text()
    assert "rpn_cls" in log and "validation after epoch 0: CPM" in log
    result = json.loads((out / "history.json").read_text())[0]
    assert result["mode"] == "whole-case" and 0.0 <= result["cpm"] <= 1.0 and result["n_nodules"] == 3
    card = (out / "MODEL_CARD.md").read_text()
    assert "not trained on patient-level clinical data; not for diagnosis" in card and "Seed 0" in card
    assert f"{result['cpm']:.4f}" in card
    shipped = load_checkpoint(out / "model.pt")
    assert "optimizer" not in shipped
    model = model_from_checkpoint_dict(shipped).model
    assert model.config == cfg.model_network_config()
    # predict must prepare a new scan exactly as the training cases were prepared
    from nodulenet.infer.weights import load_model
    from nodulenet.io.config_files import read_config_file

    case_dir = next(p.parent for p in phantom_root.rglob("done.json"))
    recorded = read_config_file(case_dir / "config.json", section="prepare")
    assert shipped["extra"]["prepare_config"] == recorded
    assert load_model(out / "model.pt").prepare_config.to_dict() == recorded


def test_cli_make_splits_and_train(phantom_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    # make-splits: 2 phantom patients cannot fill 3 folds; 2 folds work (no validation fold then).
    result = runner.invoke(app, ["make-splits", str(phantom_root), "--out", str(tmp_path / "splits"), "--folds", "3"])
    assert result.exit_code != 0 and "cannot fill 3 folds" in str(result.exception)
    result = runner.invoke(app, ["make-splits", str(phantom_root), "--out", str(tmp_path / "splits"), "--folds", "2"])
    assert result.exit_code == 0, result.output
    fold = json.loads((tmp_path / "splits" / "fold_0.json").read_text())
    assert len(fold["train"]) == 1 and len(fold["test"]) == 1 and fold["val"] == []
    result = runner.invoke(app, [
        "train", "--out", str(tmp_path / "run"), "--data", str(phantom_root), "--split",
        str(tmp_path / "splits" / "fold_0.json"), "--model", "tiny", "--model-width", "0.5", "--crop-size", "32",
        "--batch-size", "1", "--max-steps", "2", "--workers", "0", "--threads", "1", "--no-progress",
        "--set", "crop.positive_margin_voxels=2", "--set", "model_config.blocks_per_stage=[1,1,1,1,1,1]",
    ])
    assert result.exit_code == 0, result.output
    assert "stopped: 2 steps" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["global_step"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["cases"]["train"] == fold["train"] and saved["train"]["crop"]["crop_size_zyx"] == [32, 32, 32]
