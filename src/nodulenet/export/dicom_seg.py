"""DICOM Segmentation (SEG) of the findings, for a scan read from a DICOM series (written with highdicom).

One BINARY segment per finding: segment number = finding id = label-map value, label "Nodule <id>",
property category/type SNOMED CT "Morphologically Abnormal Structure" / "Nodule", anatomic region "Lung",
algorithm type AUTOMATIC identified as "NoduleNet" + version, tracking id "Nodule <id>" with a fresh
tracking UID (the SR's measurement groups carry the same UID). Frame i of the label array (``(z, y, x)``, the
scan's own grid) is derived from source slice i, i.e. ``volume.meta["source_files"][i]``, which the DICOM
reader lists in the array's z order. Only frames holding nodule voxels are stored. For a multi-frame (Enhanced
CT) source the label slices are put in the source's frame order first, so that each SEG frame references its
source frame (``ReferencedFrameNumber``).

The source slices' headers are read again (no pixel data, see :mod:`nodulenet.export.dicom_source`).

Inputs that are not DICOM (NIfTI, MetaImage, NRRD) or scans without findings raise :class:`ExportSkipped`,
whose ``reason`` the orchestrator reports as "skipped (...)". A DICOM SEG needs at least one segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from nodulenet.export.dicom_source import (
    MODEL_NAME,
    ExportSkipped,
    algorithm_version,
    labels_on_source_slices,
    new_series_attributes,
    read_source_headers,
    require_dicom_source,
    save_dataset,
    source_frame_order,
)
from nodulenet.io.findings import ScanFindings
from nodulenet.io.volume import Volume

__all__ = ["ExportSkipped", "build_dicom_seg", "write_dicom_seg"]

SEG_SERIES_NUMBER = 9001
SEG_SERIES_DESCRIPTION = "NoduleNet nodules (research, not diagnostic)"
# Display colour of every nodule segment: the red of the project's overlays (#ff1744).
NODULE_COLOUR_RGB = (255, 23, 68)


def _segment_descriptions(findings: ScanFindings) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MODEL_NAME, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version(findings),
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=f.id,
            segment_label=f"Nodule {f.id}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"Nodule {f.id}",
            anatomic_regions=[codes.SCT.Lung],
            display_color=hd.color.CIELabColor.from_rgb(*NODULE_COLOUR_RGB),
        )
        for f in sorted(findings.findings, key=lambda f: f.id)
    ]


def build_dicom_seg(findings: ScanFindings, label_array: np.ndarray, source_headers: Sequence[Dataset],
                    frame_order: Sequence[int] | None = None) -> hd.seg.Segmentation:
    """The SEG dataset for ``label_array`` (``(z, y, x)``, value = finding id, frame i from slice i).

    ``frame_order`` (:func:`~nodulenet.export.dicom_source.source_frame_order`): for one multi-frame source,
    the z index of each of its frames in frame order.
    """
    if not findings.findings:
        raise ExportSkipped("DICOM SEG", "no findings (a DICOM SEG needs at least one segment)")
    first = source_headers[0]
    if frame_order is not None:
        label_array = label_array[np.asarray(frame_order)]
    frames = len(source_headers) if frame_order is None else int(first.get("NumberOfFrames") or 1)
    expected = (frames, int(first.Rows), int(first.Columns))
    if tuple(label_array.shape) != expected:
        raise ValueError(f"label array {label_array.shape} does not match the source series {expected} "
                         "(slices, rows, columns)")
    if label_array.max(initial=0) > len(findings.findings):
        raise ValueError("the label array holds values that are not finding ids")
    return hd.seg.Segmentation(
        source_images=list(source_headers),
        pixel_array=label_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(findings),
        **new_series_attributes(SEG_SERIES_NUMBER, SEG_SERIES_DESCRIPTION),
        manufacturer_model_name=MODEL_NAME,
        software_versions=findings.nodulenet_version,
        device_serial_number=(findings.model.weights_sha256 or "unknown")[:16],
        content_label="NODULES",
        content_description="NoduleNet lung nodules - research software, not for diagnosis",
        omit_empty_frames=True,
    )


def write_dicom_seg(findings: ScanFindings, hu: Volume, path: str | Path, *, label_array: np.ndarray | None = None,
                    source_headers: Sequence[Dataset] | None = None) -> Path:
    """Write ``seg.dcm`` for a scan read from DICOM (``hu`` as returned by the reader, meta included).

    ``label_array`` defaults to the findings' masks painted on the scan grid. Raises :class:`ExportSkipped`
    for non-DICOM input or no findings.
    """
    from nodulenet.export.labelmap import label_array_from_findings

    require_dicom_source(hu, "DICOM SEG")  # not DICOM is the reason to give first, even with no findings
    if not findings.findings:
        raise ExportSkipped("DICOM SEG", "no findings (a DICOM SEG needs at least one segment)")
    headers = list(source_headers) if source_headers is not None else read_source_headers(hu, "DICOM SEG")
    if label_array is None:
        label_array = label_array_from_findings(findings.findings, findings.geometry.shape_zyx)
    label_array = labels_on_source_slices(hu, label_array, headers)
    return save_dataset(build_dicom_seg(findings, label_array, headers, source_frame_order(hu)), path)
