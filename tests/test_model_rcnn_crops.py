"""RCNN crops of imported published weights are the published code's crops (issue 20).

The published ``CropRoi`` works on proposals as index-frame centre + size ``(z, y, x, d, h, w)`` (centre of voxel
``i`` at ``i``): ``c0 = centre - size / 2``, ``c1 = c0 + size``, ``floor(c0 / stride)``, ``ceil(c1 / stride)``,
clamped to ``[0, input_size / stride]``, then ``F.adaptive_max_pool3d`` of that crop. Re-implemented here as the
reference; our boxes are corner-frame ``(z0, y0, x0, z1, y1, x1)`` (index frame + 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nodulenet.model import NoduleNet, NoduleNetConfig, tiny_config
from nodulenet.model.box_ops import BoxMode, convert
from nodulenet.model.rcnn import crop_and_pool, feature_crop_ranges


def published_ranges(index_boxes: torch.Tensor, stride: int, input_shape: tuple[int, int, int]) -> list[list[int]]:
    """The published CropRoi.forward range formula, box by box, in float32 like its CUDA tensors."""
    out = []
    maximum = (np.array(input_shape) / stride).astype(np.int64)  # torch.LongTensor(np.array(...) / scale)
    for p in index_boxes.float():
        center, side = p[:3], p[3:]
        c0 = center - side / 2
        c1 = c0 + side
        c0 = (c0 / stride).floor().long()
        c1 = (c1 / stride).ceil().long()
        c0 = torch.maximum(c0, torch.zeros(3, dtype=torch.long))
        c1 = torch.minimum(c1, torch.from_numpy(maximum))
        out.append([*c0.tolist(), *c1.tolist()])
    return out


def _random_index_boxes(n: int, seed: int, extent: float = 128.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 3, generator=gen) * extent
    size = 2 + torch.rand(n, 3, generator=gen) * 40
    return torch.cat([centre, size], dim=1)


def test_our_crop_ranges_equal_the_published_formula_on_random_boxes() -> None:
    index_boxes = _random_index_boxes(2000, seed=0)
    ours = feature_crop_ranges(convert(index_boxes, BoxMode.ZYXDHW_INDEX, BoxMode.ZYXZYX), 4, (32, 32, 32))
    reference = published_ranges(index_boxes, 4, (128, 128, 128))
    # Boxes the published code would crop to nothing (fully outside) are kept one voxel wide by us; skip those.
    usable = [i for i, r in enumerate(reference) if all(r[k + 3] > r[k] for k in range(3))]
    assert len(usable) > 1800
    assert ours[usable].tolist() == [reference[i] for i in usable]
    # The corner-frame ranges (how models before rcnn_crop_frame were trained) differ for many proposals:
    # what the test would catch if the default drifted back.
    corner = feature_crop_ranges(convert(index_boxes, BoxMode.ZYXDHW_INDEX, BoxMode.ZYXZYX), 4, (32, 32, 32),
                                 frame="voxel_corner")
    differs = sum(corner[i].tolist() != reference[i] for i in usable)
    assert differs > 0.2 * len(usable)


def test_published_config_pools_the_published_crops() -> None:
    """RCNN input of a published-format model equals the published CropRoi on the same proposals."""
    torch.manual_seed(0)
    features = torch.relu(torch.randn(2, 8, 24, 20, 28))
    index_boxes = _random_index_boxes(60, seed=1, extent=90.0)
    batch = torch.randint(0, 2, (60,), generator=torch.Generator().manual_seed(2))
    ranges = published_ranges(index_boxes, 4, (96, 80, 112))
    keep = [i for i, r in enumerate(ranges) if all(r[k + 3] > r[k] for k in range(3))]
    boxes = convert(index_boxes, BoxMode.ZYXDHW_INDEX, BoxMode.ZYXZYX)[keep]
    ours = crop_and_pool(features, boxes, batch[keep], 4, 7)  # the default frame is the published one
    reference = torch.stack([
        F.adaptive_max_pool3d(features[int(batch[i]), :, r[0] : r[3], r[1] : r[4], r[2] : r[5]], 7)
        for i in keep for r in (ranges[i],)
    ])
    assert torch.equal(ours, reference)


def test_published_model_rcnn_scores_equal_the_published_rcnn_on_its_proposals() -> None:
    """Detections of an imported published-format checkpoint: the RCNN scores and deltas our network gives its
    own proposals equal the published pipeline's (published crops + the same head) on a fixed input."""
    torch.manual_seed(0)
    config = tiny_config()
    assert config.rcnn_crop_frame == NoduleNetConfig().rcnn_crop_frame == "published"
    model = NoduleNet(config).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    det = model.predict(x, stages=("rpn", "rcnn"))[0]
    assert det.proposals.shape[0] > 10
    with torch.no_grad():
        out2 = model.feature_net(x).out2
        index_boxes = convert(det.proposals, BoxMode.ZYXZYX, BoxMode.ZYXDHW_INDEX)
        crops = torch.stack([F.adaptive_max_pool3d(out2[0, :, r[0] : r[3], r[1] : r[4], r[2] : r[5]], 7)
                             for r in published_ranges(index_boxes, 4, (64, 64, 64))])
        logits, _ = model.rcnn_head(crops)
        published_probs = torch.softmax(logits, dim=1)[:, 1]
    assert det.proposal_rcnn_scores is not None
    assert torch.allclose(det.proposal_rcnn_scores, published_probs, atol=1e-6, rtol=0)
