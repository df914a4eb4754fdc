"""Results of ``nodulenet predict`` as files: nodules.json, LUNA-style candidates.csv, a NIfTI/NRRD label map,
DICOM SEG + Comprehensive 3D SR (TID 1500), a self-contained report.html; and the nodule measurements.

Everything is on the ORIGINAL scan grid (arrays ``(z, y, x)``, world LPS mm ``(x, y, z)``, see DESIGN.md).
The one-call entry point is :func:`export_all`. Importing ``nodulenet.export`` is cheap: modules (and
highdicom, matplotlib) load when a name is first used.
"""

from __future__ import annotations

from nodulenet.lazy import lazy_getattr

_LAZY = {
    "export_all": "nodulenet.export.api",
    "ExportResult": "nodulenet.export.api",
    "ExportSkipped": "nodulenet.export.dicom_source",
    "write_nodules_json": "nodulenet.export.tables",
    "write_candidates_csv": "nodulenet.export.tables",
    "write_label_map": "nodulenet.export.labelmap",
    "label_array_from_findings": "nodulenet.export.labelmap",
    "attach_masks_from_label_map": "nodulenet.export.labelmap",
    "write_dicom_seg": "nodulenet.export.dicom_seg",
    "write_dicom_sr": "nodulenet.export.dicom_sr",
    "write_report": "nodulenet.export.report",
    "measure_mask": "nodulenet.export.measurements",
    "finding_from_mask": "nodulenet.export.measurements",
    "findings_from_label_map": "nodulenet.export.measurements",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
