"""Schedule and settings: published lr steps and head start epochs, AdamW option, config files and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nodulenet.errors import InputError
from nodulenet.train.config import TrainConfig, config_differences, load_train_config, parse_override
from nodulenet.train.schedule import learning_rate, make_optimizer, stage_start_epochs, stages_for_epoch


def test_published_schedule() -> None:
    cfg = TrainConfig()
    # Published lr_shedule(epoch, 0.01, 200) with 1-based epochs: <= 100 -> 0.01, <= 160 -> 0.001, else 0.0001.
    for published_epoch in (1, 50, 100, 101, 160, 161, 200):
        expected = 0.01 if published_epoch <= 100 else 0.001 if published_epoch <= 160 else 0.0001
        assert learning_rate(cfg, published_epoch - 1, 0) == pytest.approx(expected)
    # Published epoch_rcnn = 65 and epoch_mask = 80 of 200.
    assert stage_start_epochs(cfg) == {"rpn": 0, "rcnn": 65, "mask": 80}
    assert stages_for_epoch(cfg, 64) == ("rpn",)
    assert stages_for_epoch(cfg, 65) == ("rpn", "rcnn")
    assert stages_for_epoch(cfg, 80) == ("rpn", "rcnn", "mask")
    opt = make_optimizer(cfg, torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4 and opt.defaults["lr"] == 0.01
    assert cfg.batch_size == 16 and cfg.crop.crop_size_zyx == (128, 128, 128) and cfg.crop.positive_fraction == 1.0


def test_adamw_and_warmup() -> None:
    cfg = TrainConfig(optimizer="adamw", warmup_steps=4, epochs=10)
    assert isinstance(make_optimizer(cfg, torch.nn.Linear(2, 2)), torch.optim.AdamW)
    assert [learning_rate(cfg, 0, s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert learning_rate(cfg, 5, 100) == pytest.approx(1e-4)


def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nmodel: tiny\ncrop:\n  crop_size_zyx: [64, 64, 64]\n  positive_fraction: 0.5\n"
                 "  lung_fraction: 0.5\nmodel_config:\n  blocks_per_stage: [1, 1, 1, 1, 1, 1]\n")
    cfg = load_train_config(f, {"augment.noise_sigma": 0.0, "lr": 0.02})
    assert cfg.epochs == 7 and cfg.crop.crop_size_zyx == (64, 64, 64) and cfg.augment.noise_sigma == 0.0
    assert cfg.model_network_config().blocks_per_stage == (1, 1, 1, 1, 1, 1)
    assert cfg.model_network_config().backbone_channels == (8, 8, 16, 16, 16, 16, 32)  # quarter of the published
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert config_differences(cfg, cfg.with_overrides({"workers": 9})) == ["workers"]
    assert parse_override("crop.crop_size_zyx=[32, 32, 32]") == ("crop.crop_size_zyx", [32, 32, 32])
    f.write_text("epoch: 3\n")
    with pytest.raises(InputError, match="unknown training setting.*epoch"):
        load_train_config(f)
    f.write_text("crop:\n  size: 3\n")
    with pytest.raises(InputError, match="crop.size"):
        load_train_config(f)
    with pytest.raises(InputError, match="sum to 1"):
        TrainConfig().with_overrides({"crop.positive_fraction": 0.5})
    with pytest.raises(InputError, match="unknown NoduleNetConfig key"):
        TrainConfig().with_overrides({"model_config.no_such_field": 1})
    with pytest.raises(ValueError, match="mask_start_fraction"):
        TrainConfig(rcnn_start_fraction=0.6, mask_start_fraction=0.4)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("train_*.yaml")),
                         ids=lambda p: p.name)
def test_committed_configs_load(path: Path) -> None:
    cfg = load_train_config(path)
    assert sum(cfg.crop.fractions.values()) == pytest.approx(1.0)
    cfg.model_network_config()


def test_optimizer_is_fused_on_the_cpu() -> None:
    """One fused kernel call per optimiser step instead of several per parameter tensor (issue 13)."""
    for name in ("sgd", "adamw"):
        cfg = TrainConfig(optimizer=name)
        assert make_optimizer(cfg, torch.nn.Linear(2, 2)).defaults["fused"] is True


def test_fused_sgd_takes_a_head_that_starts_training_later() -> None:
    """The staged schedule gives the RCNN/mask heads their first gradient epochs after the RPN, and a resumed run
    loads a state without their momentum buffers: the fused step must accept both and update as plain SGD does."""
    torch.manual_seed(0)
    early, late = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    twin = [torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)]
    twin[0].load_state_dict(early.state_dict())
    twin[1].load_state_dict(late.state_dict())
    model = torch.nn.ModuleList([early, late])
    fused = make_optimizer(TrainConfig(), model)
    plain = torch.optim.SGD(torch.nn.ModuleList(twin).parameters(), lr=fused.defaults["lr"],
                            momentum=fused.defaults["momentum"], weight_decay=fused.defaults["weight_decay"])
    x = torch.randn(5, 3)
    for step in range(3):
        for modules, opt in ((model, fused), (twin, plain)):
            opt.zero_grad(set_to_none=True)
            heads = modules[:1] if step == 0 else modules  # the late head has no gradient in the first step
            sum(m(x).square().sum() for m in heads).backward()
            opt.step()
        if step == 0:  # as after a resume from a checkpoint written before the late head trained
            state = fused.state_dict()
            fused = make_optimizer(TrainConfig(), model)
            fused.load_state_dict({"state": {k: v for k, v in state["state"].items() if k < 2},
                                   "param_groups": state["param_groups"]})
            from nodulenet.train.schedule import fill_momentum_buffers

            fill_momentum_buffers(fused)
    for a, b in zip(model.parameters(), torch.nn.ModuleList(twin).parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
