"""Settings of training crops and augmentation (frozen dataclasses; defaults follow the published NoduleNet).

Conventions: sizes in voxels of the prepared 1 mm grid, ordered ``(z, y, x)``; angles in degrees; intensities in
the network's normalised units (``(raw - 128) / 128``, so 0.01 is about 1.3 grey levels of the uint8 image).

Published settings (``uci-cbcl/NoduleNet`` ``config.py`` / ``dataset/mask_reader.py``): 128^3 crops; a nodule lands
at a random place at least ``bound_size = 12`` voxels inside the crop; ``r_rand_crop = 0`` (positive crops only);
boxes are the mask's bounding box grown by ``bbox_border = 8`` voxels (4 per side); flips of y and x, a free
rotation in the axial plane, scaling 0.75-1.25; pad value 170.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nodulenet.settings_dict import settings_from_dict, settings_to_dict

CROP_KINDS = ("positive", "random", "lung", "hard_negative")


@dataclass(frozen=True)
class CropConfig:
    """How training crops are chosen. The four ``*_fraction`` settings split an epoch and must sum to 1."""

    crop_size_zyx: tuple[int, int, int] = (128, 128, 128)
    positive_margin_voxels: int = 12  # a placed nodule (or hard-negative point) stays this far inside the crop
    box_border_voxels: int = 8  # target box = mask bounding box grown by half of this on every side
    positive_fraction: float = 1.0  # published: positive crops only
    random_fraction: float = 0.0  # anywhere in the case (may still hold a nodule: boxes come from the mask)
    lung_fraction: float = 0.0  # centred near a random lung voxel
    hard_negative_fraction: float = 0.0  # around false positives mined from the current model
    samples_per_epoch: int | None = None  # default: number of training nodules / positive_fraction
    min_visible_voxels: int = 1  # a nodule cut by the crop border counts when at least this much of it is inside
    pad_value: int = 170  # uint8 value outside the prepared image (published)
    lung_point_stride: int = 4  # lung voxels are indexed on this coarser grid (memory); jitter fills the gaps

    def __post_init__(self) -> None:
        problems = []
        size = tuple(int(s) for s in self.crop_size_zyx)
        object.__setattr__(self, "crop_size_zyx", size)
        if len(size) != 3 or min(size) < 16 or any(s % 16 for s in size):
            problems.append(f"crop_size_zyx must be 3 multiples of 16, got {self.crop_size_zyx}")
        fractions = [self.positive_fraction, self.random_fraction, self.lung_fraction, self.hard_negative_fraction]
        if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            problems.append(f"the crop fractions (positive, random, lung, hard_negative) must be >= 0 and sum to 1, "
                            f"got {fractions}")
        if self.positive_fraction == 0 and not self.samples_per_epoch:
            problems.append("samples_per_epoch is needed when positive_fraction is 0")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            problems.append("samples_per_epoch must be >= 1")
        if self.positive_margin_voxels < 0 or self.box_border_voxels < 0 or self.min_visible_voxels < 1:
            problems.append("positive_margin_voxels and box_border_voxels must be >= 0, min_visible_voxels >= 1")
        if not 0 <= self.pad_value <= 255 or self.lung_point_stride < 1:
            problems.append("pad_value must be 0..255 and lung_point_stride >= 1")
        if problems:
            raise ValueError("invalid crop settings: " + "; ".join(problems))

    @property
    def fractions(self) -> dict[str, float]:
        return {"positive": self.positive_fraction, "random": self.random_fraction, "lung": self.lung_fraction,
                "hard_negative": self.hard_negative_fraction}

    def to_dict(self) -> dict[str, Any]:
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropConfig:
        return settings_from_dict(cls, d, "crop setting", prefix="crop.")


@dataclass(frozen=True)
class AugmentConfig:
    """Random transforms of a training crop; image, boxes and masks move together (see :mod:`.augment`).

    Geometric transforms are drawn per sample and fused into ONE resampling of the source image. Validation
    and mined hard negatives go through the same code with ``enabled=False``.
    """

    enabled: bool = True
    flip_zyx: tuple[bool, bool, bool] = (True, True, True)  # each flagged axis flipped with probability 1/2
    rot90_axial: bool = True  # a random multiple of 90 degrees in the (y, x) plane (exact: no interpolation)
    rotate_axial_degrees: float = 180.0  # plus a free angle uniform in [-this, this] in the (y, x) plane ...
    rotate_probability: float = 1.0  # ... with this probability (published: always)
    scale_range: tuple[float, float] = (0.75, 1.25)  # isotropic zoom factor (>1 makes things bigger)
    scale_probability: float = 1.0  # published: always
    intensity_shift: float = 0.05  # add a uniform draw from [-this, this] to the whole crop
    intensity_scale: float = 0.05  # multiply by 1 + uniform [-this, this]
    noise_sigma: float = 0.02  # add Gaussian noise of this standard deviation
    intensity_probability: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        lo, hi = self.scale_range
        if not 0.25 <= lo <= hi <= 4.0:
            problems.append(f"scale_range must satisfy 0.25 <= low <= high <= 4, got {self.scale_range}")
        for name in ("rotate_probability", "scale_probability", "intensity_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be within [0, 1]")
        if min(self.rotate_axial_degrees, self.intensity_shift, self.intensity_scale, self.noise_sigma) < 0:
            problems.append("rotate_axial_degrees, intensity_shift, intensity_scale and noise_sigma must be >= 0")
        if len(self.flip_zyx) != 3:
            problems.append("flip_zyx needs 3 flags (z, y, x)")
        if problems:
            raise ValueError("invalid augmentation settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        return settings_from_dict(cls, d, "augmentation setting", prefix="augment.")
