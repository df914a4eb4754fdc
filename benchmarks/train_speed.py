"""Training speed of the real loop (``nodulenet.train.loop.train``): crops per second and peak memory per step.

Runs a short training on phantom cases prepared into a temp folder (or ``--data``) with all heads on from the first
step, and times every optimiser step through the loop's ``on_step`` hook (the first step, which allocates, is left
out of the rate). Memory: peak resident memory of the process (CPU; loader workers = 0 so it is all here) and, on a
GPU, ``torch.cuda.max_memory_allocated`` per step; the process's peak RSS is also recorded after every step.

    .venv/bin/python benchmarks/train_speed.py [--quick] [--model published|tiny] [--crop 128] [--batch 2]
        [--steps 4] [--threads 1] [--amp off|bf16|fp16] [--workers 0] [--warmup 1] [--data DIR]

On a GPU the loop runs there (``cuda:0``); give ``--workers`` so that augmentation (CPU) keeps up with the step,
and ``--warmup`` a few steps so worker start-up and cuDNN's algorithm search stay out of the rate.

``--old-vs-new`` instead times the model step (forward with every stage on + backward) of the batched step and of
the old per-image step kept in ``tests/_reference_step.py`` on the same loader batch, alternating, in one run, and
records the ratio (figures on a shared machine are noisy; the ratio of interleaved runs is what to compare).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import peak_rss_mib, record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 64^3 crops, 5 steps")
    parser.add_argument("--data", type=Path, help="folder of prepared cases (default: phantoms in a temp folder)")
    parser.add_argument("--model", choices=("published", "tiny"), default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", default="off")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes (0: in-process)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the rate")
    parser.add_argument("--name", default=None, help="name of the result file (default train_speed[_quick])")
    parser.add_argument("--old-vs-new", action="store_true", help="model step of the old vs the batched step")
    args = parser.parse_args()
    import torch

    if args.old_vs_new:
        old_vs_new(args)
        return

    from nodulenet.train.config import TrainConfig
    from nodulenet.train.loop import train

    model = args.model or ("tiny" if args.quick else "published")
    crop = args.crop or (64 if args.quick else 128)
    steps = args.steps or (5 if args.quick else 4)
    torch.set_num_threads(args.threads)
    figures: dict[str, Any] = {"load_average_at_start": list(os.getloadavg()), "model": model, "crop_size": crop,
                               "batch": args.batch, "threads": args.threads, "amp": args.amp, "steps": steps,
                               "workers": args.workers, "warmup_steps": args.warmup,
                               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        root = args.data
        if root is None:
            from nodulenet.data.synthetic import prepare_phantom_cases
            from nodulenet.preprocess.phantom import PhantomConfig

            root = Path(tmp) / "cases"
            prepare_phantom_cases(root, range(2), PhantomConfig(n_nodules=4))
        cfg = TrainConfig.from_dict(dict(
            prepared_roots=[str(root)], model=model, crop={"crop_size_zyx": [crop] * 3,
                                                          "samples_per_epoch": args.batch * steps},
            epochs=1, batch_size=args.batch, workers=args.workers, val_every_epochs=0, rcnn_start_fraction=0.0,
            mask_start_fraction=0.0, amp=args.amp, threads=args.threads, seed=0,
        ))
        times: list[float] = []
        memory: list[float] = []
        rss: list[float] = []
        last = [time.perf_counter()]

        def on_step(state: Any, losses: dict[str, float]) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            rss.append(peak_rss_mib())
            if torch.cuda.is_available():
                memory.append(torch.cuda.max_memory_allocated() / 2**20)
                torch.cuda.reset_peak_memory_stats()

        t0 = time.perf_counter()
        summary = train(cfg, Path(tmp) / "run", show_progress=False, on_step=on_step)
        figures["total_seconds"] = round(time.perf_counter() - t0, 1)
    steady = times[args.warmup:] or times
    per_step = sum(steady) / len(steady)
    figures.update(
        step_seconds=[round(t, 3) for t in times],
        seconds_per_step=round(per_step, 3),
        crops_per_second=round(args.batch / per_step, 3),
        peak_rss_mib=round(peak_rss_mib(), 1),
        peak_rss_mib_after_step=[round(m, 1) for m in rss],
        gpu_peak_mib_per_step=[round(m, 1) for m in memory] or None,
        n_parameters=sum(p.numel() for p in __import__("nodulenet.model", fromlist=["NoduleNet"]).NoduleNet(
            cfg.model_network_config()).parameters()),
        status=summary.status,
    )
    gpu_peak = f"; GPU peak {max(memory):.0f} MiB" if memory else ""
    print(f"{model}, {crop}^3, batch {args.batch}, amp {args.amp}, {args.workers} worker(s), {figures['device']}: "
          f"{per_step:.3f} s/step = {figures['crops_per_second']} crops/s; peak RSS {figures['peak_rss_mib']} MiB"
          f"{gpu_peak}")
    record(args.name or ("train_speed_quick" if args.quick else "train_speed"), figures)


def old_vs_new(args: argparse.Namespace) -> None:
    import torch

    from train_step_ops import _batch, cases_root, model_steps  # (it puts tests/ on the path for the reference step)

    model_name = args.model or ("tiny" if args.quick else "published")
    crop = args.crop or (64 if args.quick else 128)
    repeats = args.steps or 3
    torch.set_num_threads(args.threads)
    stages = ("rpn", "rcnn", "mask")
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        model, images, targets = _batch(cases_root(args.data, Path(tmp)), model_name, crop, args.batch)
        old, new = model_steps(model, images, targets, stages)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for step in (old, new):
            step()  # warm-up
        for _ in range(repeats):
            for name, step in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    figures = {"load_average_at_start": list(os.getloadavg()), "model": model_name, "crop_size": crop,
               "batch": args.batch, "threads": args.threads, "repeats": repeats, "stages": list(stages),
               "seconds_old": [round(t, 2) for t in times["old"]], "seconds_new": [round(t, 2) for t in times["new"]],
               "best_old": round(best["old"], 2), "best_new": round(best["new"], 2),
               "new_over_old": round(best["new"] / best["old"], 3)}
    print(f"{model_name}, {crop}^3, batch {args.batch}, {args.threads} thread(s), forward + backward, best of "
          f"{repeats}: old {best['old']:.2f} s, new {best['new']:.2f} s, new/old = {figures['new_over_old']:.2f}")
    record(args.name or f"train_speed_old_vs_new_{model_name}", figures)


if __name__ == "__main__":
    main()
