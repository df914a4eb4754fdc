"""How many tensor operations one training step issues, old step vs new, and whether the step waits on the host.

On the lent H100 the tiny network's step took 0.48 s at batch 16 with the GPU 9-14 % busy and the loader idle
(docs/training.md): the step was bound by the number of small operations, each a kernel launch on a GPU, not by
arithmetic. This counts the ``aten::`` calls of one model step (forward in train mode with every stage on +
backward) with ``torch.profiler`` on the CPU (the count does not depend on the device), for the batched step and
for the old per-image, per-proposal step kept in ``tests/_reference_step.py``, on the SAME batch in one run, and
the host synchronisations (``aten::item`` / ``aten::_local_scalar_dense``) of each. ``--loop`` also counts one
whole step of the real training loop (loader batch, optimiser, logging) for the new code.

It also records where the new step's calls go (``regions``: backbone, RPN head, RPN targets, proposals and their
NMS, RCNN targets, RCNN pooling and head, detections and their NMS, mask stage, losses; ``backward`` by autograd
function), the calls of one optimiser step (fused, as training builds it, and the plain per-tensor loop), and
with ``--gpu-paths`` the count of the new step when the NMS takes the path a CUDA device takes (the whole survival
matrix; on the CPU it is only built up to ``box_ops._NMS_MATRIX_ELEMENTS`` pairs because one core needs ~37 s for
the tiny network's 576 M pairs).

    .venv/bin/python benchmarks/train_step_ops.py [--model tiny|published] [--crop 64] [--batch 16] [--steps 1]
        [--loop] [--gpu-paths] [--data DIR]

Defaults: the tiny network at batch 16, 64^3; the published configuration is ``--model published --crop 128
--batch 4``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the old step, kept as the test reference
from _record import record  # noqa: E402

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def _batch(root: Path, model: str, crop: int, batch: int) -> tuple[Any, Any, list[Any]]:
    """One training batch of real loader crops and the network, as the loop makes them."""
    import torch

    from nodulenet.data.cases import find_case_dirs, load_cases
    from nodulenet.data.dataset import CropDataset, ResumableDistributedSampler, make_loader
    from nodulenet.model import NoduleNet
    from nodulenet.train.config import TrainConfig
    from nodulenet.train.run_setup import to_targets

    cfg = TrainConfig.from_dict(dict(
        prepared_roots=[str(root)], model=model,
        crop={"crop_size_zyx": [crop] * 3, "samples_per_epoch": batch, "positive_fraction": 0.5,
              "lung_fraction": 0.3, "random_fraction": 0.2}, batch_size=batch, seed=0))
    cases = load_cases(find_case_dirs(cfg.prepared_roots), lung_point_stride=cfg.crop.lung_point_stride).cases
    dataset = CropDataset(cases, cfg.crop, cfg.augment, cfg.seed)
    loader = make_loader(dataset, ResumableDistributedSampler(dataset, 1, 0, cfg.seed), batch_size=batch, workers=0,
                         pin_memory=False)
    first = next(iter(loader))
    torch.manual_seed(0)
    return NoduleNet(cfg.model_network_config()).train(), first.images, to_targets(first, torch.device("cpu"))


def cases_root(data: Path | None, tmp: Path) -> Path:
    """``data`` (prepared cases), or two phantom cases prepared into ``tmp``."""
    if data is not None:
        return data
    from nodulenet.data.synthetic import prepare_phantom_cases

    root = tmp / "cases"
    prepare_phantom_cases(root, range(2))
    return root


def model_steps(model: Any, images: Any, targets: list[Any], stages: tuple[str, ...]) -> tuple[Any, Any]:
    """``(old, new)``: forward + backward of the old reference step and of the batched step, same seed."""
    import torch
    from _reference_step import reference_losses

    def new() -> None:
        model.zero_grad(set_to_none=True)
        model.losses(images, targets, stages, generator=torch.Generator().manual_seed(1))["total"].backward()

    def old() -> None:
        model.zero_grad(set_to_none=True)
        reference_losses(model, images, targets, stages, torch.Generator().manual_seed(1))["total"].backward()

    return old, new


def _profile(step: Any) -> tuple[int, int, float, dict[str, int]]:
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: allocations, anchor cache
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    top = {e.key: e.count for e in sorted(aten, key=lambda e: -e.count)[:12]}
    return sum(e.count for e in aten), sum(e.count for e in aten if e.key in SYNC_OPS), seconds, top


# Functions of the step whose calls are counted as a region: (module or module:Class, attribute, region). Wrapped
# only while the region profile runs; a call inside another region's function counts for the innermost one.
_REGIONS = (
    ("nodulenet.model.nodulenet", "run_rpn", "rpn_head"),
    ("nodulenet.model.nodulenet", "assign_rpn_targets_batched", "rpn_targets"),
    ("nodulenet.model.nodulenet", "sample_rpn_anchors", "rpn_targets"),
    ("nodulenet.model.nodulenet", "rpn_loss", "losses"),
    ("nodulenet.model.nodulenet", "rcnn_loss", "losses"),
    ("nodulenet.model.nodulenet", "select_proposals_batched", "proposals"),
    ("nodulenet.model.rpn", "nms_batched_top_k", "nms_proposals"),
    ("nodulenet.model.nodulenet", "nms_batched_top_k", "nms_detections"),
    ("nodulenet.model.nodulenet", "draw_rcnn_keys", "rcnn_targets"),
    ("nodulenet.model.nodulenet", "sample_rcnn_batched", "rcnn_targets"),
    ("nodulenet.model.nodulenet", "crop_and_pool", "rcnn_pooling"),
    ("nodulenet.model.nodulenet:NoduleNet", "_detect_batched", "detections"),
    ("nodulenet.model.nodulenet:NoduleNet", "_mask_loss", "mask_stage"),
)


def _region_counts(model: Any, images: Any, targets: list[Any], stages: tuple[str, ...]) -> dict[str, Any]:
    """aten calls of one new step per region (see ``_REGIONS``), the backward's by autograd function."""
    import functools
    import importlib
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(fn: Any, label: str) -> Any:
        @functools.wraps(fn)
        def call(*a: Any, **k: Any) -> Any:
            with record_function("region:" + label):
                return fn(*a, **k)
        return call

    saved = []
    for where, name, label in _REGIONS:
        module, _, owner = where.partition(":")  # "module" or "module:Class"
        target = importlib.import_module(module)
        if owner:
            target = getattr(target, owner)
        saved.append((target, name, getattr(target, name)))
        setattr(target, name, labelled(getattr(target, name), label))
    backbone, rcnn_head = model.feature_net.forward, model.rcnn_head.forward
    model.feature_net.forward = labelled(backbone, "backbone")
    model.rcnn_head.forward = labelled(rcnn_head, "rcnn_head")
    try:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            with record_function("region:other_forward"):
                losses = model.losses(images, targets, stages, generator=torch.Generator().manual_seed(1))
            with record_function("region:backward"):
                losses["total"].backward()

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for target, name, fn in saved:
            setattr(target, name, fn)
        del model.feature_net.forward, model.rcnn_head.forward
    regions: Counter[str] = Counter()
    backward: Counter[str] = Counter()
    # Wall time per region, inclusive (a region inside another counts in both; other_forward holds every forward
    # region and backward the whole backward): where a CPU step's seconds go, beside where its calls go.
    seconds: Counter[str] = Counter()
    for event in prof.events():
        if event.name.startswith("region:"):
            seconds[event.name[len("region:"):]] += event.time_range.elapsed_us() / 1e6
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        label, grad_fn, parent = None, None, event.cpu_parent
        while parent is not None:
            if label is None and parent.name.startswith("region:"):
                label = parent.name[len("region:"):]
            if parent.name.startswith("autograd::engine::evaluate_function:"):
                grad_fn = parent.name.rsplit(":", 1)[-1].strip()
            parent = parent.cpu_parent
        if grad_fn is not None or label == "backward":
            backward[grad_fn or "other"] += 1
            label = "backward"
        regions[label or "outside"] += 1
    return {"regions": dict(regions.most_common()), "backward_by_function": dict(backward.most_common(12)),
            "region_seconds_inclusive": {k: round(v, 3) for k, v in seconds.most_common()}}


def _optimizer_counts(model: Any) -> dict[str, int]:
    """aten calls of one SGD step as training builds it (``make_optimizer``: fused) and of the per-tensor loop."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nodulenet.train.config import TrainConfig
    from nodulenet.train.schedule import make_optimizer

    out = {}
    for name, optimizer in (("fused", make_optimizer(TrainConfig(), model)),
                            ("per_tensor", torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                                           weight_decay=1e-4, foreach=False))):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # momentum buffers
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer.step()
        out[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("published", "tiny"), default="tiny")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loop", action="store_true", help="also count one step of the real training loop")
    parser.add_argument("--gpu-paths", action="store_true",
                        help="also count the new step with the NMS path of a CUDA device (the whole matrix)")
    parser.add_argument("--data", type=Path, help="folder of prepared cases (default: 2 phantoms in a temp folder)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    stages = ("rpn", "rcnn", "mask")
    with tempfile.TemporaryDirectory(prefix="train_step_ops_") as tmp:
        root = cases_root(args.data, Path(tmp))
        model, images, targets = _batch(root, args.model, args.crop, args.batch)
        old_step, new_step = model_steps(model, images, targets, stages)

        figures: dict[str, Any] = {"model": args.model, "crop_size": args.crop, "batch": args.batch,
                                   "threads": args.threads, "stages": list(stages)}
        for name, step in (("old", old_step), ("new", new_step)):
            calls, syncs, seconds, top = _profile(step)
            figures[name] = {"aten_calls_per_step": calls, "host_syncs_per_step": syncs,
                             "profiled_seconds_per_step": round(seconds, 2), "most_frequent": top}
        figures["ratio_new_to_old"] = round(figures["new"]["aten_calls_per_step"]
                                            / figures["old"]["aten_calls_per_step"], 4)
        figures["new"].update(_region_counts(model, images, targets, stages))
        figures["optimizer_step_aten_calls"] = _optimizer_counts(model)
        if args.gpu_paths:
            from nodulenet.model import box_ops

            cpu_limit = box_ops._NMS_MATRIX_ELEMENTS
            box_ops._NMS_MATRIX_ELEMENTS = box_ops._NMS_MATRIX_ELEMENTS_CUDA
            try:
                calls, syncs, seconds, _ = _profile(new_step)
            finally:
                box_ops._NMS_MATRIX_ELEMENTS = cpu_limit
            figures["new_with_gpu_nms_path"] = {"aten_calls_per_step": calls, "host_syncs_per_step": syncs,
                                                "profiled_seconds_per_step_on_cpu": round(seconds, 2),
                                                "ratio_to_old": round(calls / figures["old"]["aten_calls_per_step"],
                                                                      4)}
        if args.loop:
            figures["loop_step_new"] = _loop_step(root, args, Path(tmp))
    print(f"{args.model}, {args.crop}^3, batch {args.batch}, model step (forward + backward, all stages):")
    for name in ("old", "new"):
        f = figures[name]
        print(f"  {name}: {f['aten_calls_per_step']:,} aten calls, {f['host_syncs_per_step']} host syncs "
              f"(item/_local_scalar_dense), {f['profiled_seconds_per_step']} s profiled")
    print(f"  new / old = {figures['ratio_new_to_old']:.3f}")
    print("  new step by region: " + ", ".join(f"{k} {v:,}" for k, v in figures["new"]["regions"].items()))
    print("  new step seconds by region (inclusive): "
          + ", ".join(f"{k} {v:.2f}" for k, v in figures["new"]["region_seconds_inclusive"].items()))
    print(f"  optimiser step: {figures['optimizer_step_aten_calls']}")
    if "new_with_gpu_nms_path" in figures:
        g = figures["new_with_gpu_nms_path"]
        print(f"  new with the GPU's NMS path: {g['aten_calls_per_step']:,} aten calls, new / old = "
              f"{g['ratio_to_old']:.3f}")
    if args.loop:
        print(f"  whole loop step (new): {figures['loop_step_new']['aten_calls_per_step']:,} aten calls")
    record(f"train_step_ops_{args.model}", figures)


def _loop_step(root: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """aten calls of one step of the real loop (loader batch to optimiser step and logging)."""
    from torch.profiler import ProfilerActivity, profile

    from nodulenet.train.config import TrainConfig
    from nodulenet.train.loop import train

    cfg = TrainConfig.from_dict(dict(
        prepared_roots=[str(root)], model=args.model,
        crop={"crop_size_zyx": [args.crop] * 3, "samples_per_epoch": args.batch * 3, "positive_fraction": 0.5,
              "lung_fraction": 0.3, "random_fraction": 0.2},
        epochs=1, batch_size=args.batch, workers=0, val_every_epochs=0, rcnn_start_fraction=0.0,
        mask_start_fraction=0.0, amp="off", threads=args.threads, seed=0, max_steps=2))
    state: dict[str, Any] = {"n": 0}

    def on_step(_state: Any, _losses: dict[str, float]) -> None:
        state["n"] += 1
        if state["n"] == 1:  # the first step allocates and warms up: left out
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
        elif state["n"] == 2:
            state["prof"].__exit__(None, None, None)

    train(cfg, tmp / "loop_run", show_progress=False, on_step=on_step)
    aten = [e for e in state["prof"].key_averages() if e.key.startswith("aten::")]
    return {"aten_calls_per_step": sum(e.count for e in aten),
            "host_syncs_per_step": sum(e.count for e in aten if e.key in SYNC_OPS)}


if __name__ == "__main__":
    main()
