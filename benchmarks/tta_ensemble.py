"""CPM with and without flip TTA and with a two-model ensemble (WBF and NMS), on held-out phantoms, in one run.

Each phantom (small chest, 4 nodules, seeds ``--first-seed`` .., never seen by the shipped demo model, which trained
on seeds 100..135 and 3000..3043) is prepared once; every model runs on every flip of it once (the passes); each
variant is then a merge of a subset of those passes (:mod:`nodulenet.infer.candidates`), mapped to world mm and
scored with the LUNA16 rules (candidates-only: every candidate ranked). Variants:

- ``A``: the first model (default: the shipped demo model), one pass - the baseline;
- ``A+flips (wbf|nms)``: A on the image and its three single-axis mirrors (4 passes);
- ``A+B (wbf|nms)``: the two models (``--second``), one pass each;
- ``A+B+flips (wbf)``: both models x 4 flips (8 passes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tta_ensemble.py --second runs/second/model.pt [--n 10]
        [--first-seed 2000] [--weights A.pt] [--name tta_ensemble]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_heldout_phantom_arguments, heldout_seeds  # noqa: E402
from _record import record  # noqa: E402

FLIP_PASSES = 4  # tta_flips("flips"): the image and its three single-axis mirrors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_phantom_arguments(parser, first_seed=2000, name="tta_ensemble",
                                  weights_help="model A (default: the shipped demo model)",
                                  out_help="keep the phantoms here (default: a temp folder)")
    parser.add_argument("--second", type=Path, required=True, help="model B of the ensemble")
    args = parser.parse_args()

    import torch

    from nodulenet.data.synthetic import SMALL_PHANTOM
    from nodulenet.evaluate.froc import FrocCandidate, FrocFinding, compute_froc
    from nodulenet.heldout import HELDOUT_NODULES_PER_PHANTOM
    from nodulenet.infer.candidates import merge_passes, run_passes
    from nodulenet.infer.mapping import map_detection
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.infer.weights import load_model
    from nodulenet.io.image_files import read_image
    from nodulenet.preprocess.phantom import write_phantom

    torch.set_num_threads(args.threads)
    model_a, model_b = load_model(args.weights), load_model(args.second)
    if model_a.prepare_config != model_b.prepare_config:
        raise SystemExit("the two models prepare scans differently; their candidates cannot be merged")
    variants = {
        "A": ([0], "wbf"),
        "A+flips (wbf)": (list(range(FLIP_PASSES)), "wbf"),
        "A+flips (nms)": (list(range(FLIP_PASSES)), "nms"),
        "A+B (wbf)": ([0, FLIP_PASSES], "wbf"),
        "A+B (nms)": ([0, FLIP_PASSES], "nms"),
        "A+B+flips (wbf)": (list(range(2 * FLIP_PASSES)), "wbf"),
        "B": ([FLIP_PASSES], "wbf"),
    }
    seeds = heldout_seeds(args)
    candidates: dict[str, list[FrocCandidate]] = {v: [] for v in variants}
    nodules: list[FrocFinding] = []
    names: list[str] = []
    pass_seconds: list[float] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nodulenet-tta-") as tmp:
        root = args.out or Path(tmp)
        phantom = replace(SMALL_PHANTOM, n_nodules=HELDOUT_NODULES_PER_PHANTOM)
        for seed in seeds:
            folder = root / f"phantom-{seed:05d}"
            if not (folder / "nodules.json").is_file():
                write_phantom(folder, seed, phantom, fmt="nii.gz")
            name = folder.name
            names.append(name)
            for n in json.loads((folder / "nodules.json").read_text())["nodules"]:
                nodules.append(FrocFinding(name, tuple(n["center_world_xyz_mm"]), float(n["diameter_mm"])))
            prepared = prepare_input(read_image(folder / "scan.nii.gz"), model_a.prepare_config)
            passes: list = []
            for loaded in (model_a, model_b):
                p, s = run_passes([loaded.model], prepared.image, tta="flips", channels_last=True)
                passes += p
                pass_seconds += s
            for variant, (which, method) in variants.items():
                boxes, scores = merge_passes([passes[i] for i in which], method)
                for box, score in zip(boxes, scores):
                    world = map_detection(box, float(score), prepared.transform).center_world_xyz_mm
                    candidates[variant].append(FrocCandidate(name, world, float(score)))
            print(f"{name}: {len(passes)} passes, {sum(pass_seconds[-len(passes):]):.1f} s", flush=True)
    results = {}
    for variant in variants:
        froc = compute_froc(candidates[variant], nodules, [], names, n_bootstrap=1000, seed=0)
        results[variant] = {"cpm": round(froc.cpm, 4), "cpm_ci95": [round(v, 4) for v in froc.cpm_ci or ()],
                            "sensitivities_at": {f"{k:g}": round(v, 4) for k, v in froc.sensitivities_at.items()},
                            "n_hits": froc.n_hits, "n_nodules": froc.n_nodules,
                            "n_candidates": froc.n_candidates, "passes": len(variants[variant][0])}
        print(f"{variant:<18} CPM {froc.cpm:.3f} (95% CI {froc.cpm_ci[0]:.3f}-{froc.cpm_ci[1]:.3f}), "
              f"{froc.n_hits}/{froc.n_nodules} hit, {froc.n_candidates} candidates")
    mean_pass = sum(pass_seconds) / len(pass_seconds)
    print(f"{len(seeds)} phantoms; one network pass {mean_pass:.2f} s on {args.threads} thread(s)")
    record(args.name, {"model_a": str(args.weights or "shipped demo model"), "model_b": str(args.second),
                       "seeds": seeds, "variants": results, "seconds_per_pass": round(mean_pass, 3),
                       "total_seconds": round(time.perf_counter() - t_start, 1), "threads": args.threads})


if __name__ == "__main__":
    main()
