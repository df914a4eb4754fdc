"""``nodulenet predict`` on the real scan LIDC-IDRI-0001, end to end (DICOM in, every output written).

Each variant runs in a fresh (spawned) process so its peak resident memory is its own, and reports the stage
breakdown: read (DICOM), preprocess (resample, lung mask, normalise, crop), network (backbone, RPN, RCNN, mask
head on the findings), post-process (mapping back to the original grid + measurements), export (nodules.json,
candidates.csv, label map, DICOM SEG + SR, report.html).

Variants (``--variants``; default ``demo published published_fp32``):

- ``published``: the default (published-size, 17 M parameter) network, RANDOM-INIT weights: TIMING ONLY, with
  ``predict``'s defaults (``--precision auto``: fp32, see ``infer/network.resolve_precision``).
  A random network scores about half of its boxes above 0.5, so the default threshold would run the mask head on
  hundreds of meaningless detections; instead a first, untimed detection pass (in its own process, same code and
  precision) finds the score of the 10th best detection and the timed run uses it as ``--threshold``: 10 findings
  with masks, a realistic load.
- ``published_fp32``: the same in fp32 (today's numerics); ``published_contiguous``: fp32 without
  ``channels_last_3d``; ``published_onnx`` / ``published_openvino``: the backbone in ONNX Runtime / OpenVINO;
  ``published_bf16``: the backbone in bf16; ``published_int8``: the backbone in OpenVINO int8 (calibrated once by
  the untimed pre-pass into the run's own cache folder, read back by the timed run, as a second scan would).
- ``demo``: the demo-size (quarter-width) network: the shipped/trained demo weights when found (``--demo-weights``,
  else ``src/nodulenet/weights/demo.pt``) at the default threshold 0.5; random-init with the 10-findings rule
  otherwise (timing only; the record says which).

``--baseline-src PATH`` (e.g. ``/path/to/main/src``) also runs ``demo`` and ``published`` with the nodulenet under
PATH, default settings, each just before this checkout's run: the before/after ratio in one run (the machine's load
changes from minute to minute; the load average is recorded at the start and end of each variant). The CPU flags
that decide bf16 (``/proc/cpuinfo``, ``torch.backends.cpu.get_cpu_capability()``) are recorded too.

``--backbone-check Z`` times the published-size backbone alone in every runtime and precision (PyTorch fp32/bf16,
ONNX Runtime and OpenVINO fp32, OpenVINO int8), interleaved in one process. ``--bf16-check`` compares the
DETECTIONS of fp32 and bf16 autocast on a crop around the nodule (``benchmarks/results/predict_bf16_check.json``;
emulated bf16 where the CPU lacks it, so a crop); ``tests/test_infer_runtime.py`` holds the tolerances of the
bf16 backbone that ``predict`` uses.

    .venv/bin/python benchmarks/predict_speed.py [--quick] [--data PATH] [--demo-weights PATH] [--baseline-src PATH]
    .venv/bin/python benchmarks/predict_speed.py --bf16-check --demo-weights PATH [--crop 96]

``--quick`` runs the demo-size variant only. Wall-clock figures depend on what else runs on the machine: the load
average at the start and end of each variant is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import machine_info, record  # noqa: E402

PATIENT = "LIDC-IDRI-0001"
FINDINGS_FOR_RANDOM_WEIGHTS = 10
SHIPPED_DEMO = Path(__file__).resolve().parents[1] / "src" / "nodulenet" / "weights" / "demo.pt"


def _random_checkpoint(config_name: str, path: Path) -> Path:
    import torch

    from nodulenet.model import NoduleNet, published_config, tiny_config, to_checkpoint_dict

    config = published_config() if config_name == "published" else tiny_config()
    torch.manual_seed(0)
    torch.save(to_checkpoint_dict(NoduleNet(config), config, extra={"note": "random init, timing only"}), path)
    return path


def _threshold_for_top_k(predictor: Any, series: Path, k: int) -> float:
    """Score of the k-th best detection (untimed detection-only pass), so the timed run masks k findings."""
    from nodulenet.infer.network import run_network
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.io.scan import read_scan

    prepared = prepare_input(read_scan(series), predictor.loaded.prepare_config)
    out = run_network(predictor.loaded.model, prepared.image, mask_threshold=None,
                      channels_last=predictor.channels_last, precision=getattr(predictor, "precision", "fp32"),
                      backbone=getattr(predictor, "backbone", None))
    scores = sorted(out.scores.tolist(), reverse=True)
    return float(scores[min(k, len(scores)) - 1]) if scores else 1.0


def _use_source(src: str | None) -> None:
    """Child process: import nodulenet from ``src`` (another checkout's ``src/``) instead of this one."""
    if src:
        sys.path.insert(0, src)
        # The spawned child already imported this checkout's nodulenet (via _record): forget it.
        for module in [m for m in sys.modules if m == "nodulenet" or m.startswith("nodulenet.")]:
            del sys.modules[module]


def _weights_for(name: str, work: Path, demo_weights: str | None) -> tuple[Path, str]:
    if name.startswith("published"):
        return _random_checkpoint("published", work / "random.pt"), "random init (timing only)"
    if demo_weights:
        return Path(demo_weights), f"trained demo weights {demo_weights}"
    return _random_checkpoint("tiny", work / "random.pt"), "random init (timing only)"


def _options(weights: Path, spec: dict[str, Any], threshold: float | None) -> Any:
    """PredictOptions of a variant; ``runtime`` only where that code has it (the baseline may not)."""
    from nodulenet.predict_api import PredictOptions

    kwargs: dict[str, Any] = {"weights": weights, "channels_last": spec["channels_last"],
                              "precision": spec.get("precision", "auto")}
    if threshold is not None:
        kwargs["threshold"] = threshold
    if "runtime" in {f.name for f in dataclasses.fields(PredictOptions)} and spec.get("runtime"):
        kwargs["runtime"] = spec["runtime"]
    return PredictOptions(**kwargs)


def _pre_pass(spec: dict[str, Any], series: str, out_root: str, demo_weights: str | None, queue: Any) -> None:
    """Child process: the threshold that gives a random-init network FINDINGS_FOR_RANDOM_WEIGHTS findings (with
    the variant's own code and precision), in its own process so the timed run's peak RSS is its own."""
    _use_source(spec.get("src"))
    from nodulenet.predict_api import Predictor

    work = Path(out_root) / f"{spec['name']}_pre"
    work.mkdir(parents=True)
    weights, _ = _weights_for(spec["name"], work, demo_weights)
    queue.put(_threshold_for_top_k(Predictor(_options(weights, spec, None)), Path(series),
                                   FINDINGS_FOR_RANDOM_WEIGHTS))


def _variant(spec: dict[str, Any], series: str, out_root: str, demo_weights: str | None, queue: Any) -> None:
    """Child process: one timed ``predict`` of the scan; puts its figures on ``queue``."""
    _use_source(spec.get("src"))
    import nodulenet
    import torch

    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import Predictor, predict_scans

    name = spec["name"]
    work = Path(out_root) / name
    work.mkdir(parents=True)
    weights, weights_note = _weights_for(name, work, demo_weights)
    threshold = spec.get("threshold")
    threshold_note = "default threshold 0.5" if threshold is None else (
        f"threshold {threshold:.6f} = score of the {FINDINGS_FOR_RANDOM_WEIGHTS}th detection (untimed pre-pass "
        "in another process, same code and precision)")
    predictor = Predictor(_options(weights, spec, threshold))
    load_start = list(os.getloadavg())
    t0, c0 = time.perf_counter(), time.process_time()
    run = predict_scans([series], work / "out", shard=Shard(0, 1, 0), predictor=predictor)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    (result,) = run.results
    queue.put({
        "code": spec.get("code", "this checkout"),
        "nodulenet_from": str(Path(nodulenet.__file__).parent),
        "status": result.status,
        "error": result.error,
        "weights": weights_note,
        "threshold": threshold_note,
        "network": predictor.loaded.net_config.name,
        "parameters": sum(p.numel() for p in predictor.loaded.model.parameters()),
        "channels_last": predictor.channels_last,
        "precision": predictor.precision,
        "runtime": getattr(predictor, "runtime", "torch"),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "stage_seconds": result.stage_seconds,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "peak_rss_note": "whole process (model load + one predict)",
        "n_findings": result.n_findings,
        "details": {k: v for k, v in result.details.items() if k not in ("files",)},
        "outputs": sorted(Path(p).name for p in result.details.get("files", {}).values()),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
    })


def _in_child(context: Any, target: Any, *args: Any) -> Any:
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


VARIANTS: dict[str, dict[str, Any]] = {
    # name -> settings; "published*" use random-init published-size weights, "demo*" the shipped demo model.
    "demo": {"channels_last": True},
    "published": {"channels_last": True},
    "published_fp32": {"channels_last": True, "precision": "fp32"},
    "published_contiguous": {"channels_last": False, "precision": "fp32"},
    "published_onnx": {"channels_last": True, "runtime": "onnx"},
    "published_openvino": {"channels_last": True, "runtime": "openvino"},
    "published_bf16": {"channels_last": True, "precision": "bf16"},
    # int8: calibrated by the untimed pre-pass into the run's cache folder; the timed run reads it back.
    "published_int8": {"channels_last": True, "precision": "int8"},
}


# LUNA16 annotations.csv: the one nodule of LIDC-IDRI-0001 (world LPS mm, x y z), 23.4 mm.
NODULE_0001_WORLD_XYZ = (56.21, 86.34, -115.87)


def _dice_on_crops(a: Any, box_a: tuple[int, ...], b: Any, box_b: tuple[int, ...]) -> float:
    """Dice of two crop-local probability masks (> 0.5) placed at their crop boxes."""
    import numpy as np

    lo = [min(box_a[k], box_b[k]) for k in range(3)]
    hi = [max(box_a[k + 3], box_b[k + 3]) for k in range(3)]
    canvas = [np.zeros([h - l for l, h in zip(lo, hi)], dtype=bool) for _ in range(2)]
    for c, m, box in zip(canvas, (a, b), (box_a, box_b)):
        c[tuple(slice(box[k] - lo[k], box[k + 3] - lo[k]) for k in range(3))] = m > 0.5
    total = canvas[0].sum() + canvas[1].sum()
    return float(2.0 * (canvas[0] & canvas[1]).sum() / total) if total else 1.0


def bf16_check(series: Path, weights: Path, crop: int) -> dict[str, Any]:
    """fp32 vs bf16 autocast detections on a crop around LIDC-IDRI-0001's nodule (bf16 EMULATED on this CPU).

    Emulated bf16 rounds exactly like native bf16 (same bf16 storage, fp32 accumulation in oneDNN's reference
    kernels), so the detections it gives are what a bf16 machine would give, only slower; hence a crop.
    """
    import numpy as np
    import torch

    from nodulenet.infer.network import _predict_tile, _to_input
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.infer.weights import load_model
    from nodulenet.io.scan import read_scan
    from nodulenet.model.box_ops import box_iou_3d

    loaded = load_model(weights)
    prepared = prepare_input(read_scan(series), loaded.prepare_config)
    centre = np.round(prepared.transform.world_to_preprocessed(NODULE_0001_WORLD_XYZ)).astype(int)
    lo = np.clip(centre - crop // 2, 0, np.maximum(np.asarray(prepared.image.shape) - crop, 0))
    image = prepared.image[tuple(slice(a, a + crop) for a in lo)]
    results, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        x = _to_input(image, "cpu", channels_last=True)
        loaded.model.to(memory_format=torch.channels_last_3d)
        t0 = time.perf_counter()
        results[precision] = _predict_tile(loaded.model, x, 0.5, None, precision)
        seconds[precision] = round(time.perf_counter() - t0, 2)
    f32, b16 = results["fp32"], results["bf16"]
    reported = [i for i, s in enumerate(f32["scores"]) if s >= 0.5]
    reported_b = [i for i, s in enumerate(b16["scores"]) if s >= 0.5]
    pairs = []
    if len(f32["boxes"]) and len(b16["boxes"]):
        iou = box_iou_3d(torch.from_numpy(f32["boxes"]).float(), torch.from_numpy(b16["boxes"]).float()).numpy()
        for i in reported:
            j = int(iou[i].argmax())
            pair = {"fp32_score": round(float(f32["scores"][i]), 4), "bf16_score": round(float(b16["scores"][j]), 4),
                    "box_iou": round(float(iou[i, j]), 4)}
            if i < len(f32["masks"]) and j < len(b16["masks"]):
                pair["mask_dice"] = round(_dice_on_crops(f32["masks"][i], tuple(f32["crops"][i]), b16["masks"][j],
                                                         tuple(b16["crops"][j])), 4)
            pairs.append(pair)
    return {
        "weights": str(weights), "network": loaded.net_config.name, "crop_zyx": [int(v) for v in image.shape],
        "crop_start_zyx": [int(v) for v in lo], "seconds": seconds,
        "n_detections": {"fp32": len(f32["scores"]), "bf16": len(b16["scores"])},
        "n_reported_at_0.5": {"fp32": len(reported), "bf16": len(reported_b)},
        "reported_pairs": pairs,
        "max_abs_score_diff_reported": max((abs(p["fp32_score"] - p["bf16_score"]) for p in pairs), default=None),
        "min_box_iou_reported": min((p["box_iou"] for p in pairs), default=None),
        "min_mask_dice_reported": min((p.get("mask_dice", 1.0) for p in pairs), default=None),
    }


def backbone_check(series: Path, z_slices: int, repeats: int) -> dict[str, Any]:
    """The published-size backbone on LIDC-IDRI-0001's network input (first ``z_slices`` slices) in each runtime
    and precision, interleaved in one process: seconds per pass, peak RSS, features against torch fp32."""
    import torch

    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.infer.runtimes import make_backbone
    from nodulenet.infer.weights import load_model
    from nodulenet.io.scan import read_scan
    from nodulenet.model import NoduleNet, published_config

    prepare_config = load_model(None).prepare_config
    image = prepare_input(read_scan(series), prepare_config).image[:z_slices]
    torch.manual_seed(0)
    model = NoduleNet(published_config()).eval().to(memory_format=torch.channels_last_3d)
    x = model._pad(torch.from_numpy(image).float().sub(128.0).div(128.0)[None, None])
    x = x.to(memory_format=torch.channels_last_3d)
    runners: dict[str, Any] = {"torch fp32": model.feature_net}
    export_s: dict[str, float] = {}
    if cpu_bf16():
        runners["torch bf16"] = make_backbone(model, "torch", "bf16")
    for runtime, package in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        try:
            __import__(package)
        except ImportError:
            continue
        t0 = time.perf_counter()
        runners[f"{runtime} fp32"] = make_backbone(model, runtime, "fp32")
        export_s[runtime] = round(time.perf_counter() - t0, 1)
    try:
        __import__("nncf")
    except ImportError:
        pass
    else:  # int8: calibrated here into an empty cache, so the once-per-weights cost is what is recorded
        with tempfile.TemporaryDirectory(prefix="int8_cache_") as cache:
            os.environ["NODULENET_CACHE_DIR"] = cache
            t0 = time.perf_counter()
            runners["openvino int8"] = make_backbone(model, "openvino", "int8", "cpu", prepare_config)
            export_s["openvino int8 (calibration + export, once per weights)"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            make_backbone(model, "openvino", "int8", "cpu", prepare_config)
            export_s["openvino int8 (from the cache)"] = round(time.perf_counter() - t0, 1)
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    diff: dict[str, float] = {}
    with torch.inference_mode():
        reference = None
        for _ in range(repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                features = run(x)
                seconds[name].append(round(time.perf_counter() - t0, 2))
                comb2 = features.comb2.float().contiguous()
                if reference is None:
                    reference = comb2
                diff[name] = float((comb2 - reference).abs().max() / reference.abs().max())
                print(f"{name}: {seconds[name][-1]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    best = {k: min(v) for k, v in seconds.items()}
    return {"input_zyx": list(x.shape[2:]), "seconds": seconds, "export_seconds": export_s,
            "speed_vs_torch_fp32": {k: round(best["torch fp32"] / v, 2) for k, v in best.items()},
            "comb2_max_rel_diff_vs_torch_fp32": diff, "peak_rss_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}


def cpu_bf16() -> bool:
    from nodulenet.infer.network import bf16_supported

    return bf16_supported("cpu")


def _cpu_flags() -> dict[str, Any]:
    """What decides bf16 on this CPU: the /proc/cpuinfo flags and torch's view of them."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _series_dir(data: Path) -> Path:
    found = [p.parent for p in (data / "LIDC-IDRI" / PATIENT).glob("*/*/*.xml")]
    if len(found) != 1:
        raise SystemExit(f"expected one annotated series under {data / 'LIDC-IDRI' / PATIENT}, found {len(found)}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo-size network only")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "NODULENET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--demo-weights", type=Path, default=SHIPPED_DEMO if SHIPPED_DEMO.is_file() else None)
    parser.add_argument("--variants", nargs="*", default=None, choices=sorted(VARIANTS),
                        help="default: demo published published_fp32")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also run each variant with the nodulenet under this src/ folder (e.g. main's), "
                             "default settings, in the same run: the before/after ratio")
    parser.add_argument("--bf16-check", action="store_true", help="only compare fp32 and (emulated) bf16 detections "
                                                                  "on a crop around the nodule (needs --demo-weights)")
    parser.add_argument("--crop", type=int, default=96, help="crop size of --bf16-check (voxels)")
    parser.add_argument("--backbone-check", type=int, default=None, metavar="Z",
                        help="only time the published-size backbone in each runtime/precision on the first Z slices "
                             "of the network input, interleaved (records predict_backbone_runtimes.json)")
    parser.add_argument("--repeats", type=int, default=2, help="passes per runtime of --backbone-check")
    args = parser.parse_args()
    if args.backbone_check:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        check = backbone_check(_series_dir(args.data), args.backbone_check, args.repeats)
        print(check)
        record("predict_backbone_runtimes", {"load_average_at_start": list(os.getloadavg()),
                                             "cpu_flags": _cpu_flags(), **check})
        return
    if args.bf16_check:
        if not args.demo_weights:
            raise SystemExit("--bf16-check needs trained weights (--demo-weights PATH)")
        check = bf16_check(_series_dir(args.data), args.demo_weights, args.crop)
        print(check)
        record("predict_bf16_check", {"load_average_at_start": list(os.getloadavg()), **check})
        return
    variants = args.variants or (["demo"] if args.quick else ["demo", "published", "published_fp32"])
    # As ``nodulenet predict`` does (nodulenet.commands.predict): idle OpenMP threads sleep; children inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    series = _series_dir(args.data)
    figures: dict[str, Any] = {"scan": PATIENT, "variants": {}, "cpu_flags": _cpu_flags()}
    context = multiprocessing.get_context("spawn")
    demo = str(args.demo_weights) if args.demo_weights else None
    specs = []
    for name in variants:
        spec = {"name": name, **VARIANTS[name]}
        if args.baseline_src and name in ("demo", "published"):  # today's code, then this checkout, in one run
            baseline = {"name": f"{name}@baseline", "channels_last": spec["channels_last"],
                        "src": str(args.baseline_src.resolve()), "code": f"baseline {args.baseline_src}"}
            specs.append((name, baseline))
        specs.append((name, spec))
    with tempfile.TemporaryDirectory(prefix="predict_speed_") as tmp:
        os.environ["NODULENET_CACHE_DIR"] = str(Path(tmp) / "cache")  # int8: this run's own calibration
        for name, spec in specs:
            if name.startswith("published") or not demo:
                spec["threshold"] = _in_child(context, _pre_pass, spec, str(series), tmp, demo)
            result = _in_child(context, _variant, spec, str(series), tmp, demo)
            if result["status"] != "done":
                raise SystemExit(f"{spec['name']} failed: {result['error']}")
            figures["variants"][spec["name"]] = result
            stages = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in result["stage_seconds"].items())
            print(f"{spec['name']} ({result['network']}, {result['precision']}/{result['runtime']}, "
                  f"{result['weights']}): {result['wall_s']:.1f} s wall [{stages}], "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['n_findings']} findings, "
                  f"load {result['load_average_start'][0]:.1f}->{result['load_average_end'][0]:.1f}", flush=True)
    ratios = {}
    for name in variants:
        old, new = figures["variants"].get(f"{name.split('_')[0]}@baseline"), figures["variants"].get(name)
        if old and new:
            ratios[name] = {"wall_baseline_over_new": round(old["wall_s"] / new["wall_s"], 2),
                            "peak_rss_baseline_over_new": round(old["peak_rss_mib"] / new["peak_rss_mib"], 2),
                            "stage_baseline_over_new": {
                                k: round(old["stage_seconds"][k] / new["stage_seconds"][k], 2)
                                for k in new["stage_seconds"] if old["stage_seconds"].get(k) and new["stage_seconds"][k]}}
            print(f"{name}: baseline {old['wall_s']:.1f} s / new {new['wall_s']:.1f} s = "
                  f"{ratios[name]['wall_baseline_over_new']:.2f}x; peak RSS {old['peak_rss_mib']:.0f} -> "
                  f"{new['peak_rss_mib']:.0f} MiB")
    figures["ratios"] = ratios
    figures["machine_note"] = machine_info().get("cpu")
    record("predict_speed_quick" if args.quick else "predict_speed", figures)


if __name__ == "__main__":
    main()
