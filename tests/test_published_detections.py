"""Whole detections of an imported published-format checkpoint equal the published code's (issue 20).

The reference below re-implements, from reading uci-cbcl/NoduleNet, its whole test-time path, on the
raw published-format ``state_dict`` (published key names, not our modules), in numpy/torch with the published dtypes:

* ``RpnHead.forward`` (1x1 convs, its channel-to-anchor reshape) and ``make_rpn_windows`` (index-frame anchor
  centres ``(s - 1) / 2 + s * i``, anchors fastest), ``net/nodule_net.py`` / ``net/layer/rpn_nms.py``;
* ``rpn_nms``: sigmoid > ``rpn_test_nms_pre_score_threshold`` (0.5), ``box_transform_inv`` (``net/layer/util.py``:
  float64 windows, float32 result, no clamp on the size exponent), ``clip_boxes`` (centre to ``[0, size - 1]``,
  sizes untouched), then ``torch_nms`` with overlap 0.1 - the compiled ``cpu_nms`` (``build/box/nms.cpp``, what
  ``utils/pybox.py`` loads): float32 IoU, boxes by descending score, a later box suppressed when IoU >= threshold;
  no top-n cap;
* ``CropRoi.forward`` (floor/ceil of the index-frame corners / 4, clamped to the map) + ``F.adaptive_max_pool3d``
  to 7^3 on ``out2``, and ``RcnnHead.forward``;
* ``rcnn_nms``: softmax, nodule class > ``rcnn_test_nms_pre_score_threshold`` (0.0), decode the nodule-class deltas
  on the proposals, ``clip_boxes``, ``torch_nms`` 0.1; the score is the softmax probability of class 1;
* the mask stage of ``NoduleNet.forward`` with ``use_mask``: crop boxes by ``center_box_to_coord_box``,
  ``astype(np.int32)``, ``ext2factor(4)`` and ``utils.util.clip_boxes`` (``utils/util.py``), ``MaskHead.forward``
  (crop comb2 / out1 / image, ``up2``, ``back2``, ``up3``, ``back3``, ``logits1``; ``nn.Upsample`` trilinear,
  ``InstanceNorm3d(affine)``), ``mask_nms`` (``net/layer/mask_nms.py``: masks ``sigmoid > 0.5`` in the full volume,
  a mask is dropped when its IoU with an earlier kept one is > 0.3).

For sizes that are not multiples of 16, the published eval's ``pad2factor`` (raw 0 at the far ends) comes first and
the clipping uses the padded size. The backbone is re-implemented too (``FeatureNet.forward``: ``preBlock``, ``ResBlock3d`` stages ``forw1..4``
with 2x max pooling, ``path1``/``path2`` transposed convolutions into ``back3``/``back2``, BatchNorm in eval mode).
Our side is the plain ``NoduleNet.predict`` of the model ``model_from_checkpoint_dict`` builds from the
published-format dict.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nodulenet.model import NoduleNet, NoduleNetConfig, model_from_checkpoint_dict
from nodulenet.model.box_ops import BoxMode, convert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Published config.py values the reference uses (written out, not read from our config).
ANCHORS = [5.0, 10.0, 20.0, 30.0, 50.0]
STRIDE = 4
RPN_TEST_PRE_SCORE, RPN_TEST_OVERLAP = 0.5, 0.1
RCNN_TEST_PRE_SCORE, RCNN_TEST_OVERLAP = 0.0, 0.1
MASK_TEST_OVERLAP = 0.3
BOX_REG_WEIGHT = [1.0] * 6
RCNN_CROP = 7
INPUT_SHAPE = (48, 64, 80)  # multiples of 16, as the published eval pads its inputs (pad2factor)


# ---------------------------------------------------------------------------------------------- the reference
def _bn(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                        sd[name + ".bias"], training=False, eps=1e-5)


def _res_blocks(sd: dict, stage: str, x: torch.Tensor) -> torch.Tensor:
    """The published ``ResBlock3d``s (stride 1) of ``feature_net.<stage>``, in order."""
    i = 0
    while f"feature_net.{stage}.{i}.conv1.weight" in sd:
        p = f"feature_net.{stage}.{i}"
        out = F.relu(_bn(sd, p + ".bn1", F.conv3d(x, sd[p + ".conv1.weight"], sd[p + ".conv1.bias"], padding=1)))
        out = _bn(sd, p + ".bn2", F.conv3d(out, sd[p + ".conv2.weight"], sd[p + ".conv2.bias"], padding=1))
        if p + ".shortcut.0.weight" in sd:
            x = _bn(sd, p + ".shortcut.1", F.conv3d(x, sd[p + ".shortcut.0.weight"], sd[p + ".shortcut.0.bias"]))
        x, i = F.relu(out + x), i + 1
    return x


def _up(sd: dict, path: str, x: torch.Tensor) -> torch.Tensor:
    p = f"feature_net.{path}"
    return F.relu(_bn(sd, p + ".1", F.conv_transpose3d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=2)))


def feature_net(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Published FeatureNet.forward (eval BatchNorm) -> (out1, out2, comb2)."""
    p = "feature_net.preBlock"
    out = F.relu(_bn(sd, p + ".1", F.conv3d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=2, padding=1)))
    out = F.relu(_bn(sd, p + ".4", F.conv3d(out, sd[p + ".3.weight"], sd[p + ".3.bias"], padding=1)))
    out1 = _res_blocks(sd, "forw1", out)
    out2 = _res_blocks(sd, "forw2", F.max_pool3d(out1, 2, 2))
    out3 = _res_blocks(sd, "forw3", F.max_pool3d(out2, 2, 2))
    out4 = _res_blocks(sd, "forw4", F.max_pool3d(out3, 2, 2))
    comb3 = _res_blocks(sd, "back3", torch.cat((_up(sd, "path1", out4), out3), 1))
    comb2 = _res_blocks(sd, "back2", torch.cat((_up(sd, "path2", comb3), out2), 1))
    return out1, out2, comb2


def make_rpn_windows(feature_shape: tuple[int, int, int]) -> np.ndarray:
    offset = (STRIDE - 1) / 2
    axes = [offset + STRIDE * np.arange(n, dtype=np.float64) for n in feature_shape]
    return np.array([[z, y, x, a, a, a] for z, y, x, a in itertools.product(*axes, ANCHORS)])


def rpn_head(sd: dict, comb2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Published RpnHead on image 0: logits [N], deltas [N, 6] (row = window)."""
    hidden = F.relu(F.conv3d(comb2, sd["rpn.conv.0.weight"], sd["rpn.conv.0.bias"]))
    logits = F.conv3d(hidden, sd["rpn.logits.weight"], sd["rpn.logits.bias"])
    deltas = F.conv3d(hidden, sd["rpn.deltas.weight"], sd["rpn.deltas.bias"])
    b, a = logits.shape[:2]
    logits = logits.view(b, a, -1).transpose(1, 2).reshape(b, -1)
    deltas = deltas.view(b, 6 * a, -1).transpose(1, 2).reshape(b, -1, 6)
    return logits[0].numpy(), deltas[0].numpy()


def box_transform_inv(windows: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    w = BOX_REG_WEIGHT
    out = np.zeros((len(windows), 6), dtype=np.float32)
    for k in range(3):
        out[:, k] = deltas[:, k] / w[k] * windows[:, k + 3] + windows[:, k]
        out[:, k + 3] = np.exp(deltas[:, k + 3] / w[k + 3]) * windows[:, k + 3]
    return out


def clip_centres(boxes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    for k in range(3):
        boxes[:, k] = np.clip(boxes[:, k], 0, shape[k] - 1)
    return boxes


def cpu_nms(dets: np.ndarray, threshold: float) -> np.ndarray:
    """build/box/nms.cpp on ``dets [n, 7+]`` = (score, z, y, x, d, h, w, ...), float32 -> kept rows in order."""
    order = torch.from_numpy(dets[:, 0].copy()).sort(descending=True, stable=True).indices.numpy()
    dets = dets[order].astype(np.float32)
    lo = dets[:, 1:4] - dets[:, 4:7] / np.float32(2)
    hi = lo + dets[:, 4:7]
    areas = dets[:, 4] * dets[:, 5] * dets[:, 6]
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    for i in range(len(dets)):
        if suppressed[i]:
            continue
        keep.append(i)
        j = i + 1 + np.nonzero(~suppressed[i + 1 :])[0]  # later boxes not suppressed yet
        inter = np.prod(np.maximum(np.float32(0), np.minimum(hi[i], hi[j]) - np.maximum(lo[i], lo[j])), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            overlap = inter / (areas[i] + areas[j] - inter)
        suppressed[j[overlap >= threshold]] = True
    return dets[keep]


def rpn_nms(sd: dict, comb2: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """Proposals (score, z, y, x, d, h, w) of image 0, float32, by descending score."""
    logits, deltas = rpn_head(sd, comb2)
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    index = np.where(probs > RPN_TEST_PRE_SCORE)[0]
    windows = make_rpn_windows(tuple(comb2.shape[2:]))
    box = clip_centres(box_transform_inv(windows[index], deltas[index]), shape)
    return cpu_nms(np.concatenate((probs[index, None], box), 1), RPN_TEST_OVERLAP)


def crop_roi(out2: torch.Tensor, proposals: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    crops = []
    maximum = torch.from_numpy((np.array(shape) / STRIDE).astype(np.int64))
    for p in torch.from_numpy(proposals):
        c0 = p[1:4] - p[4:7] / 2
        c1 = c0 + p[4:7]
        c0 = torch.maximum((c0 / STRIDE).floor().long(), torch.zeros(3, dtype=torch.long))
        c1 = torch.minimum((c1 / STRIDE).ceil().long(), maximum)
        crop = out2[0, :, c0[0] : c1[0], c0[1] : c1[1], c0[2] : c1[2]]
        crops.append(F.adaptive_max_pool3d(crop, RCNN_CROP))
    return torch.stack(crops)


def rcnn_head(sd: dict, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = crops.reshape(crops.shape[0], -1)
    x = F.relu(F.linear(x, sd["rcnn_head.fc1.weight"], sd["rcnn_head.fc1.bias"]))
    x = F.relu(F.linear(x, sd["rcnn_head.fc2.weight"], sd["rcnn_head.fc2.bias"]))
    return (F.linear(x, sd["rcnn_head.logit.weight"], sd["rcnn_head.logit.bias"]),
            F.linear(x, sd["rcnn_head.delta.weight"], sd["rcnn_head.delta.bias"]))


def rcnn_nms(proposals: np.ndarray, logits: torch.Tensor, deltas: torch.Tensor,
             shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Detections (score, z, y, x, d, h, w, class) float32 by descending score, and every proposal's probability."""
    probs = F.softmax(logits, dim=1).numpy()
    deltas = deltas.numpy().reshape(-1, 2, 6)
    idx = np.where(probs[:, 1] > RCNN_TEST_PRE_SCORE)[0]
    box = clip_centres(box_transform_inv(proposals[idx, 1:7], deltas[idx, 1]), shape)
    output = np.concatenate((probs[idx, 1, None], box, np.ones((len(idx), 1), dtype=np.int64)), 1)
    return cpu_nms(output.astype(np.float32), RCNN_TEST_OVERLAP), probs[:, 1]


def mask_crop_boxes(detections: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """center_box_to_coord_box -> astype(int32) -> ext2factor(4) -> utils.util.clip_boxes, as ``[n, 6]`` ints."""
    centre, side = detections[:, 1:4], detections[:, 4:7]
    boxes = np.concatenate((centre - side / 2.0, centre + side / 2.0), 1).astype(np.int32)
    boxes[:, :3] = boxes[:, :3] // 4 * 4
    boxes[:, 3:] = boxes[:, 3:] // 4 * 4 + (boxes[:, 3:] % 4 != 0).astype(np.int32) * 4
    upper = np.array(shape * 2)
    return np.clip(boxes, 0, upper)


def _conv_norm_relu(sd: dict, block: str, conv: int, x: torch.Tensor) -> torch.Tensor:
    """A published ``Sequential`` of Conv3d(3, padding 1) at index ``conv``, InstanceNorm3d(affine) after it, ReLU."""
    weight, bias = sd[f"mask_head.{block}.{conv}.weight"], sd[f"mask_head.{block}.{conv}.bias"]
    x = F.conv3d(x, weight, bias, padding=1)
    norm = f"mask_head.{block}.{conv + 1}"
    return F.relu(F.instance_norm(x, weight=sd[norm + ".weight"], bias=sd[norm + ".bias"], eps=1e-5))


def mask_head(sd: dict, image: torch.Tensor, out1: torch.Tensor, comb2: torch.Tensor,
              crop_boxes: np.ndarray) -> list[torch.Tensor]:
    """Published MaskHead.forward, one detection at a time -> crop-local logits (what crop_mask_regions returns).
    ``up2``/``up3`` are Upsample(2, trilinear), Conv3d, InstanceNorm3d, ReLU; ``back2``/``back3`` Conv3d,
    InstanceNorm3d, ReLU on the concatenation with the out1 / image crop."""
    out = []
    for z0, y0, x0, z1, y1, x1 in crop_boxes.tolist():
        f4 = comb2[:, :, z0 // 4 : z1 // 4, y0 // 4 : y1 // 4, x0 // 4 : x1 // 4]
        f2 = out1[:, :, z0 // 2 : z1 // 2, y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
        im = image[:, :, z0:z1, y0:y1, x0:x1]
        up = _conv_norm_relu(sd, "up2", 1, F.interpolate(f4, scale_factor=2, mode="trilinear", align_corners=False))
        up = _conv_norm_relu(sd, "back2", 0, torch.cat((up, f2), 1))
        up = _conv_norm_relu(sd, "up3", 1, F.interpolate(up, scale_factor=2, mode="trilinear", align_corners=False))
        up = _conv_norm_relu(sd, "back3", 0, torch.cat((up, im), 1))
        out.append(F.conv3d(up, sd["mask_head.logits1.weight"], sd["mask_head.logits1.bias"])[0, 0])
    return out


def mask_nms(logits: list[torch.Tensor], crop_boxes: np.ndarray, shape: tuple[int, int, int]) -> list[int]:
    """Published mask_nms on one image. Each mask is the set of its voxels (flat indices into the full volume) with
    ``sigmoid > 0.5`` - the same IoU as on the published full-size volumes (zero logits outside the crop give
    sigmoid 0.5, which is not > 0.5), without making hundreds of them."""
    voxels = []
    for m, (z0, y0, x0, z1, y1, x1) in zip(logits, crop_boxes.tolist()):
        zz, yy, xx = np.nonzero((torch.sigmoid(m) > 0.5).numpy())
        voxels.append(np.ravel_multi_index((zz + z0, yy + y0, xx + x0), shape))
    visited = [False] * len(voxels)
    keep = []
    for cur in range(len(voxels)):
        if visited[cur]:
            continue
        visited[cur] = True
        keep.append(cur)
        for i in range(cur + 1, len(voxels)):
            inter = len(np.intersect1d(voxels[cur], voxels[i], assume_unique=True))
            union = len(voxels[cur]) + len(voxels[i]) - inter
            if union and inter / union > MASK_TEST_OVERLAP:
                visited[i] = True
    return keep


# ---------------------------------------------------------------------------------------------- the fixture
def published_format_checkpoint() -> dict:
    """A published-shaped checkpoint ('module.' prefix, the dead mask layers) with seeded random weights.

    BatchNorm statistics are made non-trivial, and the RPN logit biases are shifted so that a few hundred small
    anchors score above 0.5 (an untrained head scores about half of all anchors there, which would put thousands of
    big boxes into every stage): thresholds stay the published ones."""
    torch.manual_seed(0)
    model = NoduleNet(NoduleNetConfig())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    # The untrained heads' outputs hardly vary (logit spread ~0.005): scaled up, so that scores are far from ties
    # and deltas move boxes by a fair part of their size. Biases put ~0.5% of the 5 and 10 mm anchors and ~0.1% of
    # the 20 mm ones above 0.5 (none of the 30 and 50 mm ones: big, slow mask crops), and shrink the 5 and 10 mm
    # boxes to 1-2 voxels: box NMS keeps such boxes side by side while their 4-voxel mask crops coincide, so mask
    # NMS has masks to suppress.
    sd["module.rpn.logits.weight"] = sd["module.rpn.logits.weight"] * 250
    sd["module.rpn.logits.bias"] = torch.tensor([-14.0, -13.3, 0.8, -5.0, -30.0])
    sd["module.rpn.deltas.weight"] = sd["module.rpn.deltas.weight"] * 5
    shrink = torch.zeros(5, 6)
    shrink[0, 3:], shrink[1, 3:] = -1.2, -1.9  # log size deltas of the 5 and 10 mm anchors (channel a * 6 + k)
    sd["module.rpn.deltas.bias"] = sd["module.rpn.deltas.bias"] + shrink.flatten()
    sd["module.rcnn_head.logit.weight"] = sd["module.rcnn_head.logit.weight"] * 100
    sd["module.rcnn_head.delta.weight"] = sd["module.rcnn_head.delta.weight"] * 5
    sd["module.mask_head.logits1.bias"] = sd["module.mask_head.logits1.bias"] + 0.3  # fuller masks: more overlap
    gen = torch.Generator().manual_seed(1)
    for name, shape in {"up1.1.weight": (64, 128, 3, 3, 3), "up1.1.bias": (64,), "up1.2.weight": (64,),
                        "up1.2.bias": (64,), "back1.0.weight": (64, 128, 3, 3, 3), "back1.0.bias": (64,),
                        "back1.1.weight": (64,), "back1.1.bias": (64,), "logits2.weight": (1, 64, 1, 1, 1),
                        "logits2.bias": (1,)}.items():
        sd["module.mask_head." + name] = torch.randn(shape, generator=gen)
    return {"epoch": 200, "out_dir": "results", "state_dict": sd, "optimizer": {}}


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def run() -> dict:
    """Our predict and the published reference on the same imported checkpoint and fixed input."""
    ckpt = published_format_checkpoint()
    loaded = model_from_checkpoint_dict(ckpt)
    assert loaded.import_report is not None and loaded.import_report.stripped_prefix == "module."
    model = loaded.model.eval()
    sd = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    x = torch.randn(1, 1, *INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    ours = model.predict(x)[0]
    ours_no_mask = model.predict(x, stages=("rpn", "rcnn"))[0]
    with torch.no_grad():
        out1, out2, comb2 = feature_net(sd, x)
        logits, _ = rpn_head(sd, comb2)
        candidates = int((torch.sigmoid(torch.from_numpy(logits)) > RPN_TEST_PRE_SCORE).sum())
        proposals = rpn_nms(sd, comb2, INPUT_SHAPE)
        rcnn_logits, rcnn_deltas = rcnn_head(sd, crop_roi(out2, proposals, INPUT_SHAPE))
        detections, proposal_probs = rcnn_nms(proposals, rcnn_logits, rcnn_deltas, INPUT_SHAPE)
        crop_boxes = mask_crop_boxes(detections, INPUT_SHAPE)
        mask_logits = mask_head(sd, x, out1, comb2, crop_boxes)
    keep = mask_nms(mask_logits, crop_boxes, INPUT_SHAPE)
    return {"model": model, "sd": sd, "config": loaded.config, "comb2": comb2, "ours": ours, "ours_no_mask": ours_no_mask, "candidates": candidates,
            "proposals": proposals, "proposal_probs": proposal_probs, "detections": detections,
            "crop_boxes": crop_boxes, "mask_logits": mask_logits, "keep": keep}


def _index_frame(boxes: torch.Tensor) -> np.ndarray:
    return convert(boxes, BoxMode.ZYXZYX, BoxMode.ZYXDHW_INDEX).numpy()


def test_the_fixed_input_exercises_every_stage(run: dict) -> None:
    """Enough of everything survives to compare and mask NMS removes some masks - otherwise the equalities below
    would prove little."""
    assert run["candidates"] > 0
    assert len(run["proposals"]) >= 20
    assert len(run["detections"]) >= 20
    sizes = run["detections"][:, 4:7]
    assert sizes.min() < 2 and sizes.max() > 10  # tiny and ordinary boxes
    assert 0 < len(run["detections"]) - len(run["keep"])  # mask NMS suppressed something
    probs = run["proposal_probs"]
    assert probs.max() - probs.min() > 0.1  # RCNN scores spread, not a near-tie


def test_proposals_equal_the_published_rpn_nms(run: dict) -> None:
    ours, ref = run["ours"], run["proposals"]
    assert ours.proposals.shape[0] == len(ref)
    np.testing.assert_allclose(_index_frame(ours.proposals), ref[:, 1:7], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.proposal_scores.numpy(), ref[:, 0], rtol=0, atol=1e-5)
    assert ours.proposal_rcnn_scores is not None
    np.testing.assert_allclose(ours.proposal_rcnn_scores.numpy(), run["proposal_probs"], rtol=0, atol=1e-5)


def test_detections_equal_the_published_rcnn_nms(run: dict) -> None:
    """Without the mask stage (the published eval: ``use_mask = False``) the detections are rcnn_nms's."""
    ours, ref = run["ours_no_mask"], run["detections"]
    assert ours.boxes.shape[0] == len(ref)
    np.testing.assert_allclose(_index_frame(ours.boxes), ref[:, 1:7], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.scores.numpy(), ref[:, 0], rtol=0, atol=1e-5)


def test_masked_detections_equal_the_published_mask_stage(run: dict) -> None:
    """With the mask stage: the same mask crops, mask probabilities and the detections mask NMS keeps, in order."""
    ours, keep = run["ours"], run["keep"]
    ref = run["detections"][keep]
    assert ours.boxes.shape[0] == len(keep)
    np.testing.assert_allclose(_index_frame(ours.boxes), ref[:, 1:7], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.scores.numpy(), ref[:, 0], rtol=0, atol=1e-5)
    assert ours.mask_boxes is not None and ours.masks is not None
    assert ours.mask_boxes.tolist() == run["crop_boxes"][keep].tolist()
    for mine, logits in zip(ours.masks, [run["mask_logits"][i] for i in keep]):
        torch.testing.assert_close(mine, torch.sigmoid(logits), rtol=0, atol=1e-5)


def test_corner_frame_mask_crops_differ_from_the_published_ones(run: dict) -> None:
    """What the test would catch if imported checkpoints drifted back to our corner-frame mask crops."""
    assert run["config"].mask_crop_frame == "published"
    boxes = convert(torch.from_numpy(run["detections"][:, 1:7].copy()), BoxMode.ZYXDHW_INDEX, BoxMode.ZYXZYX)
    assert ours_crops(boxes, "published").tolist() == run["crop_boxes"].tolist()
    differs = (ours_crops(boxes, "voxel_corner").numpy() != run["crop_boxes"]).any(axis=1)
    assert differs.mean() > 0.3


def ours_crops(boxes: torch.Tensor, frame: str) -> torch.Tensor:
    from nodulenet.model.mask_head import mask_crop_boxes as ours

    return ours(boxes, INPUT_SHAPE, 4, frame)


def test_no_proposal_caps_for_imported_checkpoints(run: dict) -> None:
    """The published rpn_nms keeps every anchor above 0.5 through NMS: an uncertain imported model (about half its
    anchors above 0.5) gets the same thousands of proposals, not our default caps (6,000 before NMS, 1,000 after)."""
    ckpt = published_format_checkpoint()
    ckpt["state_dict"]["module.rpn.logits.bias"] = torch.tensor([-11.6, -10.3, 7.2, 3.2, -22.0])
    model = model_from_checkpoint_dict(ckpt).model.eval()
    sd = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    x = torch.randn(1, 1, *INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    ours = model.predict(x, stages=("rpn",))[0]
    with torch.no_grad():  # the backbone weights are those of the module's checkpoint: the same comb2
        logits, _ = rpn_head(sd, run["comb2"])
        ref = rpn_nms(sd, run["comb2"], INPUT_SHAPE)
    default = NoduleNetConfig()
    assert int((torch.sigmoid(torch.from_numpy(logits)) > RPN_TEST_PRE_SCORE).sum()) > default.rpn_test_pre_nms_top_n
    assert len(ref) > default.rpn_test_post_nms_top_n
    assert ours.proposals.shape[0] == len(ref)
    np.testing.assert_allclose(_index_frame(ours.proposals), ref[:, 1:7], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.proposal_scores.numpy(), ref[:, 0], rtol=0, atol=1e-5)


def test_published_mask_crop_by_hand() -> None:
    """Corner-frame box (2.6, 8.0, 13.7, 16.7, 20.2, 36.9) is index-frame [2.1, 16.2] x [7.5, 19.7] x [13.2, 36.4]:
    published trunc -> (2, 7, 13) .. (16, 19, 36) -> ext2factor(4) -> (0, 4, 12) .. (16, 20, 36). The corner frame
    takes every voxel the box touches, floor/ceil (2, 8, 13) .. (17, 21, 37) -> (0, 8, 12) .. (20, 24, 40)."""
    box = torch.tensor([[2.6, 8.0, 13.7, 16.7, 20.2, 36.9]])
    assert ours_crops(box, "published").tolist() == [[0, 4, 12, 16, 20, 36]]
    assert ours_crops(box, "voxel_corner").tolist() == [[0, 8, 12, 20, 24, 40]]


def test_inputs_that_are_not_multiples_of_16(run: dict) -> None:
    """Other sizes: the published eval pads the far ends with raw 0 (pad2factor; the imported config's pad value)
    and clamps box centres to the PADDED volume, so about half of these random-weight detections sit in the
    padding - off the scan, nowhere on the patient. Ours clamps centres to the scan; every published detection
    centred on the scan is ours too (same box, same score), and none of ours leaves the scan."""
    model, sd = run["model"], run["sd"]
    assert model.config.pad_value == -1.0
    shape = (44, 60, 76)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3))
    ours = model.predict(x, stages=("rpn", "rcnn"))[0]
    padded = F.pad(x, (0, 4, 0, 4, 0, 4), value=-1.0)  # pad2factor(image, 16, pad_value=0), then (raw - 128) / 128
    with torch.no_grad():
        _, out2, comb2 = feature_net(sd, padded)
        proposals = rpn_nms(sd, comb2, INPUT_SHAPE)
        logits, deltas = rcnn_head(sd, crop_roi(out2, proposals, INPUT_SHAPE))
        ref, _ = rcnn_nms(proposals, logits, deltas, INPUT_SHAPE)
    on_scan = (ref[:, 1:4] <= np.array(shape) - 1).all(axis=1)
    assert on_scan.sum() >= 5 and (~on_scan).sum() >= 5
    mine = _index_frame(ours.boxes)
    for det in ref[on_scan]:
        match = np.abs(mine - det[1:7]).max(axis=1) < 1e-4
        assert match.sum() == 1 and abs(float(ours.scores[match][0]) - det[0]) < 1e-5
    assert ((mine[:, :3] >= 0) & (mine[:, :3] <= np.array(shape) - 1)).all()
