"""Do bf16, int8 and OpenVINO fp32 find what PyTorch fp32 finds? Detections of the shipped demo model, side by side.

For each scan (the real LIDC-IDRI-0001 and -0002 from ``$NODULENET_TEST_DATA``, and phantoms ``--phantom-seeds``:
seed 0 is the test phantom, 1000.. the held-out ones) the whole-scan network runs once per variant in one process
(PyTorch fp32 = the reference, PyTorch bf16 where the CPU has native bf16, OpenVINO fp32, OpenVINO int8). For each
variant: the findings at 0.5 (same set as fp32?), and for every fp32 detection scoring >= ``--min-score`` its
nearest counterpart: score difference, centre distance (mm: the network grid is 1 mm) and mask Dice. The decision
rule for a default (``infer/network.resolve_precision``): the same findings at 0.5 on every scan.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_check.py [--phantom-seeds 0 1000 1001] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

REPORTED = 0.5


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def compare(ref: Any, new: Any, min_score: float) -> dict[str, Any]:
    """Pairs of each fp32 detection >= min_score with ``new``'s nearest one, and the findings at 0.5."""
    from nodulenet.infer.network import mask_dice

    centres_ref = (ref.boxes[:, :3] + ref.boxes[:, 3:]) / 2.0
    centres_new = (new.boxes[:, :3] + new.boxes[:, 3:]) / 2.0
    pairs = []
    for i in np.flatnonzero(ref.scores >= min_score):
        if not len(new):
            pairs.append({"fp32_score": round(float(ref.scores[i]), 4), "match": None})
            continue
        distance = np.linalg.norm(centres_new - centres_ref[i], axis=1)
        j = int(distance.argmin())
        pairs.append({"fp32_score": round(float(ref.scores[i]), 4), "score": round(float(new.scores[j]), 4),
                      "centre_mm": round(float(distance[j]), 2), "mask_dice": _rounded(mask_dice(ref, int(i), new, j))})

    def reported(out: Any) -> list[float]:
        return [round(float(s), 4) for s in out.scores[out.scores >= REPORTED]]

    return {"pairs": pairs, "reported_fp32": reported(ref), "reported_new": reported(new),
            "same_findings_at_0.5": _same_findings(ref, new),
            "max_score_diff": max((abs(p["score"] - p["fp32_score"]) for p in pairs if "score" in p), default=None),
            "max_centre_mm": max((p["centre_mm"] for p in pairs if "centre_mm" in p), default=None),
            "min_mask_dice": min((p["mask_dice"] for p in pairs if p.get("mask_dice") is not None), default=None)}


def _same_findings(ref: Any, new: Any, centre_mm: float = 3.0) -> bool:
    """The same number of findings at 0.5, each fp32 one with a new one within ``centre_mm``."""
    a, b = np.flatnonzero(ref.scores >= REPORTED), np.flatnonzero(new.scores >= REPORTED)
    if len(a) != len(b):
        return False
    ca = (ref.boxes[a, :3] + ref.boxes[a, 3:]) / 2.0
    cb = (new.boxes[b, :3] + new.boxes[b, 3:]) / 2.0
    return all(np.linalg.norm(cb - c, axis=1).min() <= centre_mm for c in ca) if len(a) else True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "NODULENET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--phantom-seeds", type=int, nargs="*", default=[0, 1000, 1001, 1002, 1003])
    parser.add_argument("--min-score", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from nodulenet.infer.network import bf16_supported, run_network
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.infer.runtimes import make_backbone
    from nodulenet.infer.weights import load_model
    from nodulenet.io.scan import read_scan
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    torch.set_num_threads(args.threads)
    demo = load_model(None)
    t0 = time.perf_counter()
    variants: dict[str, tuple[str, Any]] = {"torch fp32": ("fp32", None)}
    if bf16_supported("cpu"):
        variants["torch bf16"] = ("bf16", None)
    variants["openvino fp32"] = ("fp32", make_backbone(demo.model, "openvino", "fp32"))
    variants["openvino int8"] = ("int8", make_backbone(demo.model, "openvino", "int8", "cpu", demo.prepare_config))
    setup_s = round(time.perf_counter() - t0, 1)
    scans: dict[str, Path] = {}
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        found = [p.parent for p in (args.data / "LIDC-IDRI" / patient).glob("*/*/*.xml")]
        if len(found) == 1:
            scans[patient] = found[0]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="precision_check_") as tmp:
        for seed in args.phantom_seeds:  # the held-out phantoms as heldout.py draws them; seed 0 as the tests do
            if seed >= 1000:
                from dataclasses import replace

                from nodulenet.data.synthetic import SMALL_PHANTOM
                from nodulenet.heldout import HELDOUT_NODULES_PER_PHANTOM

                config = replace(SMALL_PHANTOM, n_nodules=HELDOUT_NODULES_PER_PHANTOM)
            else:
                config = PhantomConfig()
            scans[f"phantom-{seed}"] = write_phantom(Path(tmp) / str(seed), seed, config, fmt="nii.gz")["scan"]
        for name, path in scans.items():
            image = prepare_input(read_scan(path), demo.prepare_config).image
            outs, seconds = {}, {}
            for variant, (precision, backbone) in variants.items():
                t = time.perf_counter()
                outs[variant] = run_network(demo.model, image, precision=precision, mask_threshold=REPORTED,
                                            channels_last=True, backbone=backbone)
                seconds[variant] = round(time.perf_counter() - t, 2)
            results[name] = {"network_seconds": seconds,
                             **{v: compare(outs["torch fp32"], outs[v], args.min_score) for v in variants
                                if v != "torch fp32"}}
            summary = ", ".join(f"{v}: same={results[name][v]['same_findings_at_0.5']} "
                                f"dscore={results[name][v]['max_score_diff']} dmm={results[name][v]['max_centre_mm']} "
                                f"dice={results[name][v]['min_mask_dice']}" for v in variants if v != "torch fp32")
            reported = [round(float(v), 4) for v in outs["torch fp32"].scores if v >= REPORTED]
            print(f"{name}: fp32 reported {reported}; {summary}", flush=True)
    same = {v: all(r[v]["same_findings_at_0.5"] for r in results.values()) for v in variants if v != "torch fp32"}
    record("precision_check", {"weights": "shipped demo model", "min_score": args.min_score, "threads": args.threads,
                               "variants_setup_seconds": setup_s, "by_scan": results,
                               "same_findings_everywhere": same})


if __name__ == "__main__":
    main()
