"""Per-nodule segmentation quality: Dice and IoU between predicted and reference instance label maps.

Conventions: label maps are integer arrays indexed ``(z, y, x)``; 0 is background and every other value is
one nodule instance. Prediction and reference of a case must share one voxel grid (same size, spacing,
origin and direction). The reference map decides which nodules count: the NoduleNet paper scores nodules
that a consensus of at least 3 (or 4) of the 4 LIDC readers marked, so give it a map holding exactly those.

Matching: every reference nodule is compared with the predicted instance that overlaps it best (the highest
Dice, which is also the highest IoU because IoU = Dice / (2 - Dice)); ties go to the smaller label. Each
reference nodule is matched on its own, so a predicted instance that merges two nodules is compared with
each of them in full and is penalised on both. A reference nodule with no overlapping predicted voxel is
*missed* (Dice = IoU = 0). The summary gives mean and standard deviation (population, ddof = 0, like
``numpy.std``) twice: over all reference nodules with missed ones as 0, and over the detected ones only.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from rich.table import Table

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mhd", ".mha")
_GEOMETRY_TOLERANCE = 1e-4  # mm for spacing/origin, unitless for direction cosines


@dataclass(frozen=True)
class NoduleSegScore:
    """Dice/IoU of one reference nodule against its best-overlapping predicted instance."""

    case_id: str
    gt_label: int
    pred_label: int | None
    gt_voxels: int
    pred_voxels: int
    intersection_voxels: int
    dice: float
    iou: float
    gt_volume_mm3: float | None = None

    @property
    def missed(self) -> bool:
        return self.pred_label is None


@dataclass(frozen=True)
class MeanSd:
    n: int
    mean: float | None
    sd: float | None

    @staticmethod
    def of(values: Sequence[float]) -> MeanSd:
        if not values:
            return MeanSd(0, None, None)
        arr = np.asarray(values, dtype=np.float64)
        return MeanSd(int(arr.size), float(arr.mean()), float(arr.std()))

    def text(self) -> str:
        return "-" if self.mean is None else f"{self.mean:.4f} ± {self.sd:.4f}"


@dataclass
class SegResult:
    """Per-nodule scores and their summary over all cases."""

    nodules: list[NoduleSegScore]
    n_cases: int
    cases_without_prediction: list[str] = field(default_factory=list)
    predictions_without_reference: list[str] = field(default_factory=list)
    n_unmatched_predictions: int = 0  # predicted instances overlapping no reference nodule

    @property
    def n_nodules(self) -> int:
        return len(self.nodules)

    @property
    def n_missed(self) -> int:
        return sum(1 for s in self.nodules if s.missed)

    @property
    def dice_all(self) -> MeanSd:
        return MeanSd.of([s.dice for s in self.nodules])

    @property
    def iou_all(self) -> MeanSd:
        return MeanSd.of([s.iou for s in self.nodules])

    @property
    def dice_detected(self) -> MeanSd:
        return MeanSd.of([s.dice for s in self.nodules if not s.missed])

    @property
    def iou_detected(self) -> MeanSd:
        return MeanSd.of([s.iou for s in self.nodules if not s.missed])

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_cases": self.n_cases,
            "n_nodules": self.n_nodules,
            "n_missed": self.n_missed,
            "n_unmatched_predictions": self.n_unmatched_predictions,
            "missed_as_zero": {"dice": asdict(self.dice_all), "iou": asdict(self.iou_all)},
            "detected_only": {"dice": asdict(self.dice_detected), "iou": asdict(self.iou_detected)},
            "cases_without_prediction": list(self.cases_without_prediction),
            "predictions_without_reference": list(self.predictions_without_reference),
            "protocol": "per reference nodule, best-Dice predicted instance; sd with ddof=0",
            "nodules": [dict(asdict(s), missed=s.missed) for s in self.nodules],
        }


# ----------------------------------------------------------------------------------------- array metrics


def _check_label_array(labels: np.ndarray, what: str) -> np.ndarray:
    if labels.ndim != 3:
        raise ValueError(f"{what} label map must be 3-D (z, y, x), got shape {labels.shape}")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{what} label map must hold integer labels, got {labels.dtype} with fractions")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} label map has negative labels")
    return labels


def score_case(
    pred_labels: np.ndarray, gt_labels: np.ndarray, *, case_id: str = "", voxel_volume_mm3: float | None = None
) -> tuple[list[NoduleSegScore], int]:
    """Per-nodule scores of one case, and the number of predicted instances that touch no reference nodule.

    Both maps are ``(z, y, x)`` arrays on the same grid; an all-zero prediction misses every nodule.
    """
    pred = _check_label_array(np.asarray(pred_labels), "predicted").ravel()
    gt = _check_label_array(np.asarray(gt_labels), "reference").ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"label maps differ in size: predicted {np.shape(pred_labels)} vs reference {np.shape(gt_labels)}")
    gt_ids, gt_sizes = np.unique(gt[gt > 0], return_counts=True)
    pred_ids, pred_sizes = np.unique(pred[pred > 0], return_counts=True)
    pred_size = dict(zip(pred_ids.tolist(), pred_sizes.tolist()))
    both = (gt > 0) & (pred > 0)
    # One pass over overlapping voxels: encode (gt, pred) pairs as one integer and count them.
    stride = int(pred.max()) + 1 if pred.size else 1
    pair_keys, pair_counts = np.unique(gt[both].astype(np.int64) * stride + pred[both], return_counts=True)
    overlaps: dict[int, list[tuple[int, int]]] = {}
    for key, count in zip(pair_keys.tolist(), pair_counts.tolist()):
        overlaps.setdefault(key // stride, []).append((key % stride, count))
    scores = []
    touched: set[int] = set()
    for gt_id, gt_size in zip(gt_ids.tolist(), gt_sizes.tolist()):
        volume = None if voxel_volume_mm3 is None else gt_size * voxel_volume_mm3
        candidates = overlaps.get(gt_id, [])
        touched.update(p for p, _ in candidates)
        if not candidates:
            scores.append(NoduleSegScore(case_id, gt_id, None, gt_size, 0, 0, 0.0, 0.0, volume))
            continue
        # Highest Dice first, then the smaller label for a deterministic tie-break.
        best_label, best_inter = max(candidates, key=lambda c: (2.0 * c[1] / (gt_size + pred_size[c[0]]), -c[0]))
        p_size = pred_size[best_label]
        dice = 2.0 * best_inter / (gt_size + p_size)
        iou = best_inter / (gt_size + p_size - best_inter)
        scores.append(NoduleSegScore(case_id, gt_id, best_label, gt_size, p_size, best_inter, dice, iou, volume))
    n_unmatched = len(set(pred_size) - touched)
    return scores, n_unmatched


# ------------------------------------------------------------------------------------------------- files


def case_id_of(path: Path) -> str | None:
    """The case id of a label-map file (its name without the image suffix), or None if not a label map."""
    name = path.name
    for suffix in LABEL_MAP_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _label_maps(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = case_id_of(path) if path.is_file() else None
        if case is None:
            continue
        if case in found:
            raise InputError(folder, f"two label maps for case {case!r}: {found[case].name} and {path.name}")
        found[case] = path
    return found


def _read_label_map(path: Path) -> tuple[np.ndarray, Any]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read as an image: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"expected a 3-D single-channel label map, got {image.GetDimension()}-D with "
                               f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    try:
        array = _check_label_array(sitk.GetArrayFromImage(image), "this")
    except ValueError as exc:
        raise InputError(path, str(exc)) from exc
    return array, image


def _same_geometry(a: Any, b: Any) -> str | None:
    """None if two SimpleITK images share a voxel grid, else what differs."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()} (x, y, z)"
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        va, vb = getattr(a, name)(), getattr(b, name)()
        if not np.allclose(va, vb, rtol=0.0, atol=_GEOMETRY_TOLERANCE):
            return f"{name[3:].lower()} {tuple(round(v, 6) for v in va)} vs {tuple(round(v, 6) for v in vb)}"
    return None


def evaluate_segmentation(pred_dir: str | Path, gt_dir: str | Path) -> SegResult:
    """Score every reference label map in ``gt_dir`` against the file with the same case id in ``pred_dir``.

    Files are matched by name without suffix (``case.nii.gz`` <-> ``case.nrrd``). A reference case without a
    prediction has all its nodules missed; predictions without a reference are listed and otherwise ignored.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_maps, pred_maps = _label_maps(gt_dir), _label_maps(pred_dir)
    if not gt_maps:
        raise InputError(gt_dir, f"no label maps ({', '.join(LABEL_MAP_SUFFIXES)}) found")
    scores: list[NoduleSegScore] = []
    without_prediction: list[str] = []
    n_unmatched = 0
    for case, gt_path in gt_maps.items():
        gt_array, gt_image = _read_label_map(gt_path)
        voxel_mm3 = float(np.prod(gt_image.GetSpacing()))
        pred_path = pred_maps.get(case)
        if pred_path is None:
            without_prediction.append(case)
            pred_array = np.zeros_like(gt_array)
        else:
            pred_array, pred_image = _read_label_map(pred_path)
            mismatch = _same_geometry(pred_image, gt_image)
            if mismatch is not None:
                raise InputError(pred_path, f"voxel grid differs from the reference {gt_path}: {mismatch}")
        case_scores, case_unmatched = score_case(pred_array, gt_array, case_id=case, voxel_volume_mm3=voxel_mm3)
        scores.extend(case_scores)
        n_unmatched += case_unmatched
    return SegResult(
        nodules=scores,
        n_cases=len(gt_maps),
        cases_without_prediction=without_prediction,
        predictions_without_reference=sorted(set(pred_maps) - set(gt_maps)),
        n_unmatched_predictions=n_unmatched,
    )


# ------------------------------------------------------------------------------------------------ output


def seg_table(result: SegResult) -> Table:
    """The summary as a rich table (mean ± sd of Dice and IoU, both protocols)."""
    from rich.table import Table

    table = Table(title=f"Segmentation: {result.n_nodules} nodules in {result.n_cases} cases, "
                        f"{result.n_missed} missed")
    table.add_column("nodules counted")
    table.add_column("n", justify="right")
    table.add_column("Dice (mean ± sd)", justify="right")
    table.add_column("IoU (mean ± sd)", justify="right")
    table.add_row("all, missed = 0", str(result.dice_all.n), result.dice_all.text(), result.iou_all.text())
    table.add_row("detected only", str(result.dice_detected.n), result.dice_detected.text(),
                  result.iou_detected.text())
    return table


def _per_nodule_csv(result: SegResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ["case_id", "gt_label", "pred_label", "gt_voxels", "pred_voxels", "intersection_voxels",
               "dice", "iou", "gt_volume_mm3", "missed"]
    writer.writerow(columns)
    for s in result.nodules:
        volume = "" if s.gt_volume_mm3 is None or not math.isfinite(s.gt_volume_mm3) else f"{s.gt_volume_mm3:.3f}"
        writer.writerow([s.case_id, s.gt_label, "" if s.pred_label is None else s.pred_label, s.gt_voxels,
                         s.pred_voxels, s.intersection_voxels, f"{s.dice:.6f}", f"{s.iou:.6f}", volume,
                         int(s.missed)])
    return buffer.getvalue()


def write_seg_outputs(result: SegResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``seg_metrics.json`` and ``seg_per_nodule.csv`` (both atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json_atomic(out / "seg_metrics.json", result.to_dict()),
        "csv": write_text_atomic(out / "seg_per_nodule.csv", _per_nodule_csv(result)),
    }
