"""Box ops, anchors and box coder against hand-computed values and independent plain-numpy references.

Boxes are (z0, y0, x0, z1, y1, x1) voxels, z1 exclusive. The numpy references below loop box by box and
share no code with nodulenet.model.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from nodulenet.model.anchors import (
    DEFAULT_ANCHOR_SIZES,
    DEFAULT_STRIDE,
    assign_anchor_sizes_to_levels,
    make_anchors,
)
from nodulenet.model.box_coder import BoxCoder
from nodulenet.model.box_ops import (
    BoxMode,
    batched_nms_3d,
    box_iou_3d,
    box_volume,
    clip_boxes_3d,
    convert,
    nms_3d,
    remove_small_boxes,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- numpy references
def ref_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            inter = 1.0
            for axis in range(3):
                inter *= max(0.0, min(a[i, axis + 3], b[j, axis + 3]) - max(a[i, axis], b[j, axis]))
            vol_a = np.prod(np.clip(a[i, 3:] - a[i, :3], 0, None))
            vol_b = np.prod(np.clip(b[j, 3:] - b[j, :3], 0, None))
            union = vol_a + vol_b - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def ref_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Textbook greedy NMS: take the best remaining box, drop every remaining box with IoU > threshold."""
    order = np.argsort(-scores, kind="stable")
    volumes = np.prod(np.clip(boxes[:, 3:] - boxes[:, :3], 0, None), axis=1)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        lo = np.maximum(boxes[best, :3], boxes[rest, :3])
        hi = np.minimum(boxes[best, 3:], boxes[rest, 3:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        union = volumes[best] + volumes[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.int64)


def random_boxes(n: int, extent: float, max_size: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 3, generator=g, dtype=torch.float64) * extent
    size = torch.rand(n, 3, generator=g, dtype=torch.float64) * max_size + 1
    return torch.cat([centre - size / 2, centre + size / 2], dim=1).to(dtype)


# ----------------------------------------------------------------------------- IoU / volume
def test_iou_hand_values() -> None:
    boxes = torch.tensor([
        [0, 0, 0, 2, 2, 2],  # unit-offset overlap with the next: inter 1, union 15
        [1, 1, 1, 3, 3, 3],
        [0, 0, 0, 4, 4, 4],  # contains box 1 (volume 8 of 64)
    ], dtype=torch.float32)
    iou = box_iou_3d(boxes, boxes)
    expected = torch.tensor([
        [1.0, 1 / 15, 8 / 64],
        [1 / 15, 1.0, 8 / 64],
        [8 / 64, 8 / 64, 1.0],
    ])
    assert_close(iou, expected)
    assert_close(box_volume(boxes), torch.tensor([8.0, 8.0, 64.0]))


def test_iou_zero_size_and_inverted_boxes_give_zero_not_nan() -> None:
    boxes = torch.tensor([
        [5, 5, 5, 5, 9, 9],   # zero depth
        [5, 5, 5, 5, 9, 9],   # identical zero-size box: still 0, not 0/0
        [0, 0, 0, 10, 10, 10],
        [9, 9, 9, 3, 3, 3],   # inverted
    ], dtype=torch.float32)
    iou = box_iou_3d(boxes, boxes)
    assert torch.isfinite(iou).all()
    expected = torch.zeros(4, 4)
    expected[2, 2] = 1.0
    assert_close(iou, expected)
    assert_close(box_volume(boxes), torch.tensor([0.0, 0.0, 1000.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_iou_matches_numpy_reference_on_random_boxes(dtype: torch.dtype) -> None:
    a = random_boxes(60, 40, 20, seed=1, dtype=dtype)
    b = random_boxes(45, 40, 20, seed=2, dtype=dtype)
    expected = torch.from_numpy(ref_iou(a.double().numpy(), b.double().numpy())).to(dtype)
    assert_close(box_iou_3d(a, b), expected, rtol=1e-5, atol=1e-6)
    assert box_iou_3d(a[:0], b).shape == (0, 45)


# ----------------------------------------------------------------------------- NMS
def test_nms_identical_boxes_keep_one_highest_score() -> None:
    boxes = torch.tensor([[0, 0, 0, 10, 10, 10]] * 4, dtype=torch.float32)
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9])
    # Ties (0.9, 0.9) resolve to the earlier index.
    assert nms_3d(boxes, scores, 0.5).tolist() == [1]


def test_nms_threshold_is_strict_and_nested_boxes() -> None:
    boxes = torch.tensor([
        [0, 0, 0, 2, 2, 2],   # volume 8
        [0, 0, 0, 2, 2, 4],   # volume 16, contains box 0: IoU exactly 0.5
        [20, 20, 20, 24, 24, 24],
        [21, 21, 21, 23, 23, 23],  # nested in box 2: IoU 8/64
    ], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU == threshold survives (published py_nms keeps overlap <= thresh).
    assert nms_3d(boxes, scores, 0.5).tolist() == [3, 0, 1, 2]
    assert nms_3d(boxes, scores, 0.49).tolist() == [3, 0, 2]
    assert nms_3d(boxes, scores, 0.1).tolist() == [3, 0]


def test_nms_empty_input() -> None:
    kept = nms_3d(torch.zeros(0, 6), torch.zeros(0), 0.1)
    assert kept.dtype == torch.long and kept.numel() == 0


@pytest.mark.parametrize(
    ("n", "extent", "max_size", "threshold", "seed"),
    [(600, 60, 20, 0.1, 3), (1500, 100, 15, 0.5, 4), (1200, 50, 30, 0.3, 5)],
)
def test_nms_matches_numpy_greedy(n: int, extent: float, max_size: float, threshold: float, seed: int) -> None:
    boxes = random_boxes(n, extent, max_size, seed)
    # Quantised scores create many ties, which must resolve in input order like the stable reference.
    scores = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed)).double()
    expected = ref_nms(boxes.numpy(), scores.numpy(), threshold)
    assert np.array_equal(nms_3d(boxes, scores, threshold).numpy(), expected)


def test_nms_long_suppression_chain_matches_reference() -> None:
    # Sliding boxes each overlapping only their neighbours (IoU 1/3): a chain longer than the fixed-point
    # budget, exercising the sequential finish. Greedy keeps every second box.
    z = torch.arange(1500, dtype=torch.float64) * 0.5
    ones = torch.ones_like(z)
    boxes = torch.stack([z, 0 * ones, 0 * ones, z + 1, ones, ones], dim=1)
    scores = -z
    kept = nms_3d(boxes, scores, 0.1)
    assert torch.equal(kept, torch.arange(0, 1500, 2))
    shuffled = torch.randperm(1500, generator=torch.Generator().manual_seed(0))
    kept = nms_3d(boxes[shuffled], scores[shuffled], 0.1)
    assert np.array_equal(kept.numpy(), ref_nms(boxes[shuffled].numpy(), scores[shuffled].numpy(), 0.1))


def test_nms_ten_thousand_boxes_equals_reference() -> None:
    boxes = random_boxes(10_000, 128, 25, seed=7)
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    start = time.perf_counter()
    kept = nms_3d(boxes, scores, 0.1)
    elapsed = time.perf_counter() - start
    expected = ref_nms(boxes.numpy(), scores.numpy(), 0.1)
    assert np.array_equal(kept.numpy(), expected)
    print(f"nms_3d 10k boxes, float64 ({len(kept)} kept): {elapsed:.3f} s")


@pytest.mark.slow
def test_nms_ten_thousand_boxes_well_under_a_second() -> None:
    # Timed on one thread: on the shared 2-core build machine, when other jobs hold the cores, every torch
    # op big enough to go parallel waits ~10 ms for its second OpenMP thread, and 2-thread times grow
    # 5-20x; single-thread times barely move. Still `slow` (run with `-m slow`): it is a timing.
    boxes = random_boxes(10_000, 128, 25, seed=7, dtype=torch.float32)
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nms_3d(boxes[:600], scores[:600], 0.1)  # warm-up (allocator)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            nms_3d(boxes, scores, 0.1)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"nms_3d 10k boxes, float32, 1 thread, best of 3: {min(times):.3f} s")
    assert min(times) < 1.0


def test_batched_nms_separates_groups() -> None:
    boxes = random_boxes(400, 40, 15, seed=8)
    scores = torch.rand(400, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    groups = torch.randint(0, 3, (400,), generator=torch.Generator().manual_seed(9))
    kept = set(batched_nms_3d(boxes, scores, groups, 0.2).tolist())
    expected: set[int] = set()
    for g in range(3):
        members = torch.nonzero(groups == g).squeeze(1).numpy()
        local = ref_nms(boxes.numpy()[members], scores.numpy()[members], 0.2)
        expected |= set(members[local].tolist())
    assert kept == expected
    # Identical boxes in different groups do not suppress each other.
    same = torch.tensor([[0, 0, 0, 5, 5, 5]] * 2, dtype=torch.float32)
    assert sorted(batched_nms_3d(same, torch.tensor([0.5, 0.6]), torch.tensor([0, 1]), 0.1).tolist()) == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nms_and_iou_on_cuda_match_cpu() -> None:
    boxes = random_boxes(2000, 80, 20, seed=10, dtype=torch.float32)
    scores = torch.rand(2000, generator=torch.Generator().manual_seed(10))
    on_device = nms_3d(boxes.cuda(), scores.cuda(), 0.1)
    assert on_device.device.type == "cuda"
    assert torch.equal(on_device.cpu(), nms_3d(boxes, scores, 0.1))
    assert_close(box_iou_3d(boxes[:300].cuda(), boxes[300:600].cuda()).cpu(), box_iou_3d(boxes[:300], boxes[300:600]))
    groups = torch.arange(2000) % 2
    assert torch.equal(batched_nms_3d(boxes.cuda(), scores.cuda(), groups.cuda(), 0.1).cpu(),
                       batched_nms_3d(boxes, scores, groups, 0.1))


# ----------------------------------------------------------------------------- precision under autocast
def test_ops_under_bf16_autocast_compute_in_float32() -> None:
    boxes32 = random_boxes(300, 300, 40, seed=11, dtype=torch.float32)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes16 = boxes32.to(torch.bfloat16)  # what a bf16 head would hand over
        iou = box_iou_3d(boxes16, boxes16)
        kept = nms_3d(boxes16, scores.to(torch.bfloat16), 0.1)
    assert iou.dtype == torch.float32
    rounded = boxes16.float()
    assert_close(iou, box_iou_3d(rounded, rounded))
    assert torch.equal(kept, nms_3d(rounded, scores.to(torch.bfloat16).float(), 0.1))


def test_fp16_boxes_larger_than_fp16_volume_range() -> None:
    # A 50^3 box has volume 125000 > 65504 (fp16 max): computed in fp16 the IoU would be inf/inf = NaN.
    boxes = torch.tensor([[0, 0, 0, 50, 50, 50], [0, 0, 0, 50, 50, 25]], dtype=torch.float16)
    assert_close(box_iou_3d(boxes, boxes), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert nms_3d(boxes, torch.tensor([0.9, 0.8], dtype=torch.float16), 0.4).tolist() == [0]


# ----------------------------------------------------------------------------- clip / small / convert
def test_clip_boxes_touching_and_outside_the_border() -> None:
    boxes = torch.tensor([
        [-3, 2, 5, 4, 9, 12],      # sticks out at z0 and x1
        [0, 0, 0, 8, 10, 10],      # touches every border exactly: unchanged
        [20, 20, 20, 30, 30, 30],  # fully outside: becomes zero-size
    ], dtype=torch.float32)
    clipped = clip_boxes_3d(boxes, (8, 10, 10))
    expected = torch.tensor([
        [0, 2, 5, 4, 9, 10],
        [0, 0, 0, 8, 10, 10],
        [8, 10, 10, 8, 10, 10],
    ], dtype=torch.float32)
    assert_close(clipped, expected)
    assert box_volume(clipped)[2] == 0
    assert remove_small_boxes(clipped, 1.0).tolist() == [0, 1]
    assert remove_small_boxes(clipped, 4.5).tolist() == [1]  # box 0 is only 4 deep


def test_convert_hand_values_and_round_trip() -> None:
    zyxzyx = torch.tensor([[2.0, 0.0, 10.0, 5.0, 4.0, 20.0]])
    assert_close(convert(zyxzyx, BoxMode.ZYXZYX, BoxMode.ZYXDHW), torch.tensor([[3.5, 2.0, 15.0, 3.0, 4.0, 10.0]]))
    # Published (voxel-index) centres are half a voxel lower: slices 2, 3, 4 are centred on index 3.
    assert_close(convert(zyxzyx, BoxMode.ZYXZYX, BoxMode.ZYXDHW_INDEX),
                 torch.tensor([[3.0, 1.5, 14.5, 3.0, 4.0, 10.0]]))
    boxes = random_boxes(50, 30, 10, seed=12)
    for a, b in itertools.permutations(list(BoxMode), 2):
        assert_close(convert(convert(boxes, BoxMode.ZYXZYX, a), a, b), convert(boxes, BoxMode.ZYXZYX, b))
        assert_close(BoxMode.convert(convert(boxes, BoxMode.ZYXZYX, a), a, BoxMode.ZYXZYX), boxes)


# ----------------------------------------------------------------------------- anchors
def test_anchors_2x2x2_by_hand() -> None:
    anchors = make_anchors((2, 2, 2), 4, (5.0, 10.0))
    assert anchors.shape == (2 * 2 * 2 * 2, 6)
    # First feature voxel, both sizes: centre (2, 2, 2) = (0 + 0.5) * 4.
    assert_close(anchors[0], torch.tensor([-0.5, -0.5, -0.5, 4.5, 4.5, 4.5]))
    assert_close(anchors[1], torch.tensor([-3.0, -3.0, -3.0, 7.0, 7.0, 7.0]))
    # Next: x advances (a fastest, then x): centre (2, 2, 6).
    assert_close(anchors[2], torch.tensor([-0.5, -0.5, 3.5, 4.5, 4.5, 8.5]))
    # Last: voxel (1, 1, 1), size 10, centre (6, 6, 6).
    assert_close(anchors[15], torch.tensor([1.0, 1.0, 1.0, 11.0, 11.0, 11.0]))
    for index, (z, y, x, a) in enumerate(itertools.product(range(2), range(2), range(2), range(2))):
        size = (5.0, 10.0)[a]
        centre = torch.tensor([(z + 0.5) * 4, (y + 0.5) * 4, (x + 0.5) * 4])
        assert_close(anchors[index], torch.cat([centre - size / 2, centre + size / 2]))


def test_anchor_centres_match_published_index_convention() -> None:
    # Published make_rpn_windows: centre = (stride - 1) / 2 + stride * i in voxel-index coordinates,
    # iterated as product(z, y, x, anchors). Rebuilt here from that formula only.
    stride, shape = 4, (3, 2, 4)
    offset = (stride - 1) / 2
    published = [
        [offset + stride * z, offset + stride * y, offset + stride * x, s, s, s]
        for z, y, x, s in itertools.product(range(shape[0]), range(shape[1]), range(shape[2]), DEFAULT_ANCHOR_SIZES)
    ]
    ours = convert(make_anchors(shape, stride), BoxMode.ZYXZYX, BoxMode.ZYXDHW_INDEX)
    assert_close(ours, torch.tensor(published, dtype=torch.float32))
    assert DEFAULT_STRIDE == 4 and DEFAULT_ANCHOR_SIZES == (5.0, 10.0, 20.0, 30.0, 50.0)


def test_anchor_order_matches_rpn_head_flattening() -> None:
    shape, sizes = (3, 4, 5), (5.0, 10.0, 20.0)
    anchors = make_anchors(shape, 4, sizes)
    # A head output [B, Z, Y, X, A] holding its own (z, y, x, a) coordinates, flattened as the RPN does.
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (*shape, len(sizes))), indexing="ij"), dim=-1)
    flat = grid.unsqueeze(0).reshape(1, -1, 4)[0].float()
    centres = convert(anchors, BoxMode.ZYXZYX, BoxMode.ZYXDHW)
    assert_close(centres[:, :3], (flat[:, :3] + 0.5) * 4)
    assert_close(centres[:, 3], torch.tensor(sizes)[flat[:, 3].long()])


def test_anchor_sizes_to_fpn_levels() -> None:
    assert assign_anchor_sizes_to_levels(DEFAULT_ANCHOR_SIZES, (2, 4, 8, 16)) == {
        2: (5.0, 10.0), 4: (20.0,), 8: (30.0,), 16: (50.0,)
    }
    assert assign_anchor_sizes_to_levels(DEFAULT_ANCHOR_SIZES, (4,)) == {4: DEFAULT_ANCHOR_SIZES}
    # A level no size is close to stays present, empty.
    assert assign_anchor_sizes_to_levels((5.0,), (2, 32)) == {2: (5.0,), 32: ()}


@pytest.mark.parametrize("device", DEVICES)
def test_anchors_device_dtype_and_published_count(device: str) -> None:
    anchors = make_anchors((32, 32, 32), 4, device=device)
    assert anchors.shape == (32 ** 3 * 5, 6) and anchors.device.type == device and anchors.dtype == torch.float32


# ----------------------------------------------------------------------------- box coder
def test_coder_hand_computed_deltas() -> None:
    anchor = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0, 10.0]])  # centre 5, size 10
    gt = torch.tensor([[2.0, 0.0, 0.0, 12.0, 20.0, 5.0]])       # centre (7, 10, 2.5), size (10, 20, 5)
    deltas = BoxCoder().encode(anchor, gt)
    assert_close(deltas, torch.tensor([[0.2, 0.5, -0.25, 0.0, math.log(2), math.log(0.5)]]))
    assert_close(BoxCoder().decode(anchor, deltas), gt)
    # Weights multiply on encode (published box_transform), divide on decode.
    weighted = BoxCoder(weights=(10, 10, 10, 5, 5, 5))
    assert_close(weighted.encode(anchor, gt), deltas * torch.tensor([10.0, 10, 10, 5, 5, 5]))
    assert_close(weighted.decode(anchor, weighted.encode(anchor, gt)), gt)


def test_coder_matches_published_formula_in_index_frame() -> None:
    anchors = random_boxes(40, 60, 30, seed=13)
    gt = random_boxes(40, 60, 30, seed=14)
    a = convert(anchors, BoxMode.ZYXZYX, BoxMode.ZYXDHW_INDEX).numpy()
    t = convert(gt, BoxMode.ZYXZYX, BoxMode.ZYXDHW_INDEX).numpy()
    published = np.concatenate([(t[:, :3] - a[:, :3]) / a[:, 3:], np.log(t[:, 3:] / a[:, 3:])], axis=1)
    assert_close(BoxCoder().encode(anchors, gt), torch.from_numpy(published))


def test_coder_round_trip_random_and_clamped_decode() -> None:
    anchors = random_boxes(500, 100, 40, seed=15, dtype=torch.float32)
    gt = random_boxes(500, 100, 40, seed=16, dtype=torch.float32)
    coder = BoxCoder()
    assert_close(coder.decode(anchors, coder.encode(anchors, gt)), gt, rtol=1e-5, atol=1e-4)
    huge = torch.tensor([[0.0, 0.0, 0.0, 1e4, -1e4, 88.0]])
    decoded = coder.decode(torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0, 10.0]]), huge)
    assert torch.isfinite(decoded).all()
    sizes = decoded[0, 3:] - decoded[0, :3]
    assert_close(sizes, torch.tensor([10.0 * 62.5, 10.0 / 62.5, 10.0 * 62.5]))
    # Degenerate (zero-size) targets still encode to finite numbers.
    zero = torch.tensor([[3.0, 3.0, 3.0, 3.0, 5.0, 5.0]])
    assert torch.isfinite(coder.encode(torch.tensor([[0.0, 0, 0, 4, 4, 4]]), zero)).all()


def test_coder_bf16_inputs_decode_in_float32() -> None:
    anchors = make_anchors((8, 8, 8), 4) + 300.0  # coordinates bf16 cannot hold to the voxel
    deltas = torch.full((anchors.shape[0], 6), 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = BoxCoder().decode(anchors, deltas.to(torch.bfloat16))
    assert decoded.dtype == torch.float32
    assert_close(decoded, BoxCoder().decode(anchors, deltas.to(torch.bfloat16).float()))
