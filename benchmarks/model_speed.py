"""Speed and memory of the NoduleNet network (published configuration, random weights).

Cases (each runs in its own subprocess so its peak memory is its own):

* ``backbone_fwd_128``      backbone forward on a 128^3 crop (inference, no autograd)
* ``backbone_fwd_bwd_128``  backbone forward + backward (train mode)
* ``train_step_128``        full training step, all stages (RPN, RCNN, mask losses), forward + backward
* ``predict_scan``          predict mode on a whole 208x320x320 scan, without and with masks

each in fp32, fp32 + ``channels_last_3d`` and bf16 autocast + ``channels_last_3d``. bf16 on a CPU without native
bf16 support (no AVX512-BF16/AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False) runs conv3d through a
slow reference kernel; there the bf16 cases are measured on a 32^3 crop only, to record the slowdown, unless
``--force-bf16``.

Random weights give random scores, so the number of detections is set by the caps: ``--detections`` (default 170,
about what the published model reports on a scan) sets the RPN post-NMS top-n; the RCNN keeps them all (published
test threshold 0.0). Published reference on the 2-core build machine: ~1.8 s backbone forward on 128^3, ~38 s for a
whole scan without masks. Other jobs may share the cores: the load average is recorded with every case.

    .venv/bin/python benchmarks/model_speed.py [--quick] [--device cpu|cuda] [--threads N] [--force-bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import machine_info, peak_rss_mib, record  # noqa: E402

PUBLISHED_SECONDS = {"backbone_fwd_128": 1.8, "predict_scan_nomask": 38.0}
SCAN_SHAPE = (208, 320, 320)


def run_case(name: str, variant: str, size: tuple[int, ...], reps: int, device: str, detections: int,
             threads: int) -> dict[str, Any]:
    """Runs in the child process. Returns timings (s), peak memory and what was produced."""
    import torch

    from nodulenet.model import NoduleNet, NoduleNetConfig, NoduleTargets

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = dataclasses.replace(NoduleNetConfig(), rpn_test_post_nms_top_n=detections)
    model = NoduleNet(cfg).to(device)
    channels_last = variant in ("fp32_cl", "bf16_cl")
    use_bf16 = variant == "bf16_cl"
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = (torch.randn(1, 1, *size, device=device) * 0.3).to(memory_format=fmt)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    info: dict[str, Any] = {}
    if name == "backbone_fwd":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model.feature_net(x)
    elif name == "backbone_fwd_bwd":
        model.train()

        def step() -> None:
            f = model.feature_net(x)
            (f.comb2.float().mean() + f.out2.float().mean()).backward()
    elif name == "train_step":
        model.train()
        c = [s // 2 for s in size]
        origin = torch.tensor([c[0] - 5, c[1] - 5, c[2] - 5])
        target = NoduleTargets(torch.cat([origin - 4, origin + 14]).float()[None].to(device),
                               [torch.ones(10, 10, 10, dtype=torch.uint8, device=device)], origin[None].to(device))

        def step() -> None:
            losses = model.losses(x, [target], generator=torch.Generator().manual_seed(0))
            losses["total"].backward()
            info["losses"] = sorted(losses)
    elif name in ("predict_nomask", "predict_mask"):
        model.eval()
        stages = ("rpn", "rcnn", "mask") if name == "predict_mask" else ("rpn", "rcnn")

        def step() -> None:
            det = model.predict(x, stages=stages)[0]
            info["detections"] = int(det.boxes.shape[0])
            info["proposals"] = int(det.proposals.shape[0])
            if det.mask_boxes is not None and len(det.mask_boxes):
                voxels = (det.mask_boxes[:, 3:] - det.mask_boxes[:, :3]).prod(dim=1).float()
                info["mask_crop_voxels_median"] = int(voxels.median())
                info["mask_crop_voxels_max"] = int(voxels.max())
    else:
        raise ValueError(name)

    times = []
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
        for i in range(reps + 1):  # first run warms up allocator and oneDNN primitive caches
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i > 0 or reps == 0:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    out = {"seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
           "peak_rss_mib": round(peak_rss_mib(), 1), **info}
    if device == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def child_main(args: argparse.Namespace) -> None:
    size = tuple(int(s) for s in args.size.split("x"))
    res = run_case(args.case, args.variant, size, args.reps, args.device, args.detections, args.threads)
    print("RESULT " + json.dumps(res), flush=True)


def run_in_child(case: str, variant: str, size: tuple[int, ...], reps: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--case", case, "--variant", variant, "--size",
           "x".join(map(str, size)), "--reps", str(reps), "--device", args.device, "--detections",
           str(args.detections), "--threads", str(args.threads)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
    res = json.loads(lines[-1][len("RESULT "):])
    res.update({"size_zyx": list(size), "variant": variant, "load_avg_1min_before": round(load_before, 2),
                "load_avg_1min_after": round(os.getloadavg()[0], 2), "process_wall_s": round(wall, 1)})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed repetition, fewer variants")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--detections", type=int, default=170)
    p.add_argument("--force-bf16", action="store_true", help="run bf16 at full size even without native bf16")
    p.add_argument("--skip-scan", action="store_true", help="leave out the whole-scan cases")
    # internal: one case in a child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return

    reps = 1 if args.quick else 3
    from nodulenet.model import cpu_has_fast_bf16

    native_bf16 = args.device == "cuda" or cpu_has_fast_bf16()
    full_bf16 = native_bf16 or args.force_bf16
    variants = ["fp32", "fp32_cl"] + (["bf16_cl"] if full_bf16 else [])
    figures: dict[str, Any] = {"device": args.device, "threads": args.threads, "native_bf16": native_bf16,
                               "detections_cap": args.detections, "quick": args.quick, "cases": {}}
    plan: list[tuple[str, str, str, tuple[int, ...], int]] = []
    for v in variants:
        plan.append((f"backbone_fwd_128/{v}", "backbone_fwd", v, (128,) * 3, reps))
    plan.append(("backbone_fwd_bwd_128/fp32", "backbone_fwd_bwd", "fp32", (128,) * 3, reps))
    plan.append(("train_step_128/fp32", "train_step", "fp32", (128,) * 3, reps))
    if not full_bf16:
        # Quantify the fallback: the same small crop in fp32 and in bf16.
        plan.append(("backbone_fwd_32/fp32", "backbone_fwd", "fp32", (32,) * 3, 1))
        plan.append(("backbone_fwd_32/bf16_cl", "backbone_fwd", "bf16_cl", (32,) * 3, 1))
    if not args.skip_scan:
        scan_variants = ["fp32"] if args.quick else ["fp32", "fp32_cl"]
        scan_variants += ["bf16_cl"] if full_bf16 else []
        scan_reps = 0 if args.quick else 1  # 0: time the first (only) run; a whole scan is long enough
        for v in scan_variants:
            plan.append((f"predict_scan_nomask/{v}", "predict_nomask", v, SCAN_SHAPE, scan_reps))
        plan.append(("predict_scan_mask/fp32", "predict_mask", "fp32", SCAN_SHAPE, scan_reps))

    for label, case, variant, size, r in plan:
        res = run_in_child(case, variant, size, r, args)
        figures["cases"][label] = res
        shown = {k: res.get(k) for k in ("median_s", "peak_rss_mib", "detections", "load_avg_1min_before", "error")
                 if k in res}
        print(f"{label:32s} {shown}", flush=True)

    ratios = {}
    for key, ref in PUBLISHED_SECONDS.items():
        for v in variants:
            res = figures["cases"].get(f"{key}/{v}", {})
            if "median_s" in res:
                ratios[f"{key}/{v}"] = round(res["median_s"] / ref, 3)
    figures["published_reference_s"] = PUBLISHED_SECONDS
    figures["ratio_to_published"] = ratios
    print("ratio to published (ours / published):", ratios)
    figures["machine_at_start"] = machine_info()
    record("model_speed", figures)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
