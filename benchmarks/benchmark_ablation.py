"""The NoduleNet paper's decoupling ablation through the whole ``nodulenet benchmark luna16`` protocol, on phantoms.

A miniature LUNA16 tree of ``--n`` phantoms (seeds ``--first-seed`` .., 4 nodules each, the smallest listed as
excluded) split into ``--folds`` subsets; the same folds for every variant. CPM of:

(a) the RPN scores alone (the proposals of the decoupled models, before the RCNN);
(b) an RCNN cropping the decoder map ``comb2`` - the map the RPN uses (coupled; ``rcnn_feature_map: comb2``);
(c) the decoupled RCNN on the encoder map ``out2`` (the published NoduleNet).

Each fold trains the demo-size (quarter width) network for ``--steps`` steps. With ``--init-backbone`` (default) the
backbone, RPN and mask head start from the shipped demo model and the RCNN head from random weights (the same seed
for both variants): a CPU-sized version of the ablation, which compares what the two RCNN heads learn on one
backbone in few steps - not the paper's full training from scratch (``--no-init-backbone``, hours per fold on a CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/benchmark_ablation.py --out runs/ablation [--n 30] [--folds 3]
        [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record

VARIANTS = {"b_rcnn_on_comb2": "comb2", "c_decoupled_rcnn_on_out2": "out2"}


def _init_checkpoint(path: Path, feature_map: str, seed: int) -> Path:
    """The shipped demo model's weights with the RCNN head replaced by a freshly initialised one on ``feature_map``."""
    import torch

    from nodulenet.infer.weights import shipped_weights_path
    from nodulenet.model import (
        NoduleNet,
        model_from_checkpoint_dict,
        to_checkpoint_dict,
    )
    from nodulenet.train.checkpoint_files import load_checkpoint, save_checkpoint

    demo = model_from_checkpoint_dict(load_checkpoint(shipped_weights_path()))
    config = replace(demo.config, rcnn_feature_map=feature_map)
    torch.manual_seed(seed)
    model = NoduleNet(config)
    kept = {k: v for k, v in demo.model.state_dict().items() if not k.startswith("rcnn_head.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert all(k.startswith("rcnn_head.") for k in missing) and not unexpected
    return save_checkpoint(to_checkpoint_dict(model, config, {"ablation_init": f"demo backbone, fresh RCNN on "
                                                                                 f"{feature_map}"}), path)


def _rpn_candidates(bench_out: Path, tree: Path, folds: int, out_csv: Path) -> int:
    """Candidates of each fold's model from its RPN alone (proposal scores), for its held-out scans."""
    import torch

    from nodulenet.infer.mapping import map_detection
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.infer.weights import load_model
    from nodulenet.io.image_files import read_image
    from nodulenet.io.luna_csv import LunaCandidate, write_luna_candidates

    rows = []
    for i in range(folds):
        loaded = load_model(bench_out / "folds" / f"fold_{i}" / "train" / "model.pt")
        for mhd in sorted((tree / f"subset{i}").glob("*.mhd")):
            prepared = prepare_input(read_image(mhd), loaded.prepare_config)
            x = (torch.from_numpy(prepared.image).float() - 128.0) / 128.0
            with torch.inference_mode():
                det = loaded.model.predict(x[None, None], stages=("rpn",))[0]
            uid = mhd.name[: -len(".mhd")]
            for box, score in zip(det.boxes.double().numpy(), det.scores.double().numpy()):
                rows.append(LunaCandidate(uid, map_detection(box, float(score), prepared.transform)
                                          .center_world_xyz_mm, float(score)))
    write_luna_candidates(out_csv, rows)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=30, help="phantoms in the tree")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=150, help="training steps per fold")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (1e-3 wrecked the demo RPN)")
    parser.add_argument("--init-backbone", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--name", default="benchmark_ablation")
    args = parser.parse_args()

    import torch

    from nodulenet.benchmark.luna16_api import benchmark_luna16
    from nodulenet.benchmark.mini_luna import write_mini_luna_tree
    from nodulenet.evaluate import evaluate_froc
    from nodulenet.train.config import TrainConfig

    torch.set_num_threads(1)
    out = args.out
    tree = out / "tree"
    seeds = list(range(args.first_seed, args.first_seed + args.n))
    per = {i: seeds[i::args.folds] for i in range(args.folds)}
    t0 = time.perf_counter()
    write_mini_luna_tree(tree, per)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {"tree": round(time.perf_counter() - t0, 1)}
    for variant, feature_map in VARIANTS.items():
        t_variant = time.perf_counter()
        train = {
            "model": "tiny", "model_config": {"rcnn_feature_map": feature_map}, "epochs": 1,
            "batch_size": args.batch_size, "optimizer": "adamw", "lr": args.lr, "warmup_steps": 10,
            "rcnn_start_fraction": 0.0, "mask_start_fraction": 1.0,  # the mask head plays no part in the FROC
            "workers": 0, "threads": 1, "val_every_epochs": 0, "log_every_steps": 10, "checkpoint_every_steps": 25,
            "amp": "off", "seed": 0,
            "crop": {"crop_size_zyx": [64, 64, 64], "samples_per_epoch": args.steps * args.batch_size,
                     "positive_fraction": 0.7, "random_fraction": 0.1, "lung_fraction": 0.2},
        }
        if args.init_backbone:
            train["init_checkpoint"] = str(_init_checkpoint(out / f"init_{feature_map}.pt", feature_map, seed=1))
        bench_out = out / variant
        prepared = out / "prepared"
        bench_out.mkdir(parents=True, exist_ok=True)
        if not (bench_out / "prepared").exists():  # both variants share one preparation
            prepared.mkdir(parents=True, exist_ok=True)
            os.symlink(prepared.resolve(), bench_out / "prepared")
        result = benchmark_luna16(tree, bench_out, train_config=TrainConfig.from_dict(train), folds=args.folds,
                                  resume=(bench_out / "benchmark_state.json").exists(), n_bootstrap=1000,
                                  show_progress=False)
        results[variant] = result.results["overall"] | {"folds": [f.get("cpm") for f in result.results["folds"]]}
        seconds[variant] = round(time.perf_counter() - t_variant, 1)
        print(f"{variant}: CPM {results[variant]['cpm']:.3f}  per fold {results[variant]['folds']}", flush=True)
    # (a) the RPN alone, from the decoupled models (and the coupled ones: the same backbone + RPN training signal).
    for variant in VARIANTS:
        bench_out = out / variant
        csv = out / f"a_rpn_only_of_{variant}.csv"
        n = _rpn_candidates(bench_out, tree, args.folds, csv)
        froc = evaluate_froc(csv, tree / "annotations.csv", tree / "annotations_excluded.csv",
                             bench_out / "seriesuids.csv", n_bootstrap=1000, seed=0)
        key = f"a_rpn_only ({variant[:1]} models)"
        results[key] = {"cpm": froc.cpm, "cpm_ci95": list(froc.cpm_ci or ()), "n_candidates": n,
                        "sensitivities_at": {f"{k:g}": v for k, v in froc.sensitivities_at.items()}}
        print(f"{key}: CPM {froc.cpm:.3f}", flush=True)
    print(json.dumps({k: round(v["cpm"], 4) for k, v in results.items()}, indent=1))
    record(args.name, {"n_phantoms": args.n, "folds": args.folds, "steps_per_fold": args.steps,
                       "batch_size": args.batch_size, "lr": args.lr, "init_backbone_from_demo": args.init_backbone,
                       "seeds": [seeds[0], seeds[-1]], "results": results, "seconds": seconds})


if __name__ == "__main__":
    main()
