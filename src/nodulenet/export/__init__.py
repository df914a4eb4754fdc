"""Results of ``nodulenet predict`` as files: nodules.json, LUNA-style candidates.csv, a NIfTI/NRRD label map,
DICOM SEG + Comprehensive 3D SR (TID 1500), a self-contained report.html; and the nodule measurements.

Everything is on the ORIGINAL scan grid (arrays ``(z, y, x)``, world LPS mm ``(x, y, z)``, see DESIGN.md).
The one-call entry point is :func:`export_all`. Importing ``nodulenet.export`` is cheap: modules (and
highdicom, matplotlib) load when a name is first used.
"""

from __future__ import annotations

from nodulenet.lazy import by_module, lazy_getattr

_LAZY = by_module({
    "nodulenet.export.api": ("export_all", "ExportResult"),
    "nodulenet.export.dicom_source": ("ExportSkipped",),
    "nodulenet.export.tables": ("write_nodules_json", "write_candidates_csv"),
    "nodulenet.export.labelmap": ("write_label_map", "label_array_from_findings", "attach_masks_from_label_map"),
    "nodulenet.export.dicom_seg": ("write_dicom_seg",),
    "nodulenet.export.dicom_sr": ("write_dicom_sr",),
    "nodulenet.export.report": ("write_report",),
    "nodulenet.export.measurements": ("measure_mask", "finding_from_mask", "findings_from_label_map"),
})

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
