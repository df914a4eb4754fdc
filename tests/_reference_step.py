"""The training step as it was before it was batched (per image, per proposal), kept ONLY as a test reference.

``reference_losses(model, images, targets, stages, generator)`` computes the training losses of a
:class:`~nodulenet.model.NoduleNet` the old way: per-image proposals with the host-driven NMS, per-image anchor
matching, an RCNN sample per image, and the RCNN region pooling one slice per proposal (grouped by size, then
``adaptive_max_pool3d``-exact separable gathers). ``tests/test_train_step_equality.py`` checks that the batched
step gives the same losses and gradients.

One deliberate difference from the old code: the RCNN sample draws its random numbers from the same
:func:`~nodulenet.model.targets.draw_rcnn_keys` keys as the batched step (largest keys win; with replacement:
``floor(u * pool size)``), because a per-image ``randperm`` of a data-dependent size cannot be drawn without
reading sizes back to the host. The rules (which pools, how many, when with replacement) are the old ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nodulenet.model import NoduleNet, NoduleTargets
from nodulenet.model.box_ops import box_iou_3d
from nodulenet.model.losses import mask_loss, rcnn_loss, rpn_loss
from nodulenet.model.mask_head import mask_crop_boxes, mask_training_targets
from nodulenet.model.rcnn import RcnnHead, feature_crop_ranges, refine_detections
from nodulenet.model.targets import (LABEL_IGNORE, LABEL_NEGATIVE, LABEL_POSITIVE, RcnnSampleKeys, RcnnTargets,
                                     _keep_random, assign_rpn_targets, draw_rcnn_keys, stack_rpn_targets)


# ------------------------------------------------------------------ old RCNN pooling: one slice per proposal


def old_crop_and_pool(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: int, crop_size: int,
                      frame: str) -> Tensor:
    n = boxes.shape[0]
    if n == 0:
        return features.new_zeros((0, features.shape[1], crop_size, crop_size, crop_size))
    ranges = feature_crop_ranges(boxes, stride, tuple(features.shape[2:]), frame).tolist()
    bidx = batch_index.tolist()
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (z0, y0, x0, z1, y1, x1) in enumerate(ranges):
        groups.setdefault((z1 - z0, y1 - y0, x1 - x0), []).append(i)
    pooled: list[Tensor] = []
    order: list[int] = []
    for size, members in groups.items():
        regions = torch.cat([
            features[bidx[i] : bidx[i] + 1, :, r[0] : r[3], r[1] : r[4], r[2] : r[5]]
            for i in members
            for r in (ranges[i],)
        ])
        pooled.append(_adaptive_max_pool(regions, size, crop_size))
        order += members
    out = torch.cat(pooled)
    inverse = torch.empty(n, dtype=torch.long, device=out.device)
    inverse[torch.tensor(order, device=out.device)] = torch.arange(n, device=out.device)
    return out[inverse]


def _bin_indices(length: int, bins: int, device: torch.device) -> Tensor:
    i = torch.arange(bins, device=device)
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = -torch.div(-(i + 1) * length, bins, rounding_mode="floor")
    k = int((end - start).max())
    idx = start[:, None] + torch.arange(k, device=device)[None, :]
    return torch.minimum(idx, end[:, None] - 1)


def _adaptive_max_pool(regions: Tensor, size: tuple[int, int, int], bins: int) -> Tensor:
    out = regions
    for axis, length in zip((2, 3, 4), size):
        idx = _bin_indices(length, bins, regions.device)
        out = out.index_select(axis, idx.flatten()).unflatten(axis, tuple(idx.shape)).amax(dim=axis + 1)
    return out


# ------------------------------------------------------------------ old RPN anchor sampling (topk, host counts)


def old_sample_rpn_anchors(labels: Tensor, logits: Tensor, *, num_neg: int, num_hard: int,
                           generator: torch.Generator | None) -> Tensor:
    rows = labels
    out = rows.clone()
    positive = rows == LABEL_POSITIVE
    negative = rows == LABEL_NEGATIVE
    kept_pos = _keep_random(positive, 1, generator)
    out[positive & ~kept_pos] = LABEL_IGNORE
    positive = kept_pos
    kept_neg = _keep_random(negative, num_neg, generator)
    out[negative & ~kept_neg] = LABEL_IGNORE
    if num_hard > 0:
        scores = logits.detach().reshape(rows.shape).float()
        num_hard_total = num_hard * max(1, int(positive.sum()))
        flat_scores = torch.where(kept_neg, scores, torch.full_like(scores, -torch.inf)).flatten()
        if num_hard_total < int(kept_neg.sum()):
            hardest = torch.zeros_like(kept_neg).flatten()
            hardest[torch.topk(flat_scores, num_hard_total).indices] = True
            out[kept_neg & ~hardest.reshape(rows.shape)] = LABEL_IGNORE
    return out


# ------------------------------------------------------------------ old per-image RCNN sample (keyed draws)


def _top_by_key(pool: Tensor, keys: Tensor, count: int) -> Tensor:
    if count <= 0 or pool.numel() == 0:
        return pool[:0]
    return pool[torch.argsort(keys[pool], descending=True)[:count]]


def old_assign_rcnn_targets(proposals: Tensor, gt_boxes: Tensor, keys: RcnnSampleKeys, image: int, slots_p: int,
                            model: NoduleNet) -> RcnnTargets:
    cfg = model.config
    coder = model.box_coder
    batch_size = cfg.rcnn_batch_size
    p, g = proposals.shape[0], gt_boxes.shape[0]
    candidates = torch.cat([proposals.float(), gt_boxes.float()], dim=0) if g else proposals.float()
    # Where candidate i's keys are in the batched layout: proposal i at slot i, nodule j at slot P + j.
    slot = torch.cat([torch.arange(p), slots_p + torch.arange(g)])
    fg_keys, bg_keys, rep = keys.fg[image][slot], keys.bg[image][slot], keys.replace[image]
    all_idx = torch.arange(candidates.shape[0])
    gt_labels = torch.ones(g, dtype=torch.long)
    if g == 0:
        bg = _top_by_key(all_idx, bg_keys, min(candidates.shape[0], batch_size))
        return _result(candidates, bg[:0], bg, torch.full((candidates.shape[0],), -1), gt_boxes, gt_labels, coder)
    iou = box_iou_3d(candidates, gt_boxes)
    best_iou, best_gt = iou.max(dim=1)
    fg_pool = torch.nonzero(best_iou >= cfg.rcnn_fg_iou).squeeze(1)
    bg_pool = torch.nonzero(best_iou < cfg.rcnn_bg_iou).squeeze(1)
    max_fg = int(round(cfg.rcnn_fg_fraction * batch_size))
    fg = _top_by_key(fg_pool, fg_keys, min(max_fg, fg_pool.shape[0]))

    def draw(pool: Tensor, count: int) -> Tensor:
        if count <= pool.shape[0]:
            return _top_by_key(pool, bg_keys, count)
        return pool[torch.floor(rep[:count] * pool.shape[0]).long()]

    if fg.numel() > 0 and bg_pool.numel() == 0:
        bg = bg_pool
    elif fg.numel() == 0 and bg_pool.numel() == 0:
        bg = draw(all_idx, batch_size)
    else:
        bg = draw(bg_pool, batch_size - fg.numel())
    return _result(candidates, fg, bg, best_gt, gt_boxes, gt_labels, coder)


def _result(candidates: Tensor, fg: Tensor, bg: Tensor, best_gt: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
            coder) -> RcnnTargets:
    index = torch.cat([fg, bg])
    matched = torch.full((index.numel(),), -1, dtype=torch.long)
    labels = torch.zeros(index.numel(), dtype=torch.long)
    deltas = torch.zeros((index.numel(), 6), dtype=torch.float32)
    num_fg = fg.numel()
    if num_fg > 0:
        matched[:num_fg] = best_gt[fg]
        labels[:num_fg] = gt_labels[matched[:num_fg]]
        deltas[:num_fg] = coder.encode(candidates[fg], gt_boxes[matched[:num_fg]].float()).float()
    return RcnnTargets(candidates[index], labels, deltas, matched)


# ------------------------------------------------------------------ the old training step


def _rcnn_forward(model: NoduleNet, out2: Tensor, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    cfg = model.config
    flat = torch.cat(boxes, dim=0)
    bidx = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
    crops = old_crop_and_pool(out2, flat, bidx, cfg.stride, cfg.rcnn_crop_size, cfg.rcnn_crop_frame)
    return model.rcnn_head(crops)


def reference_losses(model: NoduleNet, images: Tensor, targets: Sequence[NoduleTargets], stages: Sequence[str],
                     generator: torch.Generator) -> dict[str, Tensor]:
    """Training losses the old way (see the module docstring); same order of random draws as the batched step."""
    from nodulenet.model.fpn import run_rpn

    cfg = model.config
    stage_set = set(stages)
    shape = tuple(int(s) for s in images.shape[2:])
    x = model._pad(images)
    features = model.feature_net(x)
    rpn_out = run_rpn(cfg, model.rpn, model.rpn_levels, features, model._anchor_cache)
    proposals = model._proposals(rpn_out, shape, True) if stage_set & {"rcnn", "mask"} else []
    gt = [t.gt_boxes.float() for t in targets]
    per_image = [assign_rpn_targets(rpn_out.anchors, g, pos_iou=cfg.rpn_pos_iou, neg_iou=cfg.rpn_neg_iou,
                                    box_coder=model.box_coder) for g in gt]
    stacked = stack_rpn_targets(per_image)
    labels = old_sample_rpn_anchors(stacked.labels, rpn_out.logits, num_neg=cfg.rpn_num_neg,
                                    num_hard=0 if cfg.focal_loss else cfg.rpn_num_hard, generator=generator)
    losses: dict[str, Tensor] = {}
    losses["rpn_cls"], losses["rpn_reg"] = rpn_loss(rpn_out.logits, rpn_out.deltas,
                                                    stacked._replace(labels=labels), focal=cfg.focal_loss)
    slots_p = cfg.rpn_train_post_nms_top_n or cfg.rpn_train_pre_nms_top_n or rpn_out.anchors.shape[0]
    if "rcnn" in stage_set:
        g_max = max([1, *(len(g) for g in gt)])
        keys = draw_rcnn_keys(len(gt), slots_p + g_max, cfg.rcnn_batch_size, generator, images.device)
        sampled = [old_assign_rcnn_targets(p, g, keys, i, slots_p, model)
                   for i, ((p, _), g) in enumerate(zip(proposals, gt))]
        logits, deltas = _rcnn_forward(model, features.out2, [s.proposals for s in sampled])
        merged = RcnnTargets(*(torch.cat([getattr(s, f) for s in sampled], dim=0) for f in RcnnTargets._fields))
        losses["rcnn_cls"], losses["rcnn_reg"] = rcnn_loss(logits, deltas, merged, focal=cfg.focal_loss)
    if "mask" in stage_set:
        with torch.no_grad():
            logits, deltas = _rcnn_forward(model, features.out2, [b for b, _ in proposals])
            probs, fg_deltas = RcnnHead.foreground(logits, deltas)
        boxes, start = [], 0
        for b, _ in proposals:
            n = b.shape[0]
            det, _ = refine_detections(b, probs[start : start + n], fg_deltas[start : start + n], shape,
                                       model.box_coder, cfg.rcnn_train_score_threshold, cfg.rcnn_train_nms_iou)
            start += n
            boxes.append(det)
        losses["mask"] = old_mask_loss(model, x, features, boxes, targets)
    losses["total"] = model._total(losses)
    return losses


def old_mask_loss(model: NoduleNet, x: Tensor, features, det_boxes: list[Tensor],
                  targets: Sequence[NoduleTargets]) -> Tensor:
    """The old mask loss: targets pasted crop by crop, the mask head on a list of crops, Dice crop by crop."""
    cfg = model.config
    shape = tuple(int(s) for s in x.shape[2:])
    crops_per_image: list[Tensor] = []
    all_targets: list[Tensor] = []
    for boxes, t in zip(det_boxes, targets):
        gt_boxes = t.gt_boxes.float()
        if cfg.mask_train_on_gt_boxes:
            boxes = torch.cat((boxes, gt_boxes), dim=0)
        crops = mask_crop_boxes(boxes, shape, cfg.mask_box_multiple, cfg.mask_crop_frame)
        matched, mask_targets = mask_training_targets(boxes, crops, gt_boxes, t.gt_masks, t.gt_mask_origins,
                                                      cfg.mask_match_iou)
        crops_per_image.append(crops[matched])
        all_targets += mask_targets
    logits = model._run_mask_head(x, features, crops_per_image)
    if not logits:
        return sum((p.sum() * 0.0 for p in model.mask_head.parameters()), torch.zeros(()))
    return mask_loss(logits, all_targets)

