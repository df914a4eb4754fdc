"""How many tensor operations one training step issues: the figure that bounds the step on a GPU.

On the lent H100 the tiny network's step took 0.48 s at batch 16 with the GPU 9-14 % busy and the loader idle
(docs/training.md): the step is bound by the number of small operations, each a kernel launch on a GPU, not by
arithmetic. This counts the ``aten::`` calls per optimiser step with ``torch.profiler`` on the CPU (the count does
not depend on the device) and lists the most frequent, so a change that batches per-proposal work shows up as a
smaller number here without a GPU.

    .venv/bin/python benchmarks/train_step_ops.py [--model tiny|published] [--crop 64] [--batch 16] [--steps 3]
        [--data DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("published", "tiny"), default="tiny")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one unprofiled step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, help="folder of prepared cases (default: 2 phantoms in a temp folder)")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nodulenet.train.config import TrainConfig
    from nodulenet.train.loop import train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train_step_ops_") as tmp:
        root = args.data
        if root is None:
            from nodulenet.data.synthetic import prepare_phantom_cases

            root = Path(tmp) / "cases"
            prepare_phantom_cases(root, range(2))
        cfg = TrainConfig.from_dict(dict(
            prepared_roots=[str(root)], model=args.model,
            crop={"crop_size_zyx": [args.crop] * 3, "samples_per_epoch": args.batch * (args.steps + 1),
                  "positive_fraction": 0.5, "lung_fraction": 0.3, "random_fraction": 0.2},
            epochs=1, batch_size=args.batch, workers=0, val_every_epochs=0, rcnn_start_fraction=0.0,
            mask_start_fraction=0.0, amp="off", threads=args.threads, seed=0, max_steps=args.steps + 1))
        state: dict[str, Any] = {"n": 0}

        def on_step(_state: Any, _losses: dict[str, float]) -> None:
            state["n"] += 1
            if state["n"] == 1:  # the first step allocates and warms up: left out
                state["prof"] = profile(activities=[ProfilerActivity.CPU])
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif state["n"] == args.steps + 1:
                state["prof"].__exit__(None, None, None)
                state["seconds"] = time.perf_counter() - state["t0"]

        train(cfg, Path(tmp) / "run", show_progress=False, on_step=on_step)
    events = state["prof"].key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    per_step = sum(e.count for e in aten) / args.steps
    top = {e.key: round(e.count / args.steps) for e in sorted(aten, key=lambda e: -e.count)[:15]}
    figures = {"model": args.model, "crop_size": args.crop, "batch": args.batch, "profiled_steps": args.steps,
               "aten_calls_per_step": round(per_step),
               "profiled_seconds_per_step": round(state["seconds"] / args.steps, 2), "most_frequent_per_step": top}
    print(f"{args.model}, {args.crop}^3, batch {args.batch}: {per_step:,.0f} aten calls per training step")
    for key, count in top.items():
        print(f"  {key:32s} {count:8d}")
    record(f"train_step_ops_{args.model}", figures)


if __name__ == "__main__":
    main()
