"""Readers and writers: DICOM series, MetaImage, NIfTI, NRRD; LIDC XML; LUNA CSV; world<->voxel.

Importing ``nodulenet.io`` is cheap: the readers (pydicom, SimpleITK) load when first used.
"""

from __future__ import annotations

from nodulenet.io.volume import Geometry, Volume
from nodulenet.lazy import lazy_getattr

_LAZY = {
    "read_scan": "nodulenet.io.scan",
    "write_volume": "nodulenet.io.scan",
    "SUPPORTED_SCAN_SUFFIXES": "nodulenet.io.scan",
    "read_image": "nodulenet.io.image_files",
    "write_image": "nodulenet.io.image_files",
    "read_dicom_series": "nodulenet.io.dicom",
    "list_dicom_series": "nodulenet.io.dicom",
    "DicomSeriesInfo": "nodulenet.io.dicom",
}

__all__ = ["Geometry", "Volume", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
