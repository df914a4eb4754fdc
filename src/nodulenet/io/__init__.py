"""Readers and writers: DICOM series, MetaImage, NIfTI, NRRD; LIDC XML; LUNA CSV; world<->voxel."""

from nodulenet.io.volume import Geometry, Volume

__all__ = ["Geometry", "Volume"]
