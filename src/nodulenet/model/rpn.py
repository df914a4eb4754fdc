"""Region proposal head: per-voxel objectness and box deltas for each anchor.

Input ``[B, C, Z, Y, X]`` (comb2, stride 4 in the published model). Outputs are flattened in ``(z, y, x, a)`` order
with the anchor index fastest - the order of ``anchors.make_anchors`` - so output row ``i`` belongs to anchor ``i``:

* logits ``[B, Z*Y*X*A]`` (one sigmoid objectness logit per anchor);
* deltas ``[B, Z*Y*X*A, 6]`` as ``(dz, dy, dx, dd, dh, dw)`` (see ``box_coder``).

Channel layout of the 1x1 convolutions is the published one (channel ``a`` for logits, ``a*6 + k`` for deltas),
so published weights decode identically.

Also here: :func:`select_proposals`, the published RPN post-processing (score threshold, decode, centre clamp,
NMS) for one image, its whole-batch, static-shape twin :func:`select_proposals_batched` (the training step), and
:func:`clamp_box_centres`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .box_coder import BoxCoder
from .box_ops import nms_3d, nms_batched_top_k


class RpnHead(nn.Module):
    """1x1 conv + ReLU, then 1x1 convs to ``A`` logits and ``6A`` deltas (published ``rpn.conv/logits/deltas``)."""

    def __init__(self, in_channels: int, num_anchors: int, hidden_channels: int = 64) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        # Index 0 inside a Sequential: the checkpoint names it rpn.conv.0.
        self.conv = nn.Sequential(nn.Conv3d(in_channels, hidden_channels, kernel_size=1), nn.ReLU())
        self.logits = nn.Conv3d(hidden_channels, num_anchors, kernel_size=1)
        self.deltas = nn.Conv3d(hidden_channels, 6 * num_anchors, kernel_size=1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.conv(features)
        logits = self.logits(hidden)  # [B, A, Z, Y, X]
        deltas = self.deltas(hidden)  # [B, 6A, Z, Y, X]
        b = logits.shape[0]
        # channels-last then flatten: (z, y, x, a) with a fastest; deltas channel a*6+k -> [..., a, k].
        logits = logits.permute(0, 2, 3, 4, 1).reshape(b, -1)
        deltas = deltas.permute(0, 2, 3, 4, 1).reshape(b, -1, 6)
        return logits, deltas


def clamp_box_centres(boxes: Tensor, shape_zyx: tuple[int, int, int]) -> Tensor:
    """Move each zyxzyx box so its centre lies inside the image, keeping its size (the published ``clip_boxes``).

    The published post-processing clamps box centres (index frame) to ``[0, size - 1]`` and leaves the sizes
    alone - a nodule cut by the scan border keeps its full diameter. In our corner frame that is the centre of
    the first / last voxel, ``[0.5, size - 0.5]``. (``box_ops.clip_boxes_3d`` clips corners instead, which
    would shrink such a box; it is the right tool for crops, not for reporting a detection.)
    """
    centre = (boxes[:, :3] + boxes[:, 3:]) / 2
    half = (boxes[:, 3:] - boxes[:, :3]) / 2
    upper = torch.tensor([s - 0.5 for s in shape_zyx], dtype=boxes.dtype, device=boxes.device)
    centre = torch.minimum(centre.clamp(min=0.5), upper)
    return torch.cat((centre - half, centre + half), dim=1)


@torch.no_grad()
def select_proposals(
    logits: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_shape_zyx: tuple[int, int, int],
    coder: BoxCoder,
    score_threshold: float,
    nms_iou: float,
    pre_nms_top_n: int | None,
    post_nms_top_n: int | None,
) -> tuple[Tensor, Tensor]:
    """Proposals of ONE image: sigmoid score > threshold -> decode -> centre clamp -> NMS -> top n.

    ``logits [N]``, ``deltas [N, 6]``, ``anchors [N, 6]``. Returns zyxzyx ``boxes [P, 6]`` and ``scores [P]``
    (float32, by decreasing score, detached - proposals are not differentiated, as published).
    """
    scores = torch.sigmoid(logits.detach().float())
    idx = torch.nonzero(scores > score_threshold).squeeze(1)
    if pre_nms_top_n is not None and idx.numel() > pre_nms_top_n:
        idx = idx[torch.topk(scores[idx], pre_nms_top_n).indices]
    if idx.numel() == 0:
        return anchors.new_zeros((0, 6), dtype=torch.float32), scores.new_zeros((0,))
    boxes = coder.decode(anchors[idx], deltas.detach()[idx].float()).float()
    boxes = clamp_box_centres(boxes, image_shape_zyx)
    keep = nms_3d(boxes, scores[idx], nms_iou)
    if post_nms_top_n is not None:
        keep = keep[:post_nms_top_n]
    return boxes[keep], scores[idx][keep]


class BatchedBoxes(NamedTuple):
    """Boxes of a whole batch with static shapes: ``boxes [B, K, 6]``, ``scores [B, K]`` and ``valid [B, K]``
    (the real entries of each image come first, by decreasing score; the rest is padding)."""

    boxes: Tensor
    scores: Tensor
    valid: Tensor

    def per_image(self) -> list[tuple[Tensor, Tensor]]:
        """``[(boxes [k_b, 6], scores [k_b])]`` per image (reads ``valid``: a host round trip on a GPU)."""
        return [(b[v], s[v]) for b, s, v in zip(self.boxes, self.scores, self.valid)]


@torch.no_grad()
def select_proposals_batched(
    logits: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_shape_zyx: tuple[int, int, int],
    coder: BoxCoder,
    score_threshold: float,
    nms_iou: float,
    pre_nms_top_n: int | None,
    post_nms_top_n: int | None,
) -> BatchedBoxes:
    """:func:`select_proposals` for every image of ``logits [B, N]`` / ``deltas [B, N, 6]`` at once, padded to
    ``post_nms_top_n`` (or ``pre_nms_top_n``, or N) slots, without a host round trip; the valid entries of image
    ``b`` are exactly ``select_proposals`` of image ``b`` (ties in score: anchor order)."""
    b, n = logits.shape
    scores = torch.sigmoid(logits.detach().float())
    keep_n = n if pre_nms_top_n is None else min(pre_nms_top_n, n)
    ranked = torch.where(scores > score_threshold, scores, torch.full_like(scores, -1.0))
    top_scores, top = torch.sort(ranked, dim=1, descending=True, stable=True)
    top_scores, top = top_scores[:, :keep_n], top[:, :keep_n]
    candidate = top_scores > score_threshold
    picked = deltas.detach().float().gather(1, top[..., None].expand(-1, -1, 6))
    boxes = coder.decode(anchors[top.flatten()], picked.reshape(-1, 6)).float()
    boxes = clamp_box_centres(boxes, image_shape_zyx).view(b, keep_n, 6)
    slots = keep_n if post_nms_top_n is None else min(post_nms_top_n, keep_n)
    index, kept = nms_batched_top_k(boxes, candidate, nms_iou, slots)
    out_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 6))
    out_scores = top_scores.gather(1, index)
    return BatchedBoxes(out_boxes * kept[..., None], torch.where(kept, out_scores, 0.0), kept)

