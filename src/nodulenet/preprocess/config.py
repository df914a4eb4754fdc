"""Settings of case preparation (resampling, lung mask, HU window, crop, nodule consensus).

The defaults reproduce the published NoduleNet preprocessing (``uci-cbcl/NoduleNet``,
``utils/LIDC/preprocess.py`` and ``utils/LIDC/cvrt_annos_to_npy.py``):

- resample to 1 mm isotropic voxels;
- HU clipped to ``[-1200, 600]`` and mapped linearly to ``[0, 255]`` with truncation (``astype(uint8)``),
  so HU 0 (water) -> 170, the pad value;
- everything outside the lung mask dilated by 10 six-connected steps (10 mm on the 1 mm grid) set to 170;
- bone removal in the dilation ring is *off*: the published code has it (``remove_bone``, uint8 > 210 -> 170)
  but calls it with ``remove_bone=False``; set ``remove_bone: true`` to get the DSB-2017 behaviour;
- crop to the bounding box of the (undilated) lung mask plus a 5-voxel margin;
- nodules: reader outlines clustered into nodules, a nodule kept when at least 3 readers marked it
  (``n_consensus = 3``), its mask the union of its readers' outlines.

Configs load from YAML or JSON (:func:`load_prepare_config`); dotted overrides (``lung.threshold_hu``)
come from CLI flags (:meth:`PrepareConfig.with_overrides`); :meth:`PrepareConfig.to_dict` is what every
prepared case stores in ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from nodulenet.errors import InputError
from nodulenet.io.config_files import apply_dotted_overrides, load_settings
from nodulenet.settings_dict import settings_from_dict, settings_to_dict

# The files of a prepared case folder (written by preprocess.prepare, read by data.cases); ``done.json`` is written
# last and records the others' sizes, so a folder without it was never finished.
DONE_FILE = "done.json"
CASE_FILES = ("image.nrrd", "lung_mask.nrrd", "nodule_mask.nrrd", "nodules.json", "transform.json", "config.json")

CONSENSUS_METHODS = ("union", "majority")
LUNA_MASK_METHODS = ("sphere",)


@dataclass(frozen=True)
class LungMaskConfig:
    """Parameters of :func:`nodulenet.preprocess.lung_mask.segment_lungs` (all in HU, mm, mm^2 or mL)."""

    threshold_hu: float = -600.0
    """Voxels below this are air (lung parenchyma is about -850 HU, soft tissue about 40 HU)."""
    min_lung_volume_ml: float = 200.0
    """The lungs together must hold at least this (published volume filter: 0.2 L); the second lung is judged by
    ``second_lung_min_ratio`` alone."""
    second_lung_min_ratio: float = 1.0 / 4.8
    """A second component is the other lung when its volume is at least this fraction of the largest
    (the published code accepts two lungs whose volume ratio is below 4.8)."""
    trachea_min_area_mm2: float = 30.0
    trachea_max_area_mm2: float = 700.0
    """Cross-section of an adult trachea is about 150-350 mm^2; a lung apex grows past this within a few mm."""
    trachea_max_offset_mm: float = 35.0
    """How far (left-right) from the middle of the lungs the trachea seed may be."""
    trachea_search_depth_mm: float = 40.0
    """How far below the top of the air region to look for the trachea seed."""
    airway_max_area_mm2: float = 900.0
    """Tracking the trachea/main bronchi downwards stops where the airway merges into a lung (larger area)."""
    separation_max_erosion_mm: float = 22.0
    """Largest erosion tried to split lungs fused at the anterior/posterior junction (published: 22 steps)."""
    convex_hull_max_area_ratio: float = 1.5
    """A slice of a lung is replaced by its convex hull only if that grows its area by at most this factor."""
    dilation_mm: float = 10.0
    """The kept region is the lung mask dilated by this distance (taxicab, = 10 six-connected steps at 1 mm)."""
    coarse_grid_mm: float = 0.0
    """When > 0 (2.0 is the measured setting), the lung components (air enclosed in the body, the largest 3D
    components) are found on a grid pooled to about this spacing, then taken at full resolution near it
    (:mod:`nodulenet.preprocess.lung_mask_coarse`); the rest of the mask runs at full resolution. Per lung Dice
    >= 0.996 against the single pass (0) on the LIDC scans and 20 phantoms, and the lung mask 1.3-1.7x faster; but
    OFF by default: with it on, a whole ``predict --max-memory 1.6`` of LIDC-IDRI-0001 peaked at 1,800 MiB instead
    of staying under the limit (tests/test_predict_memory.py, slow), and where the extra peak comes from is not
    found yet."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides what a prepared case looks like. See the module docstring for the defaults."""

    spacing_zyx_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_min: float = -1200.0
    hu_max: float = 600.0
    padding_below_hu: float = -1500.0
    """Stored values below this (scanners use -2048, -3024 outside the field of view) are not tissue..."""
    padding_fill_hu: float = -1000.0
    """...and are replaced by air before resampling, so interpolation never mixes them with the body."""
    pad_value: int = 170
    remove_bone: bool = False
    bone_threshold: int = 210
    crop_margin_voxels: int = 5
    min_readers: int = 3
    consensus: str = "union"
    luna_nodule_mask: str = "sphere"
    overlay: bool = True
    lung: LungMaskConfig = field(default_factory=LungMaskConfig)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing_zyx_mm)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing_zyx_mm must be 3 positive numbers, got {self.spacing_zyx_mm!r}")
        object.__setattr__(self, "spacing_zyx_mm", spacing)
        if not self.hu_max > self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must be above hu_min ({self.hu_min})")
        for name in ("pad_value", "bone_threshold"):
            value = getattr(self, name)
            if not 0 <= int(value) <= 255:
                raise ValueError(f"{name} must be a uint8 value 0..255, got {value!r}")
        if self.crop_margin_voxels < 0:
            raise ValueError("crop_margin_voxels must be >= 0")
        if self.min_readers < 1:
            raise ValueError("min_readers must be >= 1")
        if self.consensus not in CONSENSUS_METHODS:
            raise ValueError(f"consensus must be one of {CONSENSUS_METHODS}, got {self.consensus!r}")
        if self.luna_nodule_mask not in LUNA_MASK_METHODS:
            raise ValueError(f"luna_nodule_mask must be one of {LUNA_MASK_METHODS}, got {self.luna_nodule_mask!r}")

    def to_dict(self) -> dict[str, Any]:
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> "PrepareConfig":
        """Build from a (possibly partial) dict; unknown keys are an error so typos do not pass silently."""
        if not isinstance(d, dict):
            raise InputError(source, f"a prepare config must be a mapping, got {type(d).__name__}")
        spacing = d.get("spacing_zyx_mm")
        if isinstance(spacing, (int, float)):  # a single number means isotropic voxels
            d = {**d, "spacing_zyx_mm": (spacing,) * 3}
        return settings_from_dict(cls, d, "prepare setting", source)

    def with_overrides(self, overrides: dict[str, Any]) -> "PrepareConfig":
        """Return a copy with dotted keys replaced, e.g. ``{"min_readers": 2, "lung.dilation_mm": 5}``."""
        d = apply_dotted_overrides(self.to_dict(), overrides, "prepare")
        return PrepareConfig.from_dict(d)

    def replace(self, **changes: Any) -> "PrepareConfig":
        return replace(self, **changes)


def load_prepare_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PrepareConfig:
    """Defaults, then the YAML/JSON file at ``path`` (a prepared case's config.json nests it under "prepare"),
    then dotted ``overrides``."""
    return load_settings(PrepareConfig(), PrepareConfig.from_dict, path, "prepare", overrides)
