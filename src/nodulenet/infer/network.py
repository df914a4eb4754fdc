"""Run NoduleNet over a whole preprocessed scan: one padded pass, or overlapping tiles under a memory budget.

Conventions: the input is the uint8 ``(z, y, x)`` image of a prepared case; the network sees
``(raw - 128) / 128`` (the published normalisation). Boxes are ``(z0, y0, x0, z1, y1, x1)`` float voxels of
that image, end exclusive (voxel ``i`` spans ``[i, i + 1)``, see ``nodulenet.model.box_ops``). Masks are
CROP-LOCAL probability volumes: ``masks[i]`` covers the integer box ``mask_boxes[i]`` of the image.

Post-processing is the published one (RPN score > 0.5 -> NMS 0.1 -> RCNN -> NMS 0.1 -> masks -> mask-IoU NMS
0.3, thresholds from the model's config), with one saving: masks are computed only for detections whose score
reaches ``mask_threshold`` (the findings that will be reported). That set is exactly what the published order
gives for those detections: greedy mask NMS in score order only lets a higher-scoring - hence also reported -
mask suppress a reported one. The published code runs the mask head on every detection (on an untrained or
uncertain model, hundreds), which is most of its 134 s per scan.

The network's ``predict`` does it all in one pass (``mask_min_score``: masks for the reported detections only;
``keep_centres_within``: a tile's detections are limited to its core before any mask is made).

Tiles (:mod:`.tiling`): each tile is predicted on its own; a detection is kept by the tile whose core holds its
centre; then box NMS and mask NMS run once more over the merged detections, as a single pass would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nodulenet.infer.runtimes import Backbone, torch_bf16_backbone
from nodulenet.infer.tiling import Tile, plan_tiles

PRECISIONS = ("fp32", "bf16", "int8")


@dataclass
class NetworkOutput:
    """Detections on the preprocessed grid by decreasing score (see the module docstring for conventions)."""

    boxes: np.ndarray  # [N, 6] float64
    scores: np.ndarray  # [N] float64
    masks: list[np.ndarray | None]  # per detection: float32 probabilities over mask_boxes[i], or None
    mask_boxes: list[tuple[int, int, int, int, int, int] | None]
    n_proposals: int = 0
    tiles: list[Tile] = field(default_factory=list)
    precision: str = "fp32"
    runtime: str = "torch"
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def mask_dice(a: NetworkOutput, i: int, b: NetworkOutput, j: int) -> float | None:
    """Dice of detection ``i``'s mask (> 0.5) in ``a`` and detection ``j``'s in ``b``, placed at their crop boxes;
    None where either has no mask. How runtimes and precisions are compared with fp32 (tests, benchmarks)."""
    mask_a, mask_b = a.masks[i], b.masks[j]
    if mask_a is None or mask_b is None:
        return None
    ka, kb = np.asarray(a.mask_boxes[i]), np.asarray(b.mask_boxes[j])
    lo, hi = np.minimum(ka[:3], kb[:3]), np.maximum(ka[3:], kb[3:])
    canvas = []
    for probs, box in ((mask_a, ka), (mask_b, kb)):
        c = np.zeros(hi - lo, dtype=bool)
        c[tuple(slice(box[d] - lo[d], box[d + 3] - lo[d]) for d in range(3))] = probs > 0.5
        canvas.append(c)
    total = canvas[0].sum() + canvas[1].sum()
    return float(2.0 * (canvas[0] & canvas[1]).sum() / total) if total else 1.0


def bf16_supported(device: str) -> bool:
    """True where bf16 runs natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX.

    Elsewhere (e.g. this project's AVX2-only build machines) PyTorch falls back to reference bf16 convolution
    kernels, measured 10-100x SLOWER than fp32 per convolution, so bf16 is refused there.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    from nodulenet.model import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def resolve_precision(precision: str, device: str) -> str:
    """``fp32``, ``bf16`` (the BACKBONE in bf16 autocast; RPN, RCNN and mask heads stay fp32) or ``int8`` (the
    backbone quantised in OpenVINO, :mod:`.quantize`; CPU only).

    ``auto`` is fp32. Re-measured with the published RCNN crop frame (``benchmarks/precision_check.py``, shipped
    demo model, LIDC-IDRI-0001/0002 + phantoms 0, 1000..1003; ``benchmarks/demo_model_quality.py --precisions``,
    held-out seeds 1000..1019; 2-core AVX512-BF16 EPYC): bf16 reports the same findings at 0.5 on all 7 scans,
    scores within 0.044, reported centres within 0.65 mm, and the same held-out CPM (0.9607, 78/80 hit, 57 false
    positives); but reported masks reach Dice 0.940 and 0.960 against fp32 (phantoms 1002, 1003), below the 0.99
    this project states for "the same result" (volumes and diameters come from the masks), and a score moved by up
    to 0.05 can still cross the threshold. So bf16 stays an option (``--precision bf16``: the published-size
    backbone 2.4x faster), not the default (``tests/test_infer_runtime.py`` holds the tolerances). int8 moves
    LIDC-IDRI-0001's nodule by 7.4 mm: an option too. bf16 without native support (AVX512-BF16/AMX) is refused
    with the reason."""
    from nodulenet.errors import NoduleNetError

    if precision == "auto":
        return "fp32"
    if precision not in PRECISIONS:
        raise NoduleNetError(f"--precision must be fp32, bf16, int8 or auto, got {precision!r}")
    if precision == "int8":  # the backbone quantised in OpenVINO (infer/quantize.py): CPU, openvino + nncf
        from nodulenet.infer.quantize import check_int8_available

        check_int8_available(device)
    if precision == "bf16" and not bf16_supported(device):
        raise NoduleNetError(f"--precision bf16: {device} has no native bf16 support (needs AVX512-BF16/AMX or a "
                             "bf16 GPU); emulated bf16 convolutions run 10-100x slower than fp32: use fp32")
    return precision


def _to_input(image_u8: np.ndarray, device: str, channels_last: bool = False) -> Any:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image_u8)).to(device=device, dtype=torch.float32)
    x = x.sub_(128.0).div_(128.0)[None, None]
    return x.to(memory_format=torch.channels_last_3d) if channels_last else x


def _predict_tile(model: Any, x: Any, mask_threshold: float | None, core: tuple[np.ndarray, np.ndarray] | None,
                  precision: str, backbone: Backbone | None = None) -> dict[str, Any]:
    """Detections of one input tensor ``[1, 1, Z, Y, X]`` (tile-local voxels), owned ones only if ``core``.

    ``backbone``: what runs the backbone (:mod:`.runtimes`); by default the model's own, in bf16 for ``bf16``.
    """
    import torch

    stages = ("rpn", "rcnn") if mask_threshold is None else ("rpn", "rcnn", "mask")
    region = None if core is None else (core[0].tolist(), core[1].tolist())
    if backbone is None and precision == "bf16":
        backbone = torch_bf16_backbone(model, "cuda" if x.is_cuda else "cpu")
    with torch.inference_mode():
        det = model.predict(x, stages=stages, mask_min_score=mask_threshold, keep_centres_within=region,
                            backbone=backbone)[0]
    masks = det.masks or []
    return {
        "boxes": det.boxes.cpu().double().numpy(),
        "scores": det.scores.cpu().double().numpy(),
        "masks": [m.float().cpu().numpy() for m in masks],
        "crops": None if det.mask_boxes is None else det.mask_boxes.cpu().numpy().astype(np.int64),
        "n_proposals": int(det.proposals.shape[0]),
    }


def run_network(model: Any, image_u8: np.ndarray, *, device: str = "cpu", precision: str = "fp32",
                mask_threshold: float | None = 0.5, memory_budget_bytes: float | None = None,
                channels_last: bool = False, backbone: Backbone | None = None,
                runtime: str = "torch") -> NetworkOutput:
    """Detections (+ masks for scores >= ``mask_threshold``; None: no masks) of the whole preprocessed image.

    ``channels_last``: run the network in ``channels_last_3d`` memory format (the model is converted in place). On
    the AVX2 build machine it made fp32 15-25% faster (published backbone on LIDC-IDRI-0001: 18 s vs 21 s) with
    the same findings (boxes within 1e-5 voxel, scores within 3e-7); ``nodulenet predict`` turns it on for CPU.
    ``backbone``/``runtime``: what runs the backbone (:func:`.runtimes.make_backbone`) and its name, recorded.
    """
    import torch

    from nodulenet.model.box_ops import nms_3d
    from nodulenet.model.mask_head import mask_nms

    precision = resolve_precision(precision, device)
    if precision == "int8" and backbone is None:  # int8 IS a runtime's backbone: build it (cached on disk)
        from nodulenet.infer.runtimes import make_backbone

        backbone, runtime = make_backbone(model, "openvino", "int8", device), "openvino"
    cfg = model.config
    element_size = 4  # bf16 runs the backbone only and hands fp32 features to the heads: budget as fp32
    tiles = plan_tiles(tuple(image_u8.shape), cfg, memory_budget_bytes, element_size)  # type: ignore[arg-type]
    model.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    t0 = time.perf_counter()
    boxes_all, scores_all, masks_all, crops_all = [], [], [], []
    n_proposals = 0
    for tile in tiles:
        x = _to_input(image_u8[tile.slices], device, channels_last)
        offset = np.asarray(tile.start, dtype=np.float64)
        core = None
        if len(tiles) > 1:
            core = (np.asarray(tile.core_start) - offset, np.asarray(tile.core_stop) - offset)
        out = _predict_tile(model, x, mask_threshold, core, precision, backbone)
        del x
        n_proposals += out["n_proposals"]
        shift = np.concatenate([offset, offset])
        boxes_all.append(out["boxes"] + shift)
        scores_all.append(out["scores"])
        n = len(out["scores"])
        masks_all += out["masks"] + [None] * (n - len(out["masks"]))
        tile_crops = out["crops"] if out["crops"] is not None else []
        crops = [tuple(int(v) for v in c + shift.astype(np.int64)) for c in tile_crops]
        crops_all += crops + [None] * (n - len(crops))
    t_net = time.perf_counter()

    boxes = np.concatenate(boxes_all) if boxes_all else np.zeros((0, 6))
    scores = np.concatenate(scores_all) if scores_all else np.zeros(0)
    # Merge tiles as one pass would: box NMS (a no-op on a single pass, already NMS-ed), then mask NMS.
    if len(tiles) > 1 and len(scores):
        keep = nms_3d(torch.from_numpy(boxes), torch.from_numpy(scores), float(cfg.rcnn_test_nms_iou)).numpy()
    else:
        keep = np.argsort(-scores, kind="stable")
    masked = [int(i) for i in keep if masks_all[i] is not None]
    # (A single pass had its mask NMS inside ``predict``; tiles need it once more across their borders.)
    if cfg.mask_test_nms_iou is not None and len(tiles) > 1 and len(masked) > 1:
        kept_masked = mask_nms([torch.from_numpy(masks_all[i]) for i in masked],
                               torch.tensor([crops_all[i] for i in masked], dtype=torch.long),
                               float(cfg.mask_test_nms_iou)).tolist()
        dropped = set(masked) - {masked[k] for k in kept_masked}
        keep = np.asarray([i for i in keep if int(i) not in dropped], dtype=np.int64)
    keep = np.asarray(keep, dtype=np.int64)
    return NetworkOutput(
        boxes=boxes[keep] if len(keep) else np.zeros((0, 6)),
        scores=scores[keep] if len(keep) else np.zeros(0),
        masks=[masks_all[i] for i in keep],
        mask_boxes=[crops_all[i] for i in keep],
        n_proposals=n_proposals,
        tiles=tiles,
        precision=precision,
        runtime=runtime,
        stage_seconds={"network": round(t_net - t0, 3), "merge": round(time.perf_counter() - t_net, 3)},
    )
