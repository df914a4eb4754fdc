"""Which crops an epoch holds, and how one crop is made (pure numpy; no torch).

Conventions: arrays ``(z, y, x)`` in voxels of the prepared 1 mm grid; boxes ``(z0, y0, x0, z1, y1, x1)`` in voxels
of the crop, upper bounds exclusive; images as the network sees them, ``(raw - 128) / 128``.

An epoch is a list of :class:`CropSpec` fixed by ``(seed, epoch)`` (:func:`epoch_plan`): its positive crops visit
every training nodule in turn, the negatives (random, lung-centred, hard-negative) pick cases at random. A crop is
fixed by ``(seed, epoch, index)`` (:func:`make_crop`), so it is the same in any worker process, after a resume and
on any number of GPUs.

Excluded findings (LIDC nodules marked by fewer readers than the consensus, LUNA16's annotations_excluded.csv) are
IGNORED, as LUNA16's scoring ignores them: they are never a positive (they are not in the case's nodules), and no
negative is anchored on one: a lung, random or hard-negative anchor within an excluded finding's radius
(:meth:`PreparedCase.within_excluded`) is drawn again (up to :data:`EXCLUDED_REDRAWS` times, then the crop falls
back to a random one that also keeps clear), so a faint ground-glass nodule the readers disagreed on is not taught
as background at the centre of a crop. An excluded finding that reaches into a crop anyway (next to a nodule, at
the edge of a negative crop) comes with the crop as an IGNORE BOX (:func:`excluded_boxes`, moved by the same flips,
rotations and zoom as the image): the training targets neither take it as positive nor as negative there
(:mod:`nodulenet.model.targets`).

Placement: the crop's ANCHOR - a nodule's centre, a lung point or a mined false positive - is put at a random
place at least ``positive_margin_voxels`` (published ``bound_size = 12``) inside the crop, counting the anchor's
own extent (a nodule's box after rotation and zoom); if it does not fit it goes to the middle. Random crops put a
random point of the case at the crop's middle. Boxes are recomputed from the transformed masks of EVERY nodule
that reaches into the crop, so a negative crop that happens to hold a nodule still has its box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .augment import (
    CropTransform,
    Orientation,
    augment_intensity,
    box_from_mask,
    draw_orientation,
    nodule_scale_range,
    place,
    resample_image,
    resample_mask,
)
from .cases import PreparedCase
from .config import CROP_KINDS, AugmentConfig, CropConfig


@dataclass(frozen=True)
class HardNegative:
    """A false positive of the model: where (prepared voxels of the case) and how sure the model was."""

    case_id: str
    center_zyx: tuple[float, float, float]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "center_zyx": [round(float(v), 3) for v in self.center_zyx],
                "score": round(float(self.score), 6)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardNegative:
        return cls(str(d["case_id"]), tuple(float(v) for v in d["center_zyx"]), float(d["score"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class CropSpec:
    """One planned crop: its kind, its case, and the nodule or hard negative it is built around."""

    kind: str
    case_index: int
    nodule_index: int = -1
    hard_negative_index: int = -1


@dataclass
class CropSample:
    """A finished crop: image ``[Z, Y, X]`` float32 (normalised), and one box + tight mask per visible nodule."""

    image: np.ndarray
    boxes: np.ndarray  # float32 [G, 6]
    masks: list[np.ndarray]  # bool, tight
    mask_origins: np.ndarray  # int64 [G, 3], crop voxels of each mask's first element
    nodule_ids: list[int]
    case_id: str
    kind: str
    info: dict[str, Any] = field(default_factory=dict)
    # float32 [K, 6]: the excluded findings that reach into the crop, boxed as the nodules are (ignored in training).
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), dtype=np.float32))


def split_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``fractions`` with largest remainders (the counts sum to ``total``)."""
    raw = {k: total * f for k, f in fractions.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    rest = total - sum(counts.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), CROP_KINDS.index(k)))[:rest]:
        counts[k] += 1
    return counts


def samples_per_epoch(cases: Sequence[PreparedCase], crop: CropConfig) -> int:
    """Published: one positive crop per nodule, negatives added on top by the ratio."""
    if crop.samples_per_epoch:
        return int(crop.samples_per_epoch)
    n_nodules = sum(len(c.nodules) for c in cases)
    if n_nodules == 0:
        raise ValueError("the training cases hold no nodule: give samples_per_epoch and negative crop fractions")
    return max(1, int(round(n_nodules / crop.positive_fraction)))


def epoch_plan(cases: Sequence[PreparedCase], crop: CropConfig, n_samples: int, seed: int, epoch: int,
               n_hard_negatives: int = 0) -> list[CropSpec]:
    """The crops of one epoch (see the module doc). Without mined hard negatives their share goes to lung crops."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    fractions = dict(crop.fractions)
    if n_hard_negatives == 0:
        fractions["lung"] += fractions["hard_negative"]
        fractions["hard_negative"] = 0.0
    nodule_refs = [(ci, ni) for ci, c in enumerate(cases) for ni in range(len(c.nodules))]
    if not nodule_refs:
        fractions["random"] += fractions["positive"]
        fractions["positive"] = 0.0
    counts = split_counts(n_samples, fractions)
    plan: list[CropSpec] = []
    if counts["positive"]:
        # Whole shuffled passes over the nodules: each nodule once per pass.
        order: list[int] = []
        while len(order) < counts["positive"]:
            order += list(rng.permutation(len(nodule_refs)))
        plan += [CropSpec("positive", *nodule_refs[k]) for k in order[: counts["positive"]]]
    for kind in ("random", "lung"):
        plan += [CropSpec(kind, int(ci)) for ci in rng.integers(len(cases), size=counts[kind])]
    if counts["hard_negative"]:
        plan += [CropSpec("hard_negative", -1, hard_negative_index=int(k))
                 for k in rng.integers(n_hard_negatives, size=counts["hard_negative"])]
    return plan


# Draws of a negative anchor that lands on an excluded finding before giving up on that kind of anchor.
EXCLUDED_REDRAWS = 20


def _negative_anchor(case: PreparedCase, kind: str, rng: np.random.Generator, size: np.ndarray, shape: np.ndarray,
                     crop: CropConfig, position_u: np.ndarray, pick_u: float) -> np.ndarray:
    """A lung or random crop's anchor (first draw from ``position_u``/``pick_u``), drawn again from ``rng`` while
    it lies within an excluded finding's radius."""
    for attempt in range(EXCLUDED_REDRAWS + 1):
        if kind == "random":
            # Anywhere the crop stays inside the case (the middle when the case is smaller than the crop).
            lo = np.minimum(size / 2.0 - 0.5, (shape - 1) / 2.0)
            hi = np.maximum(shape - size / 2.0 - 0.5, (shape - 1) / 2.0)
            anchor = lo + position_u * (hi - lo)
        else:
            point = case.lung_points_zyx[int(pick_u * len(case.lung_points_zyx))].astype(np.float64)
            anchor = np.minimum(point + position_u * crop.lung_point_stride, shape - 1)
        if not case.within_excluded(anchor):
            return anchor
        position_u, pick_u = rng.random(3), float(rng.random())
        if attempt == EXCLUDED_REDRAWS // 2:
            kind = "random"  # a small lung almost filled by an excluded finding: look anywhere in the case
    raise ValueError(f"case {case.case_id}: no crop anchor outside its excluded findings after "
                     f"{EXCLUDED_REDRAWS} draws")


def excluded_boxes(case: PreparedCase, transform: CropTransform, scale: float, border_voxels: float) -> np.ndarray:
    """Boxes (crop voxels, float32 ``[K, 6]``) of the case's excluded findings that reach into the crop.

    Each is the box a nodule mask of the finding's size would get (:func:`box_from_mask`): a cube of the diameter
    (times the crop's zoom ``scale``; a sphere stays a sphere under the crop's rotations), grown by
    ``border_voxels / 2`` on every side, around the finding's centre moved by ``transform``. As for mask boxes, box
    coordinate = voxel index + 0.5 (a mask whose voxels are ``o .. o + n - 1`` has the box ``o .. o + n``).
    """
    if not case.excluded_nodules:
        return np.zeros((0, 6), dtype=np.float32)
    centres_src, diameters_mm = case.excluded_centres_zyx()
    centres = transform.to_output(centres_src) + 0.5
    # The prepared grid is isotropic (1 mm by default): one voxel size converts the diameter.
    half = scale * diameters_mm[:, None] / (2.0 * float(np.mean(case.geometry.spacing_zyx))) + border_voxels / 2.0
    boxes = np.concatenate([centres - half, centres + half], axis=1)
    size = np.asarray(transform.out_shape, dtype=np.float64)
    inside = np.all((boxes[:, 3:] > 0) & (boxes[:, :3] < size), axis=1)
    return boxes[inside].astype(np.float32).reshape(-1, 6)


def _anchor_position(rng: np.random.Generator, size: np.ndarray, half_extent: np.ndarray, margin: float) -> np.ndarray:
    """Output position of an anchor: uniform where it stays ``margin`` inside the crop, else the middle."""
    lo = margin + half_extent - 0.5
    hi = size - 0.5 - margin - half_extent
    u = rng.random(3)
    middle = (size - 1) / 2.0
    return np.where(hi >= lo, lo + u * np.maximum(hi - lo, 0.0), middle)


def make_crop(case: PreparedCase, spec: CropSpec, crop: CropConfig, aug: AugmentConfig, rng: np.random.Generator,
              hard_negative: HardNegative | None = None) -> CropSample:
    """Build the crop ``spec`` of ``case`` with random draws from ``rng`` (see the module doc)."""
    size = np.asarray(crop.crop_size_zyx, dtype=np.float64)
    shape = np.asarray(case.shape_zyx, dtype=np.float64)
    kind = spec.kind
    if kind == "lung" and len(case.lung_points_zyx) == 0:
        kind = "random"  # a case whose lung mask is empty (should not happen after preparation)
    position_u = rng.random(3)
    pick_u = rng.random()
    if kind == "positive":
        nodule = case.nodules[spec.nodule_index]
        anchor = nodule.center_zyx
        half = np.asarray(nodule.mask.shape, dtype=np.float64) / 2.0 + crop.box_border_voxels / 2.0
        orientation = draw_orientation(rng, aug, nodule_scale_range(aug, float(max(nodule.mask.shape))))
    else:
        orientation = draw_orientation(rng, aug)
        half = np.zeros(3)
        if kind == "hard_negative":
            if hard_negative is None:
                raise ValueError("a hard_negative crop needs its HardNegative")
            anchor = np.asarray(hard_negative.center_zyx, dtype=np.float64)
            if case.within_excluded(anchor):  # mined before the finding was excluded, or from another model
                kind = "lung" if len(case.lung_points_zyx) else "random"
        if kind in ("random", "lung"):
            anchor = _negative_anchor(case, kind, rng, size, shape, crop, position_u, pick_u)
        elif kind != "hard_negative":
            raise ValueError(f"unknown crop kind {kind!r}; expected one of {CROP_KINDS}")
    q = np.abs(orientation.matrix * orientation.scale)  # |Q|: how source extents project onto output axes
    half_out = orientation.scale * (q.T @ half)
    if kind == "random":
        target = (size - 1) / 2.0
    else:
        target = _anchor_position(rng, size, half_out, float(crop.positive_margin_voxels))
    transform = place(orientation, anchor, target, crop.crop_size_zyx)

    raw = resample_image(case.image, transform, float(crop.pad_value))
    image = (raw - np.float32(128.0)) / np.float32(128.0)
    image = augment_intensity(image, rng, aug)
    boxes, masks, origins, ids = [], [], [], []
    for nodule in case.nodules:
        moved = resample_mask(nodule.mask, nodule.mask_origin_zyx, transform)
        if moved is None or int(moved[0].sum()) < crop.min_visible_voxels:
            continue
        mask, origin = moved
        boxes.append(box_from_mask(mask.shape, origin, crop.box_border_voxels))
        masks.append(mask)
        origins.append(origin)
        ids.append(nodule.id)
    return CropSample(
        image=image.astype(np.float32, copy=False),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 6),
        masks=masks,
        mask_origins=np.asarray(origins, dtype=np.int64).reshape(-1, 3),
        nodule_ids=ids,
        case_id=case.case_id,
        kind=spec.kind,
        ignore_boxes=excluded_boxes(case, transform, orientation.scale, crop.box_border_voxels),
        # anchor_kind: what the anchor really is (a hard negative on an excluded finding becomes a lung anchor).
        info={"orientation": orientation.to_dict(), "anchor_kind": kind,
              "anchor_zyx": [round(float(v), 3) for v in anchor],
              "anchor_out_zyx": [round(float(v), 3) for v in transform.to_output(anchor[None])[0]]},
    )


def orientation_of(sample: CropSample) -> Orientation:
    d = sample.info["orientation"]
    return Orientation(tuple(d["flip_zyx"]), d["quarter_turns"], d["angle_deg"], d["scale"])  # type: ignore[arg-type]
