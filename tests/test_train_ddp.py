"""DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo): both ranks end with identical weights.

The two ranks train on different crops (torch's DistributedSampler gives each its own share), so without gradient
averaging their weights would drift apart after the first step; the digests compared are SHA-256 over every
parameter and buffer, gathered from each rank at the end of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from nodulenet.train.checkpoint_files import load_checkpoint
from nodulenet.train.config import TrainConfig



def test_two_processes_hold_identical_weights(phantom_root: Path, tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(dict(
        prepared_roots=[str(phantom_root)], model="tiny", model_width=0.5,
        model_config={"blocks_per_stage": [1] * 6, "rpn_train_pre_nms_top_n": 300, "rpn_train_post_nms_top_n": 30},
        crop={"crop_size_zyx": [32, 32, 32], "positive_margin_voxels": 2, "samples_per_epoch": 12,
              "positive_fraction": 0.5, "lung_fraction": 0.5},
        epochs=1, batch_size=4, workers=0, val_every_epochs=0, rcnn_start_fraction=0.0, mask_start_fraction=0.0,
        max_steps=3, seed=5, log_every_steps=1, threads=1,
    ))
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "nodulenet", "train", "--config", str(config_file), "--out", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    digests = summary["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["backend"] == "gloo" and resolved["per_process_batch"] == 2
    # Rank 0's checkpoint holds the same weights the ranks agreed on, and they moved away from the initial ones.
    from nodulenet.train.distributed import weights_digest
    from nodulenet.model import NoduleNet
    import torch

    model = NoduleNet(cfg.model_network_config())
    torch.manual_seed(cfg.seed)
    initial = weights_digest(NoduleNet(cfg.model_network_config()))
    model.load_state_dict(load_checkpoint(out / "last.pt")["state_dict"])
    assert weights_digest(model) == digests[0] != initial
