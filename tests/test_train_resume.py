"""``--resume`` continues a killed run exactly: identical weights and optimizer state to an uninterrupted run (CPU).

The kill happens after step 3 of 4 (mid-epoch, between an epoch-end validation and the last step); the resumed run
uses 2 loader workers where the others used none, so the batches must not depend on the worker count either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from nodulenet.errors import InputError
from nodulenet.train.checkpoint_files import load_checkpoint
from nodulenet.train.config import TrainConfig
from nodulenet.train.loop import train



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(root: Path, **changes: Any) -> TrainConfig:
    d: dict[str, Any] = dict(
        prepared_roots=[str(root)], train_cases=["phantom-00001"], val_cases=["phantom-00003"], model="tiny",
        model_width=0.5, model_config={"blocks_per_stage": [1] * 6, "rpn_train_pre_nms_top_n": 300,
                                       "rpn_train_post_nms_top_n": 30, "rpn_test_post_nms_top_n": 30},
        crop={"crop_size_zyx": [32, 32, 32], "positive_margin_voxels": 2, "samples_per_epoch": 4,
              "positive_fraction": 0.5, "random_fraction": 0.25, "lung_fraction": 0.25},
        epochs=2, batch_size=2, workers=0, val_every_epochs=1, rcnn_start_fraction=0.5, mask_start_fraction=0.5,
        log_every_steps=1, seed=11,
    )
    d.update(changes)
    return TrainConfig.from_dict(d)


def assert_same_checkpoints(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), k
    ta, tb = a["extra"]["train_state"], b["extra"]["train_state"]
    for key in ("epoch", "step_in_epoch", "global_step", "samples_seen", "best_cpm", "best_epoch"):
        assert ta[key] == tb[key], key


class Killed(Exception):
    pass


def test_killed_then_resumed_run_equals_uninterrupted_run(phantom_root: Path, tmp_path: Path) -> None:
    cfg = small_config(phantom_root, checkpoint_every_steps=1)
    full = train(cfg, tmp_path / "full", show_progress=False)
    assert full.status == "finished" and full.global_step == 4

    def kill_after_3(state: Any, losses: dict[str, float]) -> None:
        if state.global_step == 3:
            raise Killed()

    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", show_progress=False, on_step=kill_after_3)
    partial = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert partial["extra"]["train_state"]["global_step"] == 3
    assert partial["extra"]["train_state"]["step_in_epoch"] == 1  # mid-epoch
    with pytest.raises(InputError, match="already holds a run"):
        train(cfg, tmp_path / "killed", show_progress=False)
    with pytest.raises(InputError, match="other settings"):
        train(small_config(phantom_root, checkpoint_every_steps=1, lr=0.5), tmp_path / "killed", resume=True,
              show_progress=False)
    resumed = train(small_config(phantom_root, checkpoint_every_steps=1, workers=2), tmp_path / "killed",
                    resume=True, show_progress=False)
    assert resumed.status == "finished" and resumed.global_step == 4
    assert_same_checkpoints(load_checkpoint(tmp_path / "full" / "last.pt"),
                            load_checkpoint(tmp_path / "killed" / "last.pt"))
    assert full.history == [] or [h["cpm"] for h in full.history] == [h["cpm"] for h in resumed.history]
    # The stored config is used when none is given.
    again = train(None, tmp_path / "killed", resume=True, show_progress=False)
    assert again.global_step == 4


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(phantom_root: Path, tmp_path: Path) -> None:
    """A real SIGKILL at an unknown moment: resume must still end with the uninterrupted run's weights."""
    import yaml

    cfg = small_config(phantom_root, checkpoint_every_steps=1, epochs=3, val_every_epochs=0)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nodulenet", "train", "--config", str(config_file), "--no-progress",
           "--threads", "1"]
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["extra"]["train_state"]["global_step"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["extra"]["train_state"]["global_step"]
    assert 2 <= killed_at < 6
    subprocess.run([*cmd[:4], "--out", str(tmp_path / "killed"), "--resume", "--no-progress"], check=True, env=env,
                   capture_output=True)
    assert_same_checkpoints(load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(last))
