"""Building blocks of the network against independent references (scipy / hand-computed values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import correlate

from nodulenet.model.backbone import ResBlock3d
from nodulenet.model.mask_head import mask_crop_boxes, mask_nms, paste_masks_to_crop
from nodulenet.model.rcnn import crop_and_pool, feature_crop_ranges
from nodulenet.model.rpn import RpnHead


def _conv3d_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Cross-correlation of x[C,Z,Y,X] with w[O,C,k,k,k] via scipy.signal.correlate (independent of torch)."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad)))
    out = []
    for o in range(w.shape[0]):
        acc = sum(correlate(xp[c], w[o, c], mode="valid", method="direct") for c in range(x.shape[0]))
        out.append(acc + b[o])
    return np.stack(out)


def _bn_reference(x: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    s = (slice(None), None, None, None)
    return (x - mean[s]) / np.sqrt(var[s] + 1e-5) * gamma[s] + beta[s]


def _fill_bn(bn: torch.nn.BatchNorm3d, rng: np.random.Generator) -> None:
    n = bn.num_features
    bn.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.3, n)))
    bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, n)))
    bn.weight.data.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n)))
    bn.bias.data.copy_(torch.from_numpy(rng.normal(0, 0.2, n)))


@pytest.mark.parametrize("c_in,c_out", [(3, 4), (4, 4)])
def test_resblock_matches_scipy_reference(c_in: int, c_out: int) -> None:
    rng = np.random.default_rng(7)
    block = ResBlock3d(c_in, c_out).double().eval()
    assert (block.shortcut is None) == (c_in == c_out)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.from_numpy(rng.normal(0, 0.3, tuple(p.shape))))
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                _fill_bn(m, rng)
    x = rng.normal(0, 1, (c_in, 5, 6, 7))
    got = block(torch.from_numpy(x)[None])[0].detach().numpy()

    def bn(m: torch.nn.BatchNorm3d, v: np.ndarray) -> np.ndarray:
        return _bn_reference(v, m.running_mean.numpy(), m.running_var.numpy(),
                             m.weight.detach().numpy(), m.bias.detach().numpy())

    h = _conv3d_reference(x, block.conv1.weight.detach().numpy(), block.conv1.bias.detach().numpy(), 1)
    h = np.maximum(bn(block.bn1, h), 0)
    h = bn(block.bn2, _conv3d_reference(h, block.conv2.weight.detach().numpy(), block.conv2.bias.detach().numpy(), 1))
    if block.shortcut is None:
        residual = x
    else:
        conv, norm = block.shortcut[0], block.shortcut[1]
        residual = bn(norm, _conv3d_reference(x, conv.weight.detach().numpy(), conv.bias.detach().numpy(), 0))
    expected = np.maximum(h + residual, 0)
    assert got.shape == (c_out, 5, 6, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert (expected > 0).mean() > 0.2  # the check is not vacuous (ReLU did not zero everything)


def test_rpn_head_flattens_anchor_fastest_with_published_channel_layout() -> None:
    torch.manual_seed(0)
    head = RpnHead(in_channels=8, num_anchors=5, hidden_channels=6).eval()
    f = torch.randn(2, 8, 3, 4, 5)
    logits, deltas = head(f)
    assert logits.shape == (2, 3 * 4 * 5 * 5) and deltas.shape == (2, 3 * 4 * 5 * 5, 6)
    raw_logits = head.logits(head.conv(f))  # [B, A, Z, Y, X]
    raw_deltas = head.deltas(head.conv(f))  # [B, 6A, Z, Y, X]
    b, z, y, x, a, k = 1, 2, 1, 3, 4, 5
    row = ((z * 4 + y) * 5 + x) * 5 + a
    assert torch.equal(logits[b, row], raw_logits[b, a, z, y, x])
    assert torch.equal(deltas[b, row, k], raw_deltas[b, a * 6 + k, z, y, x])


def test_feature_crop_ranges_by_hand() -> None:
    boxes = torch.tensor([
        [0.0, 3.0, 8.0, 5.0, 9.0, 12.0],   # z: 0..ceil(5/4)=2, y: floor(3/4)=0..3, x: 2..3
        [-6.0, 60.0, 1.0, -1.0, 70.0, 1.5],  # outside in z and y: clamped, at least one voxel
    ])
    ranges = feature_crop_ranges(boxes, 4, (8, 16, 16), frame="voxel_corner")
    assert ranges.tolist() == [[0, 0, 2, 2, 3, 3], [0, 15, 0, 1, 16, 1]]


def test_crop_and_pool_takes_max_of_the_region() -> None:
    f = torch.zeros(2, 1, 4, 4, 4)
    f[1, 0, 1, 2, 3] = 5.0  # inside box 0's region of image 1
    f[1, 0, 3, 3, 3] = 9.0  # outside it
    boxes = torch.tensor([[4.0, 8.0, 12.0, 8.0, 12.0, 16.0]])  # feature voxels z1, y2, x3 exactly
    pooled = crop_and_pool(f, boxes, torch.tensor([1]), stride=4, crop_size=2, frame="voxel_corner")
    assert pooled.shape == (1, 1, 2, 2, 2)
    assert torch.all(pooled == 5.0)  # a 1-voxel region is replicated by adaptive pooling
    assert crop_and_pool(f, boxes[:0], torch.tensor([], dtype=torch.long), 4, 7).shape == (0, 1, 7, 7, 7)


def test_mask_crop_boxes_extend_to_multiples_of_four_and_clip() -> None:
    boxes = torch.tensor([[5.2, 0.0, 13.0, 11.9, 7.0, 16.0], [60.0, -3.0, 30.0, 70.0, 2.0, 33.0]])
    crops = mask_crop_boxes(boxes, (64, 32, 32), multiple=4)
    assert crops.tolist() == [[4, 0, 12, 12, 8, 16], [60, 0, 28, 64, 4, 32]]


def test_mask_nms_suppresses_overlapping_masks_in_crop_frames() -> None:
    # Mask 0 and 1 cover the same 4^3 voxels through differently placed crops; mask 2 is elsewhere.
    m0 = torch.zeros(8, 8, 8)
    m0[4:8, 4:8, 4:8] = 0.9
    m1 = torch.zeros(8, 8, 8)
    m1[0:4, 0:4, 0:4] = 0.8
    m2 = torch.zeros(4, 4, 4)
    m2[:2] = 0.7
    boxes = torch.tensor([[0, 0, 0, 8, 8, 8], [4, 4, 4, 12, 12, 12], [20, 20, 20, 24, 24, 24]])
    assert mask_nms([m0, m1, m2], boxes, 0.3).tolist() == [0, 2]
    # Half overlap: IoU = 32 / (64 + 64 - 32) = 1/3 -> kept at 0.5, suppressed at 0.3.
    m3 = torch.zeros(8, 8, 8)
    m3[4:8, 4:8, 4:8] = 0.9  # crop origin z=2 -> global z 6..10, y/x 4..8; m0 is global z/y/x 4..8
    pair = torch.tensor([[0, 0, 0, 8, 8, 8], [2, 0, 0, 10, 8, 8]])
    assert mask_nms([m0, m3], pair, 0.5).tolist() == [0, 1]
    assert mask_nms([m0, m3], pair, 0.3).tolist() == [0]


def test_paste_masks_to_crop_places_instances_at_their_origin() -> None:
    inst = torch.ones(3, 2, 2, dtype=torch.uint8)
    origins = torch.tensor([[10, 20, 30]])
    out = paste_masks_to_crop([inst], origins, [8, 20, 28, 12, 24, 32], [0])
    assert out.shape == (4, 4, 4) and out.sum() == 2 * 2 * 2  # z 10,11 of the instance fall inside 8..12
    assert torch.all(out[2:4, 0:2, 2:4] == 1)
    assert paste_masks_to_crop([inst], origins, [0, 0, 0, 4, 4, 4], [0]).sum() == 0


def test_crop_and_pool_equals_torch_adaptive_max_pool_per_box() -> None:
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 3, 9, 10, 11, generator=gen, dtype=torch.float64)
    lo = torch.randint(0, 20, (40, 3), generator=gen).double()
    boxes = torch.cat([lo, lo + torch.randint(1, 30, (40, 3), generator=gen)], dim=1)
    bidx = torch.randint(0, 2, (40,), generator=gen)
    got = crop_and_pool(f, boxes, bidx, stride=4, crop_size=7)
    ranges = feature_crop_ranges(boxes, 4, (9, 10, 11)).tolist()
    for i, (z0, y0, x0, z1, y1, x1) in enumerate(ranges):
        region = f[int(bidx[i]) : int(bidx[i]) + 1, :, z0:z1, y0:y1, x0:x1]
        assert torch.equal(got[i : i + 1], torch.nn.functional.adaptive_max_pool3d(region, 7)), i


def test_mask_head_norm_is_instance_norm() -> None:
    from nodulenet.model.mask_head import _instance_norm

    norm = _instance_norm(6)
    ref = torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        ref.weight.copy_(norm.weight)
        ref.bias.copy_(norm.bias)
    x = torch.randn(3, 6, 4, 5, 6)
    torch.testing.assert_close(norm(x), ref(x), rtol=1e-5, atol=1e-5)
    assert set(dict(norm.named_parameters())) == set(dict(ref.named_parameters())) == {"weight", "bias"}
