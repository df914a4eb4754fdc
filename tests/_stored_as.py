"""The same voxels stored another way, made with SimpleITK (independent of nodulenet.io.orientation): for tests
that give NoduleNet a scan in a non-canonical orientation."""

from __future__ import annotations

import SimpleITK as sitk

from nodulenet.io.volume import Volume
from nodulenet.preprocess.resample import volume_to_sitk


def from_sitk(image: sitk.Image) -> Volume:
    return Volume(sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing())), image.GetOrigin(),
                  image.GetDirection())


def stored_as(volume: Volume, code: str) -> Volume:
    """``volume`` re-stored by ``SimpleITK.DICOMOrient`` in orientation ``code`` (e.g. "PIL": index i points
    posterior, j inferior, k left)."""
    return from_sitk(sitk.DICOMOrient(volume_to_sitk(volume), code))
