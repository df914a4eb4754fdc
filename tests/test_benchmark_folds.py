"""The per-fold training stage under DDP: ``--gpus 2`` trains through torchrun (2 processes; gloo on a CPU here)
and a second call continues the same run from its last.pt instead of starting over."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodulenet.benchmark.folds import fold_paths, train_fold
from nodulenet.errors import NoduleNetError
from nodulenet.train.config import TrainConfig

pytestmark = pytest.mark.slow  # two torchrun launches of two processes each (~1-2 min of CPU)


def test_train_fold_runs_ddp_through_torchrun_and_resumes(phantom_root: Path, tmp_path: Path) -> None:
    def config(max_steps: int | None) -> TrainConfig:
        return TrainConfig.from_dict(dict(
            prepared_roots=[str(phantom_root)], model="tiny", model_width=0.5,
            model_config={"blocks_per_stage": [1] * 6, "rpn_train_pre_nms_top_n": 300,
                          "rpn_train_post_nms_top_n": 30},
            crop={"crop_size_zyx": [32, 32, 32], "positive_margin_voxels": 2, "samples_per_epoch": 8,
                  "positive_fraction": 0.5, "lung_fraction": 0.5},
            epochs=1, max_steps=max_steps, batch_size=4, workers=0, val_every_epochs=0, rcnn_start_fraction=0.0,
            mask_start_fraction=0.0, seed=5, log_every_steps=1, threads=1))

    paths = fold_paths(tmp_path, 0)
    # Stopped after 1 of the epoch's 2 steps (8 crops / batch 4), as a killed run leaves its last.pt behind.
    with pytest.raises(NoduleNetError, match="stopped"):
        train_fold(config(1), paths, gpus=2, show_progress=False)
    assert (paths.train_dir / "last.pt").is_file() and not paths.model.is_file()
    summary = train_fold(config(None), paths, gpus=2, show_progress=False)
    assert summary["status"] == "finished" and summary["global_step"] == 2
    assert paths.model.is_file()
    log = (paths.train_dir / "train.log").read_text()
    assert "resumed at epoch 0 step 1" in log and '"world_size": 2' in log
