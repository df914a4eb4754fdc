"""NoduleNet assembly: backbone -> RPN -> decoupled RCNN -> mask head, with training losses and post-processing.

Conventions
-----------
* ``images``: ``[B, 1, Z, Y, X]`` float, 1 mm isotropic, normalised like the published preprocessing
  (raw 0..255 -> ``(raw - 128) / 128``). Any size works: the network pads the high end of each axis to a multiple
  of 16 with ``config.pad_value`` (the published pad intensity) and reports everything in the UNPADDED frame.
* Boxes: ``(z0, y0, x0, z1, y1, x1)`` float voxels of the input, end exclusive (``box_ops``).
* Ground truth per image (:class:`NoduleTargets`): ``gt_boxes [G, 6]`` and, for the mask stage, each nodule's
  mask as a tight crop ``gt_masks[k]`` (bool/uint8 ``[d, h, w]``) placed at ``gt_mask_origins[k]`` (zyx voxel of
  its first element). Chosen over an instance-label volume because it is memory-light: a few KB per nodule instead
  of a full-size volume per image (21 MB for a 208x320x320 scan), and it says which mask belongs to which box.

Modes (``forward(images, targets, mode, stages)``)
--------------------------------------------------
* ``"train"``  -> ``dict`` of losses: ``rpn_cls, rpn_reg`` (+ ``rcnn_cls, rcnn_reg`` with stage ``"rcnn"``,
  + ``mask`` with stage ``"mask"``) and ``total`` (weighted by ``config.loss_weight_*``). ``stages`` gives the
  published staged schedule: ``("rpn",)``, then ``("rpn", "rcnn")``, then all three.
* ``"eval"``   -> :class:`EvalOutput` (the same losses + :class:`Detections` made with the test thresholds).
* ``"predict"`` (no ground truth) -> ``list[Detections]``, run without autograd.
``mode`` picks the thresholds and outputs only; BatchNorm follows ``module.train()/eval()`` as usual.

Post-processing (published): RPN sigmoid > 0.5 -> decode -> centre clamp -> NMS 0.1 -> proposals; RCNN softmax
on proposals cropped from the encoder map -> decode -> NMS 0.1 -> detections; mask head on the detections, mask
IoU NMS 0.3 (eval/predict). Masks stay crop-local (``Detections.masks[i]`` covers ``Detections.mask_boxes[i]``).
Not published: RPN pre/post-NMS top-n caps and ``mask_max_detections`` (config), which bound the cost.

Mask-stage training (deviation, see ``config.mask_train_on_gt_boxes``): the mask head learns on the train-mode
detections AND the ground-truth boxes - as the RCNN stage appends ground truth to its proposals - so it gets a
signal from the first mask step; each box learns the mask of the nodule it overlaps best (box IoU >=
``config.mask_match_iou``; the published code takes label 1 of the whole instance volume inside the crop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import BackboneFeatures, FeatureNet
from .box_coder import BoxCoder
from .config import NoduleNetConfig
from .fpn import AnchorCache, RpnOutput, build_rpn_heads, run_rpn
from .losses import mask_loss, rcnn_loss, rpn_loss
from .mask_head import MaskHead, mask_crop_boxes, mask_nms, mask_training_targets
from .rcnn import RcnnHead, crop_and_pool, refine_detections
from .rpn import select_proposals
from .targets import RcnnTargets, assign_rcnn_targets, assign_rpn_targets, sample_rpn_anchors, stack_rpn_targets

MODES = ("train", "eval", "predict")
STAGES = ("rpn", "rcnn", "mask")


@dataclass
class NoduleTargets:
    """Ground truth of one image (see the module docstring)."""

    gt_boxes: Tensor
    gt_masks: list[Tensor] | None = None
    gt_mask_origins: Tensor | None = None


@dataclass
class Detections:
    """Output for one image, in voxels of the unpadded input, by decreasing ``scores``.

    ``scores`` is the RCNN nodule probability (the RPN probability when the ``"rcnn"`` stage is off).
    ``masks[i]`` is detection ``i``'s probability volume covering the integer box ``mask_boxes[i]`` (both absent
    without the ``"mask"`` stage); with ``config.mask_max_detections`` only the first (best) detections have one,
    so ``len(masks) <= len(boxes)``. ``proposals``/``proposal_scores`` are the RPN output, and
    ``proposal_rcnn_scores`` the RCNN probability of each proposal, so the published "rpn" and "ensemble" (mean
    of the two) FROC variants can be computed.
    """

    boxes: Tensor
    scores: Tensor
    proposals: Tensor
    proposal_scores: Tensor
    proposal_rcnn_scores: Tensor | None = None
    masks: list[Tensor] | None = None
    mask_boxes: Tensor | None = None

    def cpu(self) -> Detections:
        return Detections(
            boxes=self.boxes.cpu(),
            scores=self.scores.cpu(),
            proposals=self.proposals.cpu(),
            proposal_scores=self.proposal_scores.cpu(),
            proposal_rcnn_scores=None if self.proposal_rcnn_scores is None else self.proposal_rcnn_scores.cpu(),
            masks=None if self.masks is None else [m.cpu() for m in self.masks],
            mask_boxes=None if self.mask_boxes is None else self.mask_boxes.cpu(),
        )


@dataclass
class EvalOutput:
    losses: dict[str, Tensor]
    detections: list[Detections] = field(default_factory=list)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX).

    Without it, bf16 autocast on CPU still works but conv3d falls back to a reference kernel that is 10-100x
    SLOWER than fp32 (measured on the AVX2-only build machine: backbone on 32^3, 0.6 s fp32 vs 7.6 s bf16), so
    callers should only default to bf16 on CPU when this is True.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op; absent in some builds
        return False


class NoduleNet(nn.Module):
    """The NoduleNet network; ``state_dict`` names/shapes match the published checkpoint in the default config."""

    def __init__(self, config: NoduleNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NoduleNetConfig()
        cfg = self.config
        c_pre, c1, c2, c3, c4, c_back3, c_back2 = cfg.backbone_channels
        self.feature_net = FeatureNet(cfg)
        self.rpn, self.rpn_levels = build_rpn_heads(cfg)
        rcnn_in = c2 if cfg.rcnn_feature_map == "out2" else c_back2
        self.rcnn_head = RcnnHead(rcnn_in, cfg.rcnn_crop_size, cfg.rcnn_fc_channels, cfg.num_classes)
        self.mask_head = MaskHead(c_back2, c1, cfg.in_channels, cfg.mask_channels)
        self.box_coder = BoxCoder(cfg.box_reg_weights)
        self._anchor_cache = AnchorCache()

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        images: Tensor,
        targets: Sequence[NoduleTargets] | None = None,
        mode: str = "train",
        stages: Sequence[str] = STAGES,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor] | EvalOutput | list[Detections]:
        stage_set = self._check_call(images, targets, mode, stages)
        if mode == "predict":
            with torch.no_grad():
                return self._run(images, None, mode, stage_set, generator)[1]
        losses, detections = self._run(images, targets, mode, stage_set, generator)
        if mode == "train":
            return losses
        return EvalOutput(losses=losses, detections=detections)

    def losses(
        self,
        images: Tensor,
        targets: Sequence[NoduleTargets],
        stages: Sequence[str] = STAGES,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Typed shortcut for ``forward(..., mode="train")``."""
        out = self.forward(images, targets, mode="train", stages=stages, generator=generator)
        assert isinstance(out, dict)
        return out

    def predict(
        self,
        images: Tensor,
        stages: Sequence[str] = STAGES,
        *,
        mask_min_score: float | None = None,
        keep_centres_within: tuple[Sequence[float], Sequence[float]] | None = None,
        backbone: Callable[[Tensor], BackboneFeatures] | None = None,
    ) -> list[Detections]:
        """``forward(images, mode="predict")``, with two savings for whole-scan inference and a backbone choice.

        ``mask_min_score``: masks only for the detections scoring at least this (a prefix: detections are sorted
        by score; combined with ``config.mask_max_detections``, the shorter prefix wins); mask NMS runs among
        them and the unmasked rest is kept. That set is what masking every detection would give for them: greedy
        mask NMS in score order only lets a higher-scoring - hence also masked - mask suppress a masked one.
        The published code runs the mask head on every detection (hundreds on an uncertain model).

        ``keep_centres_within``: ``(lo, hi)`` zyx voxels of the input; only detections whose box centre lies in
        ``[lo, hi)`` are kept, BEFORE masks are made (a tile of a scan keeps what its core owns). ``proposals``
        stay unfiltered.

        ``backbone``: runs instead of ``self.feature_net`` on the padded input (the same weights in another
        runtime, or in bf16); it must return float32 :class:`BackboneFeatures`. The heads run here as usual.
        """
        stage_set = self._check_call(images, None, "predict", stages)
        with torch.no_grad():
            return self._run(images, None, "predict", stage_set, None, mask_min_score=mask_min_score,
                             keep_centres_within=keep_centres_within, backbone=backbone)[1]

    # ------------------------------------------------------------------ internals
    def _check_call(
        self, images: Tensor, targets: Sequence[NoduleTargets] | None, mode: str, stages: Sequence[str]
    ) -> set[str]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        stage_set = set(stages)
        if not stage_set <= set(STAGES) or "rpn" not in stage_set:
            raise ValueError(f"stages must include 'rpn' and be drawn from {STAGES}, got {tuple(stages)}")
        if images.dim() != 5 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B, {self.config.in_channels}, Z, Y, X], got {tuple(images.shape)}")
        if mode == "predict":
            if targets is not None:
                raise ValueError("predict mode takes no targets (use mode='eval' for losses and detections)")
        else:
            if targets is None or len(targets) != images.shape[0]:
                raise ValueError(f"mode {mode!r} needs one NoduleTargets per image ({images.shape[0]})")
            if "mask" in stage_set and any(t.gt_masks is None or t.gt_mask_origins is None for t in targets):
                raise ValueError("the 'mask' stage needs gt_masks and gt_mask_origins for every image")
        return stage_set

    def _pad(self, images: Tensor) -> Tensor:
        m = self.config.max_stride
        pads: list[int] = []
        for size in reversed(images.shape[2:]):  # F.pad lists the last axis first
            pads += [0, (-size) % m]
        if not any(pads):
            return images
        return F.pad(images, pads, mode="constant", value=self.config.pad_value)

    def _run(
        self,
        images: Tensor,
        targets: Sequence[NoduleTargets] | None,
        mode: str,
        stages: set[str],
        generator: torch.Generator | None,
        mask_min_score: float | None = None,
        keep_centres_within: tuple[Sequence[float], Sequence[float]] | None = None,
        backbone: Callable[[Tensor], BackboneFeatures] | None = None,
    ) -> tuple[dict[str, Tensor], list[Detections]]:
        cfg = self.config
        orig_shape = tuple(int(s) for s in images.shape[2:])
        x = self._pad(images)
        features = (backbone or self.feature_net)(x)
        rpn_out = run_rpn(cfg, self.rpn, self.rpn_levels, features, self._anchor_cache)
        training = mode == "train"

        proposals: list[tuple[Tensor, Tensor]] = []
        if not training or stages & {"rcnn", "mask"}:
            # Centres are clamped to the UNPADDED image: the padding is not part of the scan.
            proposals = self._proposals(rpn_out, orig_shape, training)

        losses: dict[str, Tensor] = {}
        if targets is not None:
            gt = [t.gt_boxes.to(device=x.device, dtype=torch.float32) for t in targets]
            losses["rpn_cls"], losses["rpn_reg"] = self._rpn_losses(rpn_out, gt, generator)
            if "rcnn" in stages:
                losses["rcnn_cls"], losses["rcnn_reg"] = self._rcnn_losses(features, proposals, gt, generator)

        detections: list[Detections] = []
        if training:
            if "mask" in stages:
                assert targets is not None
                boxes = [b for b, _ in self._detect(features, proposals, orig_shape, training, stages)[0]]
                losses["mask"] = self._mask_loss(x, features, boxes, targets)
        else:
            dets, rcnn_probs = self._detect(features, proposals, orig_shape, training, stages)
            if keep_centres_within is not None:
                dets = [_centres_within(b, s, keep_centres_within) for b, s in dets]
            if targets is not None and "mask" in stages:
                losses["mask"] = self._mask_loss(x, features, [b for b, _ in dets], targets)
            detections = self._finish(x, features, dets, proposals, rcnn_probs, orig_shape, stages, mask_min_score)
        if losses:
            losses["total"] = self._total(losses)
        return losses, detections

    def _proposals(
        self, rpn_out: RpnOutput, shape: tuple[int, int, int], training: bool
    ) -> list[tuple[Tensor, Tensor]]:
        cfg = self.config
        if training:
            thr, iou, pre, post = (cfg.rpn_train_score_threshold, cfg.rpn_train_nms_iou,
                                   cfg.rpn_train_pre_nms_top_n, cfg.rpn_train_post_nms_top_n)
        else:
            thr, iou, pre, post = (cfg.rpn_test_score_threshold, cfg.rpn_test_nms_iou,
                                   cfg.rpn_test_pre_nms_top_n, cfg.rpn_test_post_nms_top_n)
        return [
            select_proposals(rpn_out.logits[b], rpn_out.deltas[b], rpn_out.anchors, shape, self.box_coder,
                             thr, iou, pre, post)
            for b in range(rpn_out.logits.shape[0])
        ]

    def _rpn_losses(
        self, rpn_out: RpnOutput, gt: list[Tensor], generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        per_image = [
            assign_rpn_targets(rpn_out.anchors, g, pos_iou=cfg.rpn_pos_iou, neg_iou=cfg.rpn_neg_iou,
                               box_coder=self.box_coder)
            for g in gt
        ]
        stacked = stack_rpn_targets(per_image)
        # With focal loss the loss itself down-weights easy negatives, so hard-negative mining is switched off.
        labels = sample_rpn_anchors(
            stacked.labels,
            rpn_out.logits,
            num_neg=cfg.rpn_num_neg,
            num_hard=0 if cfg.focal_loss else cfg.rpn_num_hard,
            generator=generator,
        )
        return rpn_loss(rpn_out.logits, rpn_out.deltas, stacked._replace(labels=labels), focal=cfg.focal_loss)

    def _rcnn_forward(self, features: BackboneFeatures, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RCNN head on the boxes of every image at once -> (class logits [N, C], deltas [N, 6C])."""
        if not boxes:
            boxes = [features.out2.new_zeros((0, 6))]
        flat = torch.cat(boxes, dim=0)
        bidx = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
        crops = crop_and_pool(getattr(features, self.config.rcnn_feature_map), flat, bidx, self.config.stride,
                              self.config.rcnn_crop_size)
        return self.rcnn_head(crops)

    def _rcnn_losses(
        self,
        features: BackboneFeatures,
        proposals: list[tuple[Tensor, Tensor]],
        gt: list[Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        sampled = [
            assign_rcnn_targets(p, g, fg_iou=cfg.rcnn_fg_iou, bg_iou=cfg.rcnn_bg_iou, batch_size=cfg.rcnn_batch_size,
                                fg_fraction=cfg.rcnn_fg_fraction, generator=generator, box_coder=self.box_coder)
            for (p, _), g in zip(proposals, gt)
        ]
        logits, deltas = self._rcnn_forward(features, [s.proposals for s in sampled])
        merged = RcnnTargets(*(torch.cat([getattr(s, f) for s in sampled], dim=0) for f in RcnnTargets._fields))
        return rcnn_loss(logits, deltas, merged, focal=cfg.focal_loss)

    def _detect(
        self,
        features: BackboneFeatures,
        proposals: list[tuple[Tensor, Tensor]],
        shape: tuple[int, int, int],
        training: bool,
        stages: set[str],
    ) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor] | None]:
        """Per image (boxes, scores) after the RCNN (or the proposals themselves without it), + RCNN probs."""
        if "rcnn" not in stages:
            return [(b, s) for b, s in proposals], None
        cfg = self.config
        thr = cfg.rcnn_train_score_threshold if training else cfg.rcnn_test_score_threshold
        iou = cfg.rcnn_train_nms_iou if training else cfg.rcnn_test_nms_iou
        with torch.no_grad():
            logits, deltas = self._rcnn_forward(features, [b for b, _ in proposals])
            probs, fg_deltas = RcnnHead.foreground(logits, deltas)
        out, per_image_probs, start = [], [], 0
        for boxes, _ in proposals:
            n = boxes.shape[0]
            p, d = probs[start : start + n], fg_deltas[start : start + n]
            start += n
            per_image_probs.append(p)
            out.append(refine_detections(boxes, p, d, shape, self.box_coder, thr, iou))
        return out, per_image_probs

    def _run_mask_head(self, x: Tensor, features: BackboneFeatures, crop_boxes: list[Tensor]) -> list[Tensor]:
        if not crop_boxes or sum(len(c) for c in crop_boxes) == 0:
            return []
        flat = torch.cat(crop_boxes, dim=0)
        bidx = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(crop_boxes)])
        return self.mask_head(x, features.out1, features.comb2, flat, bidx)

    def _mask_loss(
        self, x: Tensor, features: BackboneFeatures, det_boxes: list[Tensor], targets: Sequence[NoduleTargets]
    ) -> Tensor:
        cfg = self.config
        shape = tuple(int(s) for s in x.shape[2:])
        crops_per_image: list[Tensor] = []
        all_targets: list[Tensor] = []
        for boxes, t in zip(det_boxes, targets):
            gt_boxes = t.gt_boxes.to(device=x.device, dtype=torch.float32)
            if cfg.mask_train_on_gt_boxes:
                boxes = torch.cat((boxes, gt_boxes), dim=0)
            crops = mask_crop_boxes(boxes, shape, cfg.mask_box_multiple)
            assert t.gt_masks is not None and t.gt_mask_origins is not None
            matched, mask_targets = mask_training_targets(
                boxes, crops, gt_boxes, t.gt_masks, t.gt_mask_origins.to(x.device), cfg.mask_match_iou
            )
            crops_per_image.append(crops[matched])
            all_targets += mask_targets
        logits = self._run_mask_head(x, features, crops_per_image)
        if not logits:
            # No nodule in reach: a zero that still touches the mask head keeps DDP's unused-parameter check quiet.
            return sum((p.sum() * 0.0 for p in self.mask_head.parameters()), torch.zeros((), device=x.device))
        return mask_loss(logits, all_targets)

    def _finish(
        self,
        x: Tensor,
        features: BackboneFeatures,
        dets: list[tuple[Tensor, Tensor]],
        proposals: list[tuple[Tensor, Tensor]],
        rcnn_probs: list[Tensor] | None,
        orig_shape: tuple[int, int, int],
        stages: set[str],
        mask_min_score: float | None = None,
    ) -> list[Detections]:
        """Masks (+ mask NMS) on the final detections, in the unpadded frame (see :meth:`predict`)."""
        cfg = self.config
        shape = tuple(int(s) for s in x.shape[2:])
        masks_per_image: list[list[Tensor] | None] = [None] * len(dets)
        crops_per_image: list[Tensor | None] = [None] * len(dets)
        if "mask" in stages:
            # Masks for the best ``mask_max_detections`` of each image (a prefix: detections are sorted by score).
            limit = cfg.mask_max_detections
            counts = []
            for boxes, scores in dets:
                n = boxes.shape[0] if limit is None else min(limit, boxes.shape[0])
                if mask_min_score is not None:
                    n = min(n, int((scores >= mask_min_score).sum()))
                counts.append(n)
            crops = [mask_crop_boxes(b[:n], shape, cfg.mask_box_multiple) for (b, _), n in zip(dets, counts)]
            with torch.no_grad():
                probs = [torch.sigmoid(m.float()) for m in self._run_mask_head(x, features, crops)]
            start = 0
            for i, (boxes, scores) in enumerate(dets):
                n = counts[i]
                # Clipped first: the internal padding is not part of the scan, so it takes no part in the mask IoU.
                mine, clipped = _clip_masks(probs[start : start + n], crops[i], orig_shape)
                start += n
                if cfg.mask_test_nms_iou is not None and n > 1:
                    keep = mask_nms(mine, clipped, cfg.mask_test_nms_iou).to(boxes.device)
                    rest = torch.arange(n, boxes.shape[0], device=boxes.device)  # unmasked tail stays
                    dets[i] = (boxes[torch.cat((keep, rest))], scores[torch.cat((keep, rest))])
                    mine, clipped = [mine[k] for k in keep.tolist()], clipped[keep]
                masks_per_image[i], crops_per_image[i] = mine, clipped
        out = []
        for i, ((boxes, scores), (pboxes, pscores)) in enumerate(zip(dets, proposals)):
            out.append(Detections(
                boxes=boxes,
                scores=scores,
                proposals=pboxes,
                proposal_scores=pscores,
                proposal_rcnn_scores=None if rcnn_probs is None else rcnn_probs[i],
                masks=masks_per_image[i],
                mask_boxes=crops_per_image[i],
            ))
        return out

    def _total(self, losses: dict[str, Tensor]) -> Tensor:
        cfg = self.config
        weights = {"rpn_cls": cfg.loss_weight_rpn_cls, "rpn_reg": cfg.loss_weight_rpn_reg,
                   "rcnn_cls": cfg.loss_weight_rcnn_cls, "rcnn_reg": cfg.loss_weight_rcnn_reg,
                   "mask": cfg.loss_weight_mask}
        device = next(iter(losses.values())).device
        return sum((weights[k] * v for k, v in losses.items()), torch.zeros((), device=device))


def _centres_within(
    boxes: Tensor, scores: Tensor, region: tuple[Sequence[float], Sequence[float]]
) -> tuple[Tensor, Tensor]:
    """The detections whose box centre lies in ``[lo, hi)`` (zyx voxels)."""
    lo = torch.as_tensor(region[0], dtype=boxes.dtype, device=boxes.device)
    hi = torch.as_tensor(region[1], dtype=boxes.dtype, device=boxes.device)
    centre = (boxes[:, :3] + boxes[:, 3:]) / 2
    inside = ((centre >= lo) & (centre < hi)).all(dim=1)
    return boxes[inside], scores[inside]


def _clip_masks(masks: list[Tensor], crops: Tensor, shape: tuple[int, int, int]) -> tuple[list[Tensor], Tensor]:
    """Cut the part of each crop that lies in the internal padding (crops start inside the image, because
    detection centres are clamped to the unpadded image and crops start at or before the box start)."""
    upper = torch.tensor(shape * 2, dtype=crops.dtype, device=crops.device)
    clipped = torch.minimum(crops, upper)
    out = []
    for m, (z0, y0, x0, z1, y1, x1) in zip(masks, clipped.tolist()):
        out.append(m[: z1 - z0, : y1 - y0, : x1 - x0])
    return out, clipped
