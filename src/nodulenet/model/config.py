"""Configuration of the NoduleNet network: one frozen dataclass whose defaults are the published settings.

Conventions (see DESIGN.md): arrays are ``(z, y, x)``; the network works on 1 mm isotropic volumes, so sizes in
voxels are sizes in millimetres (anchor sizes, box borders). Boxes are ``(z0, y0, x0, z1, y1, x1)`` voxels, end
exclusive.

The defaults reproduce ``config.py`` of the published NoduleNet (uci-cbcl/NoduleNet, MICCAI 2019): five cube anchors
(5, 10, 20, 30, 50 mm) on the stride-4 decoder map, RPN/RCNN sampling thresholds and NMS settings, a 7^3 RCNN crop,
mask crops extended to multiples of 4. Options that are not in the published model (FPN-style multi-level RPN,
focal loss, a narrower backbone, proposal caps) are fields here too, so a variant is a config, not a fork.

``to_dict``/``from_dict`` give a JSON-able dict (tuples become lists); ``from_dict`` rejects unknown keys so a typo
in a user's config file is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from nodulenet.settings_dict import settings_from_dict, settings_to_dict

from .anchors import assign_anchor_sizes_to_levels

# Order of the backbone channel tuple: preBlock, forw1, forw2 (=out2, stride 4), forw3, forw4, back3, back2 (=comb2).
BACKBONE_CHANNEL_NAMES: tuple[str, ...] = ("pre", "forw1", "forw2", "forw3", "forw4", "back3", "back2")
PUBLISHED_BACKBONE_CHANNELS: tuple[int, ...] = (24, 32, 64, 64, 64, 64, 128)

# Raw intensities of the published preprocessing are 0..255 and the network sees (raw - 128) / 128; it pads scans
# with raw 170, i.e. 42/128 after normalisation. Internal padding (to a multiple of 16) uses the same value.
PUBLISHED_PAD_VALUE = (170.0 - 128.0) / 128.0


@dataclass(frozen=True)
class NoduleNetConfig:
    """Every setting of the network, its target assignment and its post-processing.

    Thresholds named ``*_iou`` are 3-D box IoUs; ``*_score_threshold`` are probabilities (sigmoid for the RPN,
    softmax foreground for the RCNN). ``*_top_n`` caps are not in the published code (it keeps every box above the
    score threshold); they bound the cost of NMS on an untrained or badly calibrated model and rarely bind with
    trained weights (``None`` disables a cap; imported published checkpoints run without the test-time ones,
    see ``checkpoint.imported_published_config``).
    """

    # ---- input ----
    in_channels: int = 1
    pad_value: float = PUBLISHED_PAD_VALUE
    max_stride: int = 16  # input sizes are padded internally to a multiple of this

    # ---- backbone (feature_net) ----
    backbone_channels: tuple[int, ...] = PUBLISHED_BACKBONE_CHANNELS
    blocks_per_stage: tuple[int, ...] = (2, 2, 3, 3, 3, 3)  # forw1, forw2, forw3, forw4, back3, back2

    # ---- RPN ----
    stride: int = 4  # stride of comb2, the map the (single-level) RPN runs on
    anchor_sizes: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0, 50.0)
    rpn_hidden_channels: int = 64
    rpn_pos_iou: float = 0.5  # rpn_train_fg_thresh_low
    rpn_neg_iou: float = 0.02  # rpn_train_bg_thresh_high
    rpn_num_neg: int = 800
    rpn_num_hard: int = 3
    rpn_train_score_threshold: float = 0.5
    rpn_train_nms_iou: float = 0.1
    rpn_test_score_threshold: float = 0.5
    rpn_test_nms_iou: float = 0.1
    rpn_train_pre_nms_top_n: int | None = 6000
    rpn_train_post_nms_top_n: int | None = 300  # published 'rpn_train_nms_num'
    rpn_test_pre_nms_top_n: int | None = 6000
    rpn_test_post_nms_top_n: int | None = 1000

    # ---- FPN variant: RPN on several decoder levels, anchors assigned to a level by size ----
    fpn: bool = False
    # Used only when fpn=True: 4 is comb2, 8 is comb3 (back3), 16 is out4. Each anchor size goes to the level
    # whose stride is nearest size/4 (anchors.assign_anchor_sizes_to_levels): (4, 8) -> {4: 5,10,20; 8: 30,50}.
    fpn_strides: tuple[int, ...] = (4, 8)

    # ---- RCNN (false-positive reduction + box refinement) ----
    num_classes: int = 2  # background + nodule
    rcnn_crop_size: int = 7
    # Which feature voxels a proposal's RCNN crop covers (rcnn.feature_crop_ranges): "published" is the published
    # CropRoi formula (index frame), so imported published weights see the crops they were trained on;
    # "voxel_corner" is the range the box's corner-frame extent touches (one voxel more at an end for about a
    # third of proposals), which models trained here before this setting existed used.
    rcnn_crop_frame: str = "published"
    rcnn_fc_channels: tuple[int, int] = (512, 256)
    rcnn_fg_iou: float = 0.5
    rcnn_bg_iou: float = 0.1
    rcnn_batch_size: int = 64
    rcnn_fg_fraction: float = 0.5
    rcnn_train_score_threshold: float = 0.5
    rcnn_train_nms_iou: float = 0.1
    rcnn_test_score_threshold: float = 0.0
    rcnn_test_nms_iou: float = 0.1
    # The map the RCNN crops its proposals from: "out2" (the encoder map: the published, decoupled NoduleNet) or
    # "comb2" (the decoder map the RPN also uses: the coupled variant of the paper's ablation).
    rcnn_feature_map: str = "out2"

    # ---- mask head ----
    mask_channels: int = 64
    mask_box_multiple: int = 4  # crop boxes are extended outwards to multiples of this (published ext2factor(4))
    # Which voxels a detection's mask crop covers (mask_head.mask_crop_boxes): "voxel_corner" (default, how the
    # models trained here learned) takes every voxel the box touches; "published" is the published formula (index
    # frame, int truncation, ext2factor), one 4-voxel block smaller at an end for most boxes. Imported published
    # checkpoints get "published": their mask head was trained on those crops.
    mask_crop_frame: str = "voxel_corner"
    mask_test_nms_iou: float | None = 0.3  # mask-IoU NMS of final detections in eval/predict; None disables
    # Masks for at most this many best detections per image in eval/predict (None: all, as published). A mask
    # costs ~0.1-2 s of CPU per detection (crop size dependent) and the published test threshold 0.0 keeps
    # every proposal as a detection, most of them with low scores.
    mask_max_detections: int | None = None
    mask_train_on_gt_boxes: bool = True  # also train the mask head on the ground-truth boxes (see nodulenet.py)
    mask_match_iou: float = 0.1  # a detection learns the mask of the GT box it overlaps best, if at least this

    # ---- box coding and losses ----
    box_reg_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    focal_loss: bool = False
    loss_weight_rpn_cls: float = 1.0
    loss_weight_rpn_reg: float = 1.0
    loss_weight_rcnn_cls: float = 1.0
    loss_weight_rcnn_reg: float = 1.0
    loss_weight_mask: float = 1.0

    # Annotation only: lets a saved config say what it is ("published", "tiny", ...).
    name: str = "published"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if len(self.backbone_channels) != len(BACKBONE_CHANNEL_NAMES):
            problems.append(f"backbone_channels needs {len(BACKBONE_CHANNEL_NAMES)} entries {BACKBONE_CHANNEL_NAMES}")
        if len(self.blocks_per_stage) != 6:
            problems.append("blocks_per_stage needs 6 entries (forw1..forw4, back3, back2)")
        if self.stride != 4:
            problems.append("stride must be 4: the RPN and the RCNN crops live on the stride-4 maps")
        if self.max_stride % 16 != 0:
            problems.append("max_stride must be a multiple of 16 (four 2x down-samplings)")
        if not self.anchor_sizes or any(s <= 0 for s in self.anchor_sizes):
            problems.append("anchor_sizes must be positive")
        if self.rcnn_feature_map not in ("out2", "comb2"):
            problems.append("rcnn_feature_map must be 'out2' (decoupled, published) or 'comb2' (decoder map)")
        if self.num_classes != 2:
            problems.append("num_classes must be 2 (background, nodule)")
        if self.rcnn_crop_frame not in ("published", "voxel_corner"):
            problems.append("rcnn_crop_frame must be 'published' or 'voxel_corner'")
        if self.mask_crop_frame not in ("published", "voxel_corner"):
            problems.append("mask_crop_frame must be 'published' or 'voxel_corner'")
        if len(self.box_reg_weights) != 6:
            problems.append("box_reg_weights needs 6 entries (z, y, x, d, h, w)")
        if self.fpn:
            strides = list(self.fpn_strides)
            if any(s not in (4, 8, 16) for s in strides) or len(set(strides)) != len(strides):
                problems.append("fpn_strides must be distinct values from (4, 8, 16)")
            elif not dict(self.rpn_levels).get(4):
                problems.append("fpn_strides must give the stride-4 level at least one anchor size")
        if problems:
            raise ValueError("invalid NoduleNetConfig: " + "; ".join(problems))

    # ---- derived ----
    @property
    def rpn_levels(self) -> tuple[tuple[int, tuple[float, ...]], ...]:
        """(stride, anchor sizes) of each RPN level; one level (stride 4, all anchors) unless ``fpn``."""
        if not self.fpn:
            return ((self.stride, self.anchor_sizes),)
        levels = assign_anchor_sizes_to_levels(self.anchor_sizes, self.fpn_strides)
        return tuple((stride, sizes) for stride, sizes in sorted(levels.items()) if sizes)

    def scaled(self, width: float, name: str | None = None) -> NoduleNetConfig:
        """The same network with every channel count multiplied by ``width`` (a smaller/faster demo model).

        Channel counts are rounded to multiples of 4 (at least 4) so that grouped kernels stay aligned.
        """

        def s(c: int) -> int:
            return max(4, int(4 * math.ceil(c * width / 4)))

        return dataclasses.replace(
            self,
            backbone_channels=tuple(s(c) for c in self.backbone_channels),
            rpn_hidden_channels=s(self.rpn_hidden_channels),
            rcnn_fc_channels=(s(self.rcnn_fc_channels[0]), s(self.rcnn_fc_channels[1])),
            mask_channels=s(self.mask_channels),
            name=name if name is not None else f"{self.name}-width{width:g}",
        )

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists)."""
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoduleNetConfig:
        """Inverse of :meth:`to_dict`; missing keys take the published default, unknown keys are an error."""
        return settings_from_dict(cls, d, "NoduleNetConfig key")


def published_config() -> NoduleNetConfig:
    """The configuration of the published NoduleNet (17,343,082 parameters)."""
    return NoduleNetConfig()


def tiny_config() -> NoduleNetConfig:
    """A quarter-width network for demos and fast tests (same structure, ~1/16 of the parameters)."""
    return NoduleNetConfig().scaled(0.25, name="tiny")
