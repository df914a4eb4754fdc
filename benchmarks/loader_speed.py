"""Is data loading the bottleneck? Training crops per second of the loader alone vs one model training step.

Crops come from prepared cases (``--data``, e.g. prepared LIDC cases; default: adult-sized phantoms prepared into a
temp folder) through the real ``CropDataset`` + ``DataLoader`` (memory-mapped images, per-sample augmentation), with
0, 1 and 2 worker processes, with the published augmentation (free rotation + zoom on every crop: one trilinear
resampling of 128^3) and without augmentation (exact cut). The model step is forward + backward of the network on
one batch of such crops, all heads on.

    .venv/bin/python benchmarks/loader_speed.py [--quick] [--data PREPARED_ROOT] [--model published|tiny]

Figures depend on what else runs on the machine: the load average is recorded. On a GPU the model step is ~100x
faster than here, so compare the per-worker loader rate with the GPU step rate to size ``workers``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import peak_rss_mib, record  # noqa: E402


def loader_rate(cases: list, crop: Any, aug: Any, workers: int, n_batches: int, batch: int) -> float:
    from nodulenet.data.dataset import CropDataset, ResumableDistributedSampler, make_loader

    dataset = CropDataset(cases, dataclasses.replace(crop, samples_per_epoch=(n_batches + 1) * batch), aug, seed=0)
    sampler = ResumableDistributedSampler(dataset, 1, 0, seed=0)
    loader = make_loader(dataset, sampler, batch_size=batch, workers=workers, pin_memory=False)
    it = iter(loader)
    next(it)  # worker start-up and first pages of the memory maps are not the steady state
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += len(b)
    return n / (time.perf_counter() - t0)


def model_step_seconds(cases: list, crop: Any, aug: Any, model_name: str, batch: int, steps: int) -> float:
    import torch

    from nodulenet.data.dataset import CropDataset, collate_crops
    from nodulenet.model import NoduleNet, published_config, tiny_config
    from nodulenet.train.loop import to_targets

    dataset = CropDataset(cases, dataclasses.replace(crop, samples_per_epoch=batch * (steps + 1)), aug, seed=0)
    config = published_config() if model_name == "published" else tiny_config()
    torch.manual_seed(0)
    model = NoduleNet(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for s in range(steps + 1):
        b = collate_crops([dataset[s * batch + k] for k in range(batch)])
        t0 = time.perf_counter()
        losses = model(b.images, to_targets(b, torch.device("cpu")), mode="train", stages=("rpn", "rcnn", "mask"),
                       generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        if s > 0:  # the first step allocates
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64^3 crops, tiny model, fewer batches")
    parser.add_argument("--data", type=Path, help="folder of prepared cases (default: phantoms in a temp folder)")
    parser.add_argument("--model", choices=("published", "tiny"), default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model step")
    args = parser.parse_args()
    import torch

    from nodulenet.data.cases import find_case_dirs, load_cases
    from nodulenet.data.config import AugmentConfig, CropConfig
    from nodulenet.data.synthetic import prepare_phantom_cases
    from nodulenet.preprocess.phantom import PhantomConfig

    torch.set_num_threads(args.threads)
    size = 64 if args.quick else 128
    model_name = args.model or ("tiny" if args.quick else "published")
    n_batches, batch = (6, 2) if args.quick else (12, 2)
    figures: dict[str, Any] = {"load_average_at_start": list(os.getloadavg()), "crop_size": size,
                               "batch": batch, "model": model_name, "model_threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="loader_speed_") as tmp:
        root = args.data
        if root is None:
            root = Path(tmp)
            t0 = time.perf_counter()
            prepare_phantom_cases(root, range(2 if args.quick else 4), PhantomConfig(n_nodules=4))
            figures["phantom_prepare_seconds"] = round(time.perf_counter() - t0, 1)
        report = load_cases(find_case_dirs([root]), cache_dir=Path(tmp) / "index")
        cases = report.cases
        figures["cases"] = {"n": len(cases), "n_nodules": report.n_nodules,
                            "shapes_zyx": [list(c.shape_zyx) for c in cases[:8]], "source": str(args.data or "phantoms")}
        crop = CropConfig(crop_size_zyx=(size,) * 3, positive_fraction=0.7, random_fraction=0.1, lung_fraction=0.2,
                          samples_per_epoch=batch)
        for label, aug in (("published_augmentation", AugmentConfig()),
                           ("no_augmentation", AugmentConfig(enabled=False))):
            rates = {}
            for workers in (0, 1, 2):
                rates[f"workers_{workers}"] = round(loader_rate(cases, crop, aug, workers, n_batches, batch), 2)
                print(f"loader, {label}, {workers} worker(s): {rates[f'workers_{workers}']} crops/s")
            figures[f"loader_crops_per_second_{label}"] = rates
        step = model_step_seconds(cases, crop, AugmentConfig(), model_name, batch, 2 if args.quick else 2)
        figures["model_step_seconds"] = round(step, 3)
        figures["model_crops_per_second"] = round(batch / step, 3)
        one_worker = figures["loader_crops_per_second_published_augmentation"]["workers_1"]
        figures["loader_over_model_ratio_one_worker"] = round(one_worker * step / batch, 1)
        print(f"model step ({model_name}, batch {batch}, {size}^3, {args.threads} thread(s)): {step:.2f} s = "
              f"{batch / step:.2f} crops/s; one loader worker is {figures['loader_over_model_ratio_one_worker']}x "
              "faster than the model")
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    record("loader_speed_quick" if args.quick else "loader_speed", figures)


if __name__ == "__main__":
    main()
