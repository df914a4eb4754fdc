"""Readers and writers: DICOM series, MetaImage, NIfTI, NRRD; LIDC XML; LUNA CSV; world<->voxel.

Importing ``nodulenet.io`` is cheap: the readers (pydicom, SimpleITK) load when first used.
"""

from __future__ import annotations

from nodulenet.io.volume import Geometry, Volume
from nodulenet.lazy import by_module, lazy_getattr

_LAZY = by_module({
    "nodulenet.io.scan": ("read_scan", "write_volume", "SUPPORTED_SCAN_SUFFIXES"),
    "nodulenet.io.image_files": ("read_image", "write_image"),
    "nodulenet.io.dicom": ("read_dicom_series", "list_dicom_series", "DicomSeriesInfo"),
})

__all__ = ["Geometry", "Volume", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
