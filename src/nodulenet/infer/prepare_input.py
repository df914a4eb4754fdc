"""The network input of one scan, made in memory exactly as training cases are prepared.

Conventions (DESIGN.md): arrays ``(z, y, x)``; world ``(x, y, z)`` DICOM LPS mm. The result is the uint8 image
of a prepared case (``image.nrrd`` of :func:`nodulenet.preprocess.prepare.prepare_case`: resampled to the
config's spacing, HU window -> 0..255, padded with ``pad_value`` outside the dilated lungs, cropped to the lungs
plus a margin) and the :class:`CaseTransform` that maps its voxels back to the original scan.

Why not call ``prepare_case``: it writes a case folder (image, masks, overlay, JSON) that inference does not
need. The steps below are the same calls in the same order; ``tests/test_infer_prepare.py`` checks that the
image is byte-identical to the one ``prepare_case`` writes, so the two cannot drift apart unnoticed.

Bad input gets one clear :class:`InputError` each: a series that is not CT, values that are not Hounsfield
units, a scan too small or too thin to hold lungs, and a scan in which no lungs are found.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulenet.errors import InputError
from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.lung_mask import LungSegmentationError, lung_bounding_box, segment_lungs
from nodulenet.preprocess.normalize import apply_lung_mask, hu_to_uint8
from nodulenet.preprocess.prepare import resample_ct_hu
from nodulenet.preprocess.resample import CaseTransform

# A chest CT that holds both lungs spans ~200-350 mm along z and ~300-400 mm in plane. Below these the scan
# cannot hold a lung (it is a localizer, a partial stack or a wrong file); saying so beats "no lungs found".
MIN_EXTENT_Z_MM = 40.0
MIN_EXTENT_INPLANE_MM = 100.0
MIN_SLICES = 8
# Air (about -1000 HU) surrounds the body and fills the lungs; a CT in HU always has some voxels below this.
AIR_HU = -500.0
MIN_AIR_FRACTION = 0.01


@dataclass
class PreparedInput:
    """The network input (uint8 ``(z, y, x)`` on the preprocessed grid) and its way back to the scan."""

    image: np.ndarray
    transform: CaseTransform
    lung_volume_ml: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _source(ct: Volume) -> Path | None:
    path = ct.meta.get("source_path")
    return Path(path) if path else None


def check_ct_volume(ct: Volume) -> None:
    """Refuse what cannot be a chest CT in HU, with the reason (see the module docstring)."""
    where = _source(ct)
    modality = str(ct.meta.get("modality") or "").upper()
    if modality and modality != "CT":
        raise InputError(where, f"is a {modality} series, not CT: NoduleNet reads chest CT only")
    image_type = ct.meta.get("image_type")
    if image_type and any(str(t).upper() in ("LOCALIZER", "SCOUT") for t in image_type):
        raise InputError(where, "is a localizer/scout image, not a CT volume")
    shape = ct.shape_zyx
    extent = [(n - 1) * s for n, s in zip(shape, ct.spacing_zyx)]
    if shape[0] < MIN_SLICES or extent[0] < MIN_EXTENT_Z_MM:
        raise InputError(
            where,
            f"too thin to hold the lungs: {shape[0]} slice(s) covering {extent[0]:.0f} mm along z (a chest CT covers "
            f"200-350 mm; at least {MIN_SLICES} slices and {MIN_EXTENT_Z_MM:.0f} mm are needed)",
        )
    if min(extent[1:]) < MIN_EXTENT_INPLANE_MM:
        raise InputError(
            where,
            f"too small to hold the lungs: the slices cover {extent[1]:.0f} x {extent[2]:.0f} mm (a chest is "
            f"300-400 mm wide; at least {MIN_EXTENT_INPLANE_MM:.0f} mm are needed)",
        )
    # A strided sample is enough to tell HU from MR/PET intensities and costs nothing on a 100 M voxel scan.
    sample = ct.array[:: max(1, shape[0] // 16), ::4, ::4]
    air = float(np.mean(sample < AIR_HU))
    if air < MIN_AIR_FRACTION:
        raise InputError(
            where,
            f"values do not look like CT Hounsfield units: only {100 * air:.2f}% of voxels are below {AIR_HU:.0f} "
            f"(air is about -1000 HU around the body and in the lungs); range {float(sample.min()):.0f} to "
            f"{float(sample.max()):.0f}",
        )


def prepare_input(ct: Volume, config: PrepareConfig | None = None) -> PreparedInput:
    """Resample, segment the lungs, normalise and crop ``ct`` (HU) exactly as ``prepare_case`` does."""
    config = config or PrepareConfig()
    check_ct_volume(ct)
    stages: dict[str, float] = {}
    last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages[name] = round(now - last, 3)
        last = now

    hu, mapping = resample_ct_hu(ct, config)
    lap("resample")

    try:
        lung = segment_lungs(hu, config.lung)
    except LungSegmentationError as exc:
        raise InputError(_source(ct), f"no lungs found: {exc}") from None
    if not lung.lungs.any():  # segment_lungs may end with an empty mask after its airway/fill steps
        raise InputError(_source(ct), "no lungs found: the lung segmentation came out empty (is this a chest CT?)")
    lap("lung_mask")

    box = lung_bounding_box(lung.lungs > 0, config.crop_margin_voxels)
    transform = CaseTransform(mapping.original, mapping.resampled, box[:3], box[3:])
    crop = transform.crop_slices
    image = hu_to_uint8(hu.array[crop], config.hu_min, config.hu_max)
    image = apply_lung_mask(image, lung.kept[crop], lung.lungs[crop], config.pad_value, config.remove_bone,
                            config.bone_threshold)
    lap("normalize")
    return PreparedInput(image=image, transform=transform, lung_volume_ml=float(lung.lung_volume_ml),
                         stage_seconds={**stages, **{f"lung.{k}": v for k, v in lung.stage_seconds.items()}})
