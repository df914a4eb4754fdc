"""Detection quality of a model (default: the shipped demo model) on phantoms it never saw: LUNA16 CPM and FROC.

Issue 4's target for the demo model: CPM >= 0.90 on held-out phantoms. Generates small phantom chests from seeds
``--first-seed`` .. (the demo model trained on seeds 100..135 and 3000..3043), runs the whole ``nodulenet predict``
path on each NIfTI file at threshold 0.05, and scores the findings with the LUNA16 rules (``nodulenet.heldout``). Prints and
records CPM, the sensitivities at 1/8..8 FP/scan, the counts, and the time per scan.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_model_quality.py [--n 10] [--first-seed 1000]
        [--weights PATH] [--out DIR] [--name demo_model_quality] [--ground-glass classic|varied]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_heldout_phantom_arguments, heldout_seeds  # noqa: E402
from _record import record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_phantom_arguments(parser, first_seed=1000, name="demo_model_quality",
                                  weights_help="model (default: the shipped demo model)",
                                  out_help="keep every file here (default: a temp folder)")
    parser.add_argument("--ground-glass", default="classic", choices=("classic", "varied"),
                        help="phantom ground-glass nodules: classic (the reference set) or varied (as real ones)")
    parser.add_argument("--precisions", nargs="+", default=None, metavar="P",
                        help="compare these predict precisions (e.g. fp32 bf16) on the same phantoms in one run; "
                             "records <name>_precisions.json")
    args = parser.parse_args()
    if args.precisions:
        compare_precisions(args)
        return

    from nodulenet.heldout import evaluate_on_heldout_phantoms

    seeds = heldout_seeds(args)
    with tempfile.TemporaryDirectory(prefix="nodulenet-heldout-") as tmp:
        out = args.out or Path(tmp)
        start = time.perf_counter()
        result = evaluate_on_heldout_phantoms(out, seeds, weights=args.weights, threads=args.threads, progress=True,
                                              ground_glass_style=args.ground_glass)
        seconds = time.perf_counter() - start
        froc = json.loads((out / "froc.json").read_text())
    print(f"CPM {result.cpm:.3f} on {len(seeds)} held-out phantoms (seeds {seeds[0]}..{seeds[-1]}), "
          f"{result.n_hits}/{result.n_nodules} nodules hit, {result.n_false_positives} false positives")
    for rate, sens in result.sensitivities_at.items():
        print(f"  sensitivity at {float(rate):>6.3f} FP/scan: {sens:.3f}")
    if result.failed:
        print("FAILED scans:", *result.failed, sep="\n  ")
    record(args.name, {"weights": str(args.weights or "shipped demo model"), "ground_glass": args.ground_glass,
                       **result.to_dict(),
                       "cpm_ci95": froc.get("cpm_ci"), "total_seconds": round(seconds, 1),
                       "threads": args.threads, "target_cpm": 0.90})


def compare_precisions(args: argparse.Namespace) -> None:
    """CPM of each precision on the same held-out phantoms, side by side (``--precisions fp32 bf16``)."""
    from nodulenet.heldout import evaluate_on_heldout_phantoms

    seeds = heldout_seeds(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="nodulenet-heldout-") as tmp:
        for precision in args.precisions:
            out = (args.out or Path(tmp)) / precision
            result = evaluate_on_heldout_phantoms(out, seeds, weights=args.weights, threads=args.threads,
                                                  precision=precision)
            results[precision] = {k: v for k, v in result.to_dict().items() if k != "out_dir"}
            print(f"{precision}: CPM {result.cpm:.4f}, {result.n_hits}/{result.n_nodules} hit, "
                  f"{result.n_false_positives} FP, {result.seconds_per_scan:.1f} s/scan", flush=True)
    record(f"{args.name}_precisions", {"weights": str(args.weights or "shipped demo model"), "seeds": seeds,
                                       "threads": args.threads, "by_precision": results})


if __name__ == "__main__":
    main()
