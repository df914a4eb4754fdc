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
Not published: RPN pre/post-NMS top-n caps and ``mask_max_detections`` (config), which bound the cost; imported
published checkpoints run without them and with the published mask crops (``checkpoint.imported_published_config``).

Mask-stage training (deviation, see ``config.mask_train_on_gt_boxes``): the mask head learns on the train-mode
detections AND the ground-truth boxes - as the RCNN stage appends ground truth to its proposals - so it gets a
signal from the first mask step; each box learns the mask of the nodule it overlaps best (box IoU >=
``config.mask_match_iou``; the published code takes label 1 of the whole instance volume inside the crop).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import BackboneFeatures, FeatureNet
from .box_coder import BoxCoder
from .config import NoduleNetConfig
from .fpn import AnchorCache, RpnOutput, build_rpn_heads, run_rpn
from .losses import rcnn_loss, rpn_loss
from .mask_head import MaskHead, batched_mask_loss, mask_crop_boxes, mask_nms, pad_nodule_masks
from .box_ops import box_iou_batched, nms_batched_top_k
from .rcnn import RcnnHead, crop_and_pool, feature_crop_ranges, refine_detections
from .rpn import BatchedBoxes, clamp_box_centres, select_proposals, select_proposals_batched
from .targets import (RcnnTargets, assign_rpn_targets_batched, draw_rcnn_keys, pad_gt_boxes, sample_rcnn_batched,
                      sample_rpn_anchors)

MODES = ("train", "eval", "predict")
STAGES = ("rpn", "rcnn", "mask")


@dataclass
class NoduleTargets:
    """Ground truth of one image (see the module docstring). ``ignore_boxes [K, 6]``: findings that are neither
    nodule nor background (excluded findings, see :mod:`nodulenet.model.targets`); ``None`` or empty: none."""

    gt_boxes: Tensor
    gt_masks: list[Tensor] | None = None
    gt_mask_origins: Tensor | None = None
    ignore_boxes: Tensor | None = None


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
        """Training losses come from whole-batch, static-shape code (:meth:`_batch_losses`: no per-image or
        per-box Python loop and no host round trip before the mask stage); detections for eval/predict from
        the per-image post-processing, which needs the host to size its outputs anyway."""
        orig_shape = tuple(int(s) for s in images.shape[2:])
        x = self._pad(images)
        features = (backbone or self.feature_net)(x)
        rpn_out = run_rpn(self.config, self.rpn, self.rpn_levels, features, self._anchor_cache)
        training = mode == "train"

        losses: dict[str, Tensor] = {}
        detections: list[Detections] = []
        if training:
            assert targets is not None
            # Centres are clamped to the UNPADDED image: the padding is not part of the scan.
            batched = self._proposals_batched(rpn_out, orig_shape, training) if stages & {"rcnn", "mask"} else None
            losses.update(self._batch_losses(features, rpn_out, batched, targets, stages, generator))
            if "mask" in stages:
                assert batched is not None
                dets = self._detect_batched(features, batched, orig_shape, training)
                losses["mask"] = self._mask_loss(x, features, dets.boxes, dets.valid, targets)
        else:
            batched = self._proposals_batched(rpn_out, orig_shape, training) if targets is not None else None
            proposals = batched.per_image() if batched is not None else self._proposals(rpn_out, orig_shape, False)
            if targets is not None:
                losses.update(self._batch_losses(features, rpn_out, batched, targets, stages, generator))
            dets, rcnn_probs = self._detect(features, proposals, orig_shape, training, stages)
            if keep_centres_within is not None:
                dets = [_centres_within(b, s, keep_centres_within) for b, s in dets]
            if targets is not None and "mask" in stages:
                padded_dets = pad_gt_boxes([b for b, _ in dets], x.device)  # (any per-image boxes pad alike)
                losses["mask"] = self._mask_loss(x, features, *padded_dets, targets)
            detections = self._finish(x, features, dets, proposals, rcnn_probs, orig_shape, stages, mask_min_score)
        if losses:
            losses["total"] = self._total(losses)
        return losses, detections

    def _thresholds(self, training: bool) -> tuple[float, float, int | None, int | None]:
        cfg = self.config
        if training:
            return (cfg.rpn_train_score_threshold, cfg.rpn_train_nms_iou, cfg.rpn_train_pre_nms_top_n,
                    cfg.rpn_train_post_nms_top_n)
        return (cfg.rpn_test_score_threshold, cfg.rpn_test_nms_iou, cfg.rpn_test_pre_nms_top_n,
                cfg.rpn_test_post_nms_top_n)

    def _proposals_batched(self, rpn_out: RpnOutput, shape: tuple[int, int, int], training: bool) -> BatchedBoxes:
        thr, iou, pre, post = self._thresholds(training)
        return select_proposals_batched(rpn_out.logits, rpn_out.deltas, rpn_out.anchors, shape, self.box_coder,
                                        thr, iou, pre, post)

    def _proposals(
        self, rpn_out: RpnOutput, shape: tuple[int, int, int], training: bool
    ) -> list[tuple[Tensor, Tensor]]:
        """Per-image proposals by the host-driven NMS (prediction on whole scans, where it is faster)."""
        thr, iou, pre, post = self._thresholds(training)
        return [
            select_proposals(rpn_out.logits[b], rpn_out.deltas[b], rpn_out.anchors, shape, self.box_coder,
                             thr, iou, pre, post)
            for b in range(rpn_out.logits.shape[0])
        ]

    def _batch_losses(
        self,
        features: BackboneFeatures,
        rpn_out: RpnOutput,
        proposals: BatchedBoxes | None,
        targets: Sequence[NoduleTargets],
        stages: set[str],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """RPN and RCNN losses of the whole batch at once (static shapes, no host round trip)."""
        cfg = self.config
        device = rpn_out.logits.device
        gt, gt_valid = pad_gt_boxes([t.gt_boxes for t in targets], device)
        ignore = ignore_valid = None
        if any(t.ignore_boxes is not None and t.ignore_boxes.shape[0] for t in targets):  # shapes: no device read
            ignore, ignore_valid = pad_gt_boxes([t.ignore_boxes if t.ignore_boxes is not None else gt.new_zeros((0, 6))
                                                 for t in targets], device)
        rpn_targets = assign_rpn_targets_batched(rpn_out.anchors, gt, gt_valid, pos_iou=cfg.rpn_pos_iou,
                                                 neg_iou=cfg.rpn_neg_iou, box_coder=self.box_coder,
                                                 ignore_boxes=ignore, ignore_valid=ignore_valid)
        # With focal loss the loss itself down-weights easy negatives, so hard-negative mining is switched off.
        labels = sample_rpn_anchors(rpn_targets.labels, rpn_out.logits, num_neg=cfg.rpn_num_neg,
                                    num_hard=0 if cfg.focal_loss else cfg.rpn_num_hard, generator=generator)
        losses: dict[str, Tensor] = {}
        losses["rpn_cls"], losses["rpn_reg"] = rpn_loss(rpn_out.logits, rpn_out.deltas,
                                                        rpn_targets._replace(labels=labels), focal=cfg.focal_loss)
        if "rcnn" in stages:
            assert proposals is not None
            b, p = proposals.valid.shape
            keys = draw_rcnn_keys(b, p + gt.shape[1], cfg.rcnn_batch_size, generator, device)
            sampled = sample_rcnn_batched(proposals.boxes, proposals.valid, gt, gt_valid, keys,
                                          fg_iou=cfg.rcnn_fg_iou, bg_iou=cfg.rcnn_bg_iou,
                                          batch_size=cfg.rcnn_batch_size, fg_fraction=cfg.rcnn_fg_fraction,
                                          box_coder=self.box_coder, ignore_boxes=ignore, ignore_valid=ignore_valid)
            logits, deltas = self._rcnn_forward_batched(features, sampled.proposals)
            flat = RcnnTargets(sampled.proposals.reshape(-1, 6), sampled.labels.flatten(),
                               sampled.deltas.reshape(-1, 6), sampled.matched_gt.flatten())
            losses["rcnn_cls"], losses["rcnn_reg"] = rcnn_loss(logits, deltas, flat, focal=cfg.focal_loss,
                                                               valid=sampled.valid.flatten())
        return losses

    def _crop_rcnn(self, features: BackboneFeatures, boxes: Tensor, bidx: Tensor, max_region: int | None) -> Tensor:
        cfg = self.config
        # out2 (the encoder map: decoupled, as published) or comb2 (the decoder map: the coupled ablation).
        return crop_and_pool(getattr(features, cfg.rcnn_feature_map), boxes, bidx, cfg.stride, cfg.rcnn_crop_size,
                             cfg.rcnn_crop_frame, max_region)

    def _rcnn_forward_batched(self, features: BackboneFeatures, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """RCNN head on ``boxes [B, K, 6]`` (padding slots included: static shapes) -> ``[B*K, C]``, ``[B*K, 6C]``."""
        b, k = boxes.shape[:2]
        bidx = torch.arange(b, device=boxes.device).repeat_interleave(k)
        return self.rcnn_head(self._crop_rcnn(features, boxes.reshape(-1, 6), bidx, None))

    def _rcnn_forward(self, features: BackboneFeatures, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RCNN head on the boxes of every image at once -> (class logits [N, C], deltas [N, 6C])."""
        if not boxes:
            boxes = [features.out2.new_zeros((0, 6))]
        flat = torch.cat(boxes, dim=0)
        bidx = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
        # Prediction may read the boxes (host-driven anyway): the longest region sizes the lookup tables.
        ranges = feature_crop_ranges(flat, self.config.stride, tuple(features.out2.shape[2:]),
                                     self.config.rcnn_crop_frame)
        longest = int((ranges[:, 3:] - ranges[:, :3]).max()) if flat.shape[0] else 1
        return self.rcnn_head(self._crop_rcnn(features, flat, bidx, longest))

    @torch.no_grad()
    def _detect_batched(self, features: BackboneFeatures, proposals: BatchedBoxes, shape: tuple[int, int, int],
                        training: bool) -> BatchedBoxes:
        """:meth:`_detect` with the RCNN stage for the whole batch (``refine_detections`` per image, batched)."""
        cfg = self.config
        thr = cfg.rcnn_train_score_threshold if training else cfg.rcnn_test_score_threshold
        iou = cfg.rcnn_train_nms_iou if training else cfg.rcnn_test_nms_iou
        b, k = proposals.valid.shape
        logits, deltas = self._rcnn_forward_batched(features, proposals.boxes)
        probs, fg_deltas = RcnnHead.foreground(logits, deltas)
        probs = probs.view(b, k)
        candidate = proposals.valid & (probs > thr)
        ranked, order = torch.sort(torch.where(candidate, probs, torch.full_like(probs, -1.0)), dim=1,
                                   descending=True, stable=True)
        boxes = self.box_coder.decode(proposals.boxes.reshape(-1, 6).float(), fg_deltas.float()).float()
        boxes = clamp_box_centres(boxes, shape).view(b, k, 6).gather(1, order[..., None].expand(-1, -1, 6))
        index, kept = nms_batched_top_k(boxes, ranked > thr, iou, k)
        return BatchedBoxes(boxes.gather(1, index[..., None].expand(-1, -1, 6)), ranked.gather(1, index), kept)

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

    def _mask_loss(self, x: Tensor, features: BackboneFeatures, boxes: Tensor, valid: Tensor,
                   targets: Sequence[NoduleTargets]) -> Tensor:
        """Mask loss over every image's boxes (``boxes [B, K, 6]``, ``valid [B, K]``) that overlap a nodule
        (``mask_training_targets`` rules: the nodule of best box IoU, if >= ``mask_match_iou``), the whole batch
        at once; the matched crops are picked with one look at the device (their number sizes what follows)."""
        cfg = self.config
        shape = tuple(int(s) for s in x.shape[2:])
        gt, gt_valid = pad_gt_boxes([t.gt_boxes for t in targets], x.device)
        if cfg.mask_train_on_gt_boxes:
            boxes, valid = torch.cat((boxes.float(), gt), dim=1), torch.cat((valid, gt_valid), dim=1)
        b, m = valid.shape
        iou = torch.where(gt_valid[:, None, :], box_iou_batched(boxes.float(), gt), -1.0)
        best_iou, best_gt = iou.max(dim=2)  # first best nodule, as box_iou_3d(...).max per image
        matched = torch.nonzero((valid & (best_iou >= cfg.mask_match_iou)).flatten()).squeeze(1)
        if matched.numel() == 0:
            # No nodule in reach: a zero that still touches the mask head keeps DDP's unused-parameter check quiet.
            return sum((p.sum() * 0.0 for p in self.mask_head.parameters()), torch.zeros((), device=x.device))
        assert all(t.gt_masks is not None and t.gt_mask_origins is not None for t in targets)
        first = torch.tensor([0, *itertools.accumulate(len(t.gt_masks or ()) for t in targets)][:-1],
                             device=x.device)
        crops = mask_crop_boxes(boxes.reshape(-1, 6), shape, cfg.mask_box_multiple, cfg.mask_crop_frame)[matched]
        images = torch.arange(b, device=x.device).repeat_interleave(m)[matched]
        nodules = (first[:, None] + best_gt).flatten()[matched]
        padded, sizes = pad_nodule_masks([mk for t in targets for mk in (t.gt_masks or ())], x.device)
        origins = torch.cat([t.gt_mask_origins.to(device=x.device, dtype=torch.long).reshape(-1, 3)
                             for t in targets if t.gt_mask_origins is not None])
        return batched_mask_loss(self.mask_head, x, features.out1, features.comb2, crops, images, nodules, padded,
                                 sizes, origins)

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
            crops = [mask_crop_boxes(b[:n], shape, cfg.mask_box_multiple, cfg.mask_crop_frame)
                     for (b, _), n in zip(dets, counts)]
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
