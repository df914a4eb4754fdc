"""Time each exporter on the real LIDC-IDRI-0001 series (512 x 512 x 133) with synthetic findings.

Findings: a 23.4 mm sphere at LUNA16's nodule of this series (world (56.21, 86.34, -115.87) mm) and, unless
``--quick``, a second 8 mm sphere elsewhere in the lungs. Reported per exporter: median wall seconds (and CPU
seconds, less sensitive to other jobs on a shared machine) over the repeats; export_all end to end; peak RSS.

Run: ``.venv/bin/python benchmarks/export_speed.py [--quick]`` (``--quick``: one finding, one repeat).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import highdicom  # noqa: E402
from _common import lidc_series, median_seconds  # noqa: E402
from _masks import sphere_mask  # noqa: E402
from _record import peak_rss_mib, record  # noqa: E402

from nodulenet.export.api import export_all  # noqa: E402
from nodulenet.export.dicom_seg import build_dicom_seg  # noqa: E402
from nodulenet.export.dicom_source import read_source_headers, save_dataset  # noqa: E402
from nodulenet.export.dicom_sr import build_dicom_sr  # noqa: E402
from nodulenet.export.labelmap import label_array_from_findings, write_label_map  # noqa: E402
from nodulenet.export.measurements import finding_from_mask  # noqa: E402
from nodulenet.export.report import write_report  # noqa: E402
from nodulenet.export.tables import write_candidates_csv, write_nodules_json  # noqa: E402
from nodulenet.io.dicom import read_dicom_series  # noqa: E402
from nodulenet.io.findings import ModelInfo, ScanFindings, ScanSource  # noqa: E402

LUNA_NODULE_WORLD = (56.21, 86.34, -115.87)
LUNA_NODULE_DIAMETER_MM = 23.4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    figures: dict[str, Any] = {"load_average_1min_before": os.getloadavg()[0], "repeats": repeats,
                               "highdicom": highdicom.__version__}

    t0 = time.perf_counter()
    hu = read_dicom_series(lidc_series("LIDC-IDRI-0001"))
    figures["dicom_read_s"] = round(time.perf_counter() - t0, 3)
    figures["shape_zyx"] = list(hu.shape_zyx)
    t0 = time.perf_counter()
    findings = [finding_from_mask(1, 0.93, sphere_mask(hu, LUNA_NODULE_WORLD, LUNA_NODULE_DIAMETER_MM), hu)]
    if not args.quick:
        second = tuple(float(v) for v in hu.voxel_to_world((60, 200, 150)))
        findings.append(finding_from_mask(2, 0.41, sphere_mask(hu, second, 8.0), hu))  # type: ignore[arg-type]
    figures["measure_s_per_finding"] = round((time.perf_counter() - t0) / len(findings), 4)
    figures["num_findings"] = len(findings)
    scan = ScanFindings(ScanSource.from_volume_meta(hu.meta), hu.geometry, findings, ModelInfo(version="bench"),
                        threshold=0.3)
    first = findings[0]
    figures["nodule1"] = {"diameter_mm": round(first.diameter_mm, 3), "equivalent_diameter_mm":
                          round(first.equivalent_diameter_mm, 3), "volume_mm3": round(first.volume_mm3, 1)}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        labels = label_array_from_findings(scan.findings, hu.shape_zyx)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("nodules_json", lambda: write_nodules_json(scan, tmp / "nodules.json")),
            ("candidates_csv", lambda: write_candidates_csv(scan, tmp / "candidates.csv")),
            ("label_array", lambda: label_array_from_findings(scan.findings, hu.shape_zyx)),
            ("label_map_nii_gz", lambda: write_label_map(scan, None, tmp / "labels.nii.gz", label_array=labels)),
            ("label_map_nrrd", lambda: write_label_map(scan, None, tmp / "labels.nrrd", label_array=labels)),
            ("dicom_headers", lambda: read_source_headers(hu)),
        ]
        for name, fn in steps:
            wall, cpu, value = median_seconds(fn, repeats)
            figures[f"{name}_s"], figures[f"{name}_cpu_s"] = round(wall, 4), round(cpu, 4)
            if name == "dicom_headers":
                headers = value
        wall, cpu, seg = median_seconds(lambda: build_dicom_seg(scan, labels, headers), repeats)
        figures["dicom_seg_build_s"], figures["dicom_seg_build_cpu_s"] = round(wall, 4), round(cpu, 4)
        wall, cpu, _ = median_seconds(lambda: save_dataset(seg, tmp / "seg.dcm"), repeats)
        figures["dicom_seg_save_s"] = round(wall, 4)
        figures["seg_bytes"] = (tmp / "seg.dcm").stat().st_size
        wall, cpu, sr = median_seconds(lambda: build_dicom_sr(scan, seg, headers), repeats)
        figures["dicom_sr_build_s"], figures["dicom_sr_build_cpu_s"] = round(wall, 4), round(cpu, 4)
        wall, cpu, _ = median_seconds(lambda: save_dataset(sr, tmp / "sr.dcm"), repeats)
        figures["dicom_sr_save_s"] = round(wall, 4)
        figures["sr_bytes"] = (tmp / "sr.dcm").stat().st_size
        wall, cpu, _ = median_seconds(lambda: write_report(scan, hu, labels, tmp / "report.html"), repeats)
        figures["report_html_s"], figures["report_html_cpu_s"] = round(wall, 4), round(cpu, 4)
        figures["report_bytes"] = (tmp / "report.html").stat().st_size
        wall, cpu, result = median_seconds(lambda: export_all(scan, hu, tmp / "all"), repeats)
        figures["export_all_s"], figures["export_all_cpu_s"] = round(wall, 4), round(cpu, 4)
        figures["export_all_files"] = sorted(result.files)
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    for key, value in figures.items():
        print(f"{key}: {value}")
    record("export_speed", figures)


if __name__ == "__main__":
    main()
