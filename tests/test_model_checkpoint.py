"""Published-checkpoint import and our own checkpoint format (in-memory dicts; model/ never reads files)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from nodulenet.model import (
    CheckpointMismatchError,
    NoduleNet,
    NoduleNetConfig,
    import_published_state_dict,
    model_from_checkpoint_dict,
    tiny_config,
    to_checkpoint_dict,
)
from nodulenet.model.checkpoint import CHECKPOINT_FORMAT_VERSION, imported_published_config

# Shapes of the three unused layers of the published MaskHead (its __init__: up1 = Upsample + Conv3d(128, 64, 3) +
# InstanceNorm3d(64, affine) + ReLU; back1 = Conv3d(128, 64, 3) + InstanceNorm3d(64, affine) + ReLU;
# logits2 = Conv3d(64, 1, 1)). 2 x (128*64*27 + 64 + 64 + 64) + 64 + 1 = 442,817 parameters.
DEAD_LAYER_SHAPES = {
    "mask_head.up1.1.weight": (64, 128, 3, 3, 3),
    "mask_head.up1.1.bias": (64,),
    "mask_head.up1.2.weight": (64,),
    "mask_head.up1.2.bias": (64,),
    "mask_head.back1.0.weight": (64, 128, 3, 3, 3),
    "mask_head.back1.0.bias": (64,),
    "mask_head.back1.1.weight": (64,),
    "mask_head.back1.1.bias": (64,),
    "mask_head.logits2.weight": (1, 64, 1, 1, 1),
    "mask_head.logits2.bias": (1,),
}


@pytest.fixture(scope="module")
def published_model() -> NoduleNet:
    torch.manual_seed(0)
    model = NoduleNet(NoduleNetConfig()).eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrong mapping would change outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def published_checkpoint(model: NoduleNet, prefix: str = "") -> dict:
    """A dict shaped like uci-cbcl/NoduleNet's 200.ckpt: the model's weights plus the dead layers."""
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for k, shape in DEAD_LAYER_SHAPES.items():
        sd[prefix + k] = torch.randn(shape, generator=gen)
    return {"epoch": 200, "out_dir": "results/cross_val_test", "state_dict": sd, "optimizer": {"state": {}}}


def test_published_parameter_total_and_dead_layers(published_model: NoduleNet) -> None:
    ckpt = published_checkpoint(published_model)
    total = sum(v.numel() for k, v in ckpt["state_dict"].items() if not k.endswith(("running_mean", "running_var",
                                                                                      "num_batches_tracked")))
    assert total == 17_785_899  # the published 200.ckpt's parameter count
    state_dict, report = import_published_state_dict(ckpt)
    assert report.dropped_dead_parameters == 442_817
    assert report.dropped_dead_keys == sorted(DEAD_LAYER_SHAPES)
    assert report.num_parameters == 17_343_082
    assert report.epoch == 200 and report.stripped_prefix is None
    assert "dropped 10 unused published keys" in report.summary()


def test_imported_weights_reproduce_the_outputs(published_model: NoduleNet) -> None:
    state_dict, _ = import_published_state_dict(published_checkpoint(published_model, prefix="module."))
    fresh = NoduleNet(NoduleNetConfig()).eval()
    fresh.load_state_dict(state_dict)  # strict
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = published_model.feature_net(x), fresh.feature_net(x)
        assert torch.equal(a.comb2, b.comb2) and torch.equal(a.out2, b.out2)
        assert all(torch.equal(p, q) for p, q in zip(published_model.rpn(a.comb2), fresh.rpn(b.comb2)))


def test_module_prefix_and_missing_batch_counters_are_handled(published_model: NoduleNet) -> None:
    ckpt = published_checkpoint(published_model, prefix="module.")
    for k in [k for k in ckpt["state_dict"] if k.endswith("num_batches_tracked")]:
        del ckpt["state_dict"][k]  # checkpoints written by PyTorch < 0.4.1 have no such buffers
    state_dict, report = import_published_state_dict(ckpt)
    assert report.stripped_prefix == "module."
    assert len(report.filled_missing_buffers) == sum(
        isinstance(m, torch.nn.BatchNorm3d) for m in published_model.modules()
    )
    assert all(int(state_dict[k]) == 0 for k in report.filled_missing_buffers)


def test_mis_shaped_missing_and_unexpected_keys_fail_clearly(published_model: NoduleNet) -> None:
    ckpt = published_checkpoint(published_model)
    sd = ckpt["state_dict"]
    sd["rpn.logits.weight"] = torch.zeros(3, 64, 1, 1, 1)  # 3 anchors instead of 5
    del sd["rcnn_head.fc2.bias"]
    sd["rcnn_head.fc3.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointMismatchError) as err:
        import_published_state_dict(ckpt)
    msg = str(err.value)
    assert "rpn.logits.weight (3, 64, 1, 1, 1) != expected (5, 64, 1, 1, 1)" in msg
    assert "missing keys (1): rcnn_head.fc2.bias" in msg
    assert "unexpected keys (1): rcnn_head.fc3.weight" in msg
    with pytest.raises(CheckpointMismatchError, match="no 'state_dict' entry"):
        import_published_state_dict({"epoch": 3, "net": "NoduleNet"})


def test_own_format_round_trip_through_torch_save() -> None:
    cfg = tiny_config()
    model = NoduleNet(cfg)
    d = to_checkpoint_dict(model, cfg, extra={"epoch": 7, "stages": ["rpn", "rcnn"]})
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    loaded = model_from_checkpoint_dict(torch.load(buf, weights_only=True))  # no pickled objects needed
    assert loaded.config == cfg and loaded.import_report is None
    assert loaded.extra == {"epoch": 7, "stages": ["rpn", "rcnn"]}
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(ValueError, match="JSON-able"):
        to_checkpoint_dict(model, cfg, extra={"config": cfg})
    with pytest.raises(ValueError, match="format_version"):
        model_from_checkpoint_dict({**d, "format_version": CHECKPOINT_FORMAT_VERSION + 1})


def test_model_from_published_dict_uses_the_published_config(published_model: NoduleNet) -> None:
    loaded = model_from_checkpoint_dict(published_checkpoint(published_model))
    # The published network and post-processing: our defaults but for the published mask crops, no RPN caps, pad -1
    # (tests/test_published_detections.py: why, and that the detections then equal the published code's).
    assert loaded.config == imported_published_config() == dataclasses.replace(
        NoduleNetConfig(), mask_crop_frame="published", rpn_test_pre_nms_top_n=None, rpn_test_post_nms_top_n=None,
        pad_value=-1.0)
    assert loaded.import_report is not None and loaded.import_report.epoch == 200


def test_import_checkpoint_command_writes_a_loadable_model(published_model: NoduleNet, tmp_path) -> None:
    import subprocess
    import sys

    src = tmp_path / "200.ckpt"
    torch.save({**published_checkpoint(published_model), "epoch": 200, "out_dir": "results/cross_val_test"}, src)
    out = tmp_path / "published.pt"
    res = subprocess.run([sys.executable, "-m", "nodulenet", "import-checkpoint", str(src), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "dropped 10 unused published keys" in res.stdout
    loaded = model_from_checkpoint_dict(torch.load(out, map_location="cpu", weights_only=True))
    assert loaded.config == imported_published_config()
    for name, tensor in published_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # a file that is not a checkpoint: one line naming it, no traceback
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    res = subprocess.run([sys.executable, "-m", "nodulenet", "import-checkpoint", str(bad), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr
