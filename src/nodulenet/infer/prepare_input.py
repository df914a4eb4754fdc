"""The network input of one scan, made in memory exactly as training cases are prepared.

Conventions (DESIGN.md): arrays ``(z, y, x)``; world ``(x, y, z)`` DICOM LPS mm. The result is the uint8 image
of a prepared case (``image.nrrd`` of :func:`nodulenet.preprocess.prepare.prepare_case`: put into canonical
orientation (:mod:`nodulenet.io.orientation`: axial slices, LPS axis signs, whatever the file's axis order), resampled
to the config's spacing, HU window -> 0..255, padded with ``pad_value`` outside the dilated lungs, cropped to the lungs
plus a margin) and the :class:`CaseTransform` that maps its voxels back to the original scan.

Both this and ``prepare_case`` (which also writes the case folder: masks, overlay, JSON) make the image with
the one function :func:`nodulenet.preprocess.prepare.make_network_input`; ``tests/test_infer_prepare.py``
checks that the image is byte-identical to the one ``prepare_case`` writes.

Bad input gets one clear :class:`InputError` each: a series that is not CT, values that are not Hounsfield
units, a scan too small or too thin to hold lungs, and a scan in which no lungs are found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulenet.errors import InputError
from nodulenet.io.orientation import Reorientation
from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.lung_mask import LungSegmentationError
from nodulenet.preprocess.prepare import make_network_input
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
    # The lung segmentation on the resampled (uncropped) grid, ``transform.resampled``: labels (> 0 in a lung)
    # and the dilated region the network sees. Findings are placed against it (``site``: in a lung or not).
    lungs: np.ndarray | None = field(default=None, repr=False)
    lungs_kept: np.ndarray | None = field(default=None, repr=False)


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
    # Sizes along the patient's axes, whatever the file's axis order: z is the axis the network takes as slices.
    canonical = Reorientation.of(ct.geometry).canonical
    shape = canonical.shape_zyx
    extent = [(n - 1) * s for n, s in zip(shape, canonical.spacing_zyx)]
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
    sample = ct.array[:: max(1, ct.shape_zyx[0] // 16), ::4, ::4]
    air = float(np.mean(sample < AIR_HU))
    if air < MIN_AIR_FRACTION:
        raise InputError(
            where,
            f"values do not look like CT Hounsfield units: only {100 * air:.2f}% of voxels are below {AIR_HU:.0f} "
            f"(air is about -1000 HU around the body and in the lungs); range {float(sample.min()):.0f} to "
            f"{float(sample.max()):.0f}",
        )


def prepare_input(ct: Volume, config: PrepareConfig | None = None) -> PreparedInput:
    """Reorient, resample, segment the lungs, normalise and crop ``ct`` (HU) exactly as ``prepare_case`` does."""
    config = config or PrepareConfig()
    check_ct_volume(ct)
    try:
        prepared = make_network_input(ct, config)
    except LungSegmentationError as exc:
        raise InputError(_source(ct), f"no lungs found: {exc}") from None
    if not prepared.lung.lungs.any():  # segment_lungs may end with an empty mask after its airway/fill steps
        raise InputError(_source(ct), "no lungs found: the lung segmentation came out empty (is this a chest CT?)")
    return PreparedInput(image=prepared.image, transform=prepared.transform,
                         lung_volume_ml=float(prepared.lung.lung_volume_ml), stage_seconds=prepared.stage_seconds,
                         lungs=prepared.lung.lungs, lungs_kept=prepared.lung.kept)
