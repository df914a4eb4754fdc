"""The nodule label map: one integer image on the scan's own grid, value k = finding k (0 = background).

Conventions (see DESIGN.md): the array is ``(z, y, x)`` and the file carries the scan's geometry (origin,
spacing, direction) so any viewer overlays it on the input scan. Format by suffix: ``.nii.gz`` (default),
``.nii`` or ``.nrrd`` (via :func:`nodulenet.io.image_files.write_image`, atomic). NRRD keeps the geometry
exactly; NIfTI stores it as float32, so a DICOM scan's origin comes back rounded to ~1e-5 mm.

Labels are uint8 when K <= 255, else uint16. Where masks overlap the higher-scoring finding keeps the voxel
(findings are painted in ascending score order), so the label map is a valid partition, like a DICOM SEG
of label-map style.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from nodulenet.errors import InputError
from nodulenet.io.findings import NoduleFinding, NoduleMask, ScanFindings
from nodulenet.io.image_files import write_image
from nodulenet.io.volume import Geometry, Volume

LABEL_MAP_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd")


def label_dtype(num_findings: int) -> type[np.unsignedinteger]:
    if num_findings <= np.iinfo(np.uint8).max:
        return np.uint8
    if num_findings <= np.iinfo(np.uint16).max:
        return np.uint16
    raise ValueError(f"{num_findings} findings do not fit a uint16 label map")


def label_array_from_findings(findings: Sequence[NoduleFinding], shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Paint each finding's mask with its id on a zero array of ``shape_zyx`` (overlaps: higher score wins).

    Findings without a mask are left out (they have no voxels to paint).
    """
    labels = np.zeros(tuple(shape_zyx), dtype=label_dtype(max((f.id for f in findings), default=0)))
    # Ascending score, then descending id, so the best finding is painted last and wins every overlap.
    for f in sorted(findings, key=lambda f: (f.score, -f.id)):
        if f.mask is None:
            continue
        if not f.mask.fits(tuple(shape_zyx)):
            raise ValueError(f"finding {f.id}: mask crop {f.mask.crop_box_zyx} reaches outside the grid {shape_zyx}")
        region = labels[f.mask.slices()]
        region[f.mask.array] = f.id
    return labels


def label_map_volume(findings: ScanFindings, label_array: np.ndarray | None = None) -> Volume:
    """The label map of ``findings`` as a :class:`Volume` on the scan geometry."""
    geometry = findings.geometry
    if label_array is None:
        label_array = label_array_from_findings(findings.findings, geometry.shape_zyx)
    return Volume.from_geometry(label_array, geometry, {"content": "nodule labels (value = finding id)"})


def write_label_map(findings: ScanFindings | Sequence[NoduleFinding], geometry: Geometry | None, path: str | Path,
                    *, label_array: np.ndarray | None = None) -> Path:
    """Write the label map to ``path`` (``.nii.gz``, ``.nii`` or ``.nrrd``) on ``geometry`` (the scan's; taken
    from ``findings`` when it is a :class:`ScanFindings` and ``geometry`` is None). Atomic."""
    path = Path(path)
    if not any(path.name.lower().endswith(s) for s in LABEL_MAP_SUFFIXES):
        raise InputError(path, f"a label map is written as {', '.join(LABEL_MAP_SUFFIXES)}")
    if isinstance(findings, ScanFindings):
        geometry = geometry or findings.geometry
        items: Sequence[NoduleFinding] = findings.findings
    else:
        items = findings
    if geometry is None:
        raise ValueError("write_label_map needs the scan geometry")
    if label_array is None:
        label_array = label_array_from_findings(items, geometry.shape_zyx)
    return write_image(Volume.from_geometry(label_array, geometry), path)


def attach_masks_from_label_map(findings: ScanFindings, labels: Volume) -> ScanFindings:
    """Give every finding its mask back from a label map read from disk (``nodules.json`` has no masks).

    The label map must be on the findings' grid (shape exactly; origin within 1e-3 mm, which covers
    NIfTI's float32 rounding).
    """
    geometry = findings.geometry
    same_grid = (labels.shape_zyx == geometry.shape_zyx
                 and np.allclose(labels.spacing_zyx, geometry.spacing_zyx, atol=1e-5)
                 and np.allclose(labels.origin_xyz_mm, geometry.origin_xyz_mm, atol=1e-3)
                 and np.allclose(labels.direction, geometry.direction, atol=1e-5))
    if not same_grid:
        raise ValueError(f"label map grid {labels.geometry} does not match the findings' scan grid {geometry}")
    array = np.asarray(labels.array)
    boxes = ndimage.find_objects(array.astype(np.int64, copy=False)) if array.any() else []
    updated = []
    for f in findings.findings:
        box = boxes[f.id - 1] if f.id - 1 < len(boxes) else None
        mask = None if box is None else NoduleMask(array[box] == f.id, tuple(s.start for s in box))  # type: ignore[arg-type]
        updated.append(f.with_mask(mask))
    return replace(findings, findings=updated)
