"""Evaluation: LUNA16 FROC/CPM of detections, per-nodule Dice/IoU of segmentations, and their plots.

Functions the CLI wraps: :func:`evaluate_froc` + :func:`write_froc_outputs` and :func:`evaluate_segmentation`
+ :func:`write_seg_outputs`; in-memory variants for training validation: :func:`compute_froc`,
:func:`score_case`. Importing this package does not import matplotlib, SimpleITK or rich.
"""

from nodulenet.evaluate.froc import (
    CPM_FP_RATES,
    FrocCandidate,
    FrocFinding,
    FrocResult,
    compute_froc,
    evaluate_froc,
)
from nodulenet.evaluate.plots import write_froc_outputs
from nodulenet.evaluate.seg_metrics import (
    NoduleSegScore,
    SegResult,
    evaluate_segmentation,
    score_case,
    seg_table,
    write_seg_outputs,
)

__all__ = [
    "CPM_FP_RATES",
    "FrocCandidate",
    "FrocFinding",
    "FrocResult",
    "NoduleSegScore",
    "SegResult",
    "compute_froc",
    "evaluate_froc",
    "evaluate_segmentation",
    "score_case",
    "seg_table",
    "write_froc_outputs",
    "write_seg_outputs",
]
