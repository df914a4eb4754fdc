"""Checkpoints: a save that fails midway (disk full) never breaks last.pt; damaged files are named; export."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from nodulenet.errors import InputError
from nodulenet.model import NoduleNet, model_from_checkpoint_dict, tiny_config
from nodulenet.train.checkpoint_files import (CheckpointWriteError, TrainState, export_model, load_checkpoint,
                                             resume_parts, save_checkpoint, training_checkpoint_dict)
from nodulenet.train.config import TrainConfig
from nodulenet.train.loop import train


def disk_full_midway(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"\x00" * 4096)  # part of the file is written, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


def small_checkpoint(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    cfg = tiny_config()
    model = NoduleNet(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return training_checkpoint_dict(model, cfg, opt, TrainState(global_step=step), TrainConfig().to_dict())


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(small_checkpoint(1), path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", disk_full_midway)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*intact"):
        save_checkpoint(small_checkpoint(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(path)["extra"]["train_state"]["global_step"] == 1


def test_disk_full_during_training(tmp_path: Path, phantom_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = phantom_root
    cfg = TrainConfig.from_dict(dict(
        prepared_roots=[str(root)], train_cases=["phantom-00001"], model="tiny", model_width=0.5,
        model_config={"blocks_per_stage": [1] * 6},
        crop={"crop_size_zyx": [32, 32, 32], "positive_margin_voxels": 2, "samples_per_epoch": 3},
        epochs=1, batch_size=1, workers=0, checkpoint_every_steps=1, threads=1,
    ))

    def fill_disk_after_first_step(state: Any, losses: dict[str, float]) -> None:
        if state.global_step == 1:
            monkeypatch.setattr(torch, "save", disk_full_midway)

    with pytest.raises(CheckpointWriteError, match="last.pt"):
        train(cfg, tmp_path / "run", show_progress=False, on_step=fill_disk_after_first_step)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "run" / "last.pt")["extra"]["train_state"]
    assert state["global_step"] == 1
    assert not list((tmp_path / "run").glob(".last.pt*"))
    # ... and the run resumes from it once there is space again.
    summary = train(None, tmp_path / "run", resume=True, show_progress=False)
    assert summary.status == "finished" and summary.global_step == 3


def test_damaged_or_weights_only_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(small_checkpoint(3), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="last.pt: not a PyTorch checkpoint file"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="nope.pt: checkpoint file does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    exported = export_model(small_checkpoint(4), tmp_path / "model.pt")
    slim = load_checkpoint(exported)
    assert "optimizer" not in slim and slim["extra"]["trained"]["global_step"] == 4
    with pytest.raises(InputError, match="cannot be resumed"):
        resume_parts(slim, exported)
    loaded = model_from_checkpoint_dict(slim)  # the model stage reads training checkpoints as they are
    assert loaded.config == tiny_config()
    for k, v in small_checkpoint(4)["state_dict"].items():
        assert torch.equal(loaded.model.state_dict()[k], v)
