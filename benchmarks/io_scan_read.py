"""Time reading the real LIDC-IDRI series (DICOM) and writing/reading them in each image format.

Run: ``.venv/bin/python benchmarks/io_scan_read.py [--quick]`` (``--quick``: LIDC-IDRI-0001 only, one
repeat, no format round trips). Reads run with a warm page cache after the first (the first is reported
separately); the machine's load average is recorded because the build machines are shared.

``--dicom-variants``: LIDC-IDRI-0001 converted (as the tests do, ``tests/_dicom_writers.py``) to Enhanced CT
multi-frame uncompressed / JPEG-LS lossless / JPEG 2000 lossless and to classic RLE slices, each read as many
times as the classic series, interleaved round by round so that load on the machine hits all alike; the
ratios to the classic read are recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lidc_series  # noqa: E402
from _record import machine_info, peak_rss_mib, record  # noqa: E402

from nodulenet.io.dicom import read_dicom_series  # noqa: E402
from nodulenet.io.image_files import read_image, write_image  # noqa: E402

FORMATS = [("nii.gz", None), ("nii", None), ("nrrd", None), ("mhd", False), ("mhd", True), ("mha", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dicom-variants", action="store_true", help="time Enhanced CT / JPEG-LS / JPEG 2000 / "
                                                                       "RLE reads of LIDC-IDRI-0001 vs the classic")
    args = parser.parse_args()
    if args.dicom_variants:
        dicom_variants(5 if not args.quick else 1)
        return
    repeats = 1 if args.quick else 5
    patients = ["LIDC-IDRI-0001"] if args.quick else ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    figures: dict[str, object] = {"load_average_1min_before": os.getloadavg()[0], "repeats": repeats}
    for patient in patients:
        folder = lidc_series(patient)
        times, cpu_times = [], []
        for _ in range(repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            volume = read_dicom_series(folder)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        key = patient.lower().replace("-", "_")
        figures[f"{key}_shape_zyx"] = list(volume.shape_zyx)
        figures[f"{key}_dicom_read_first_s"] = round(times[0], 3)
        figures[f"{key}_dicom_read_median_s"] = round(statistics.median(times[1:]), 3)
        # CPU seconds of this process: less sensitive than wall time to other jobs on a shared machine.
        figures[f"{key}_dicom_read_median_cpu_s"] = round(statistics.median(cpu_times[1:]), 3)
        print(f"{patient}: {volume.shape_zyx} DICOM read first {times[0]:.2f} s, "
              f"median of {repeats} warm {statistics.median(times[1:]):.2f} s wall, "
              f"{statistics.median(cpu_times[1:]):.2f} s CPU")
        if args.quick or patient != "LIDC-IDRI-0001":
            continue
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
            for suffix, compress in FORMATS:
                label = f"{suffix}{'-zraw' if compress else ''}"
                path = Path(tmp) / f"scan.{suffix}"
                t0 = time.perf_counter()
                write_image(volume, path, compress=compress)
                t1 = time.perf_counter()
                read_image(path)
                t2 = time.perf_counter()
                size = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.name.startswith("scan."))
                for p in Path(tmp).iterdir():
                    p.unlink()
                figures[f"{key}_{label}_write_s"] = round(t1 - t0, 3)
                figures[f"{key}_{label}_read_s"] = round(t2 - t1, 3)
                figures[f"{key}_{label}_mib"] = round(size / 2**20, 1)
                print(f"  {label:9s} write {t1 - t0:5.2f} s  read {t2 - t1:5.2f} s  {size / 2**20:6.1f} MiB")
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    figures["load_average_1min_after"] = os.getloadavg()[0]
    figures["cpu"] = machine_info()["cpu"]
    record("io_scan_read" + ("_quick" if args.quick else ""), figures)


def dicom_variants(repeats: int) -> None:
    """Read LIDC-IDRI-0001 classic vs its Enhanced CT / compressed variants, ``repeats`` interleaved rounds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _dicom_writers import lidc_variants  # the tests' converters: one way to make the variants

    import numpy as np

    figures: dict[str, object] = {"load_average_1min_before": os.getloadavg()[0], "repeats": repeats}
    folder = lidc_series("LIDC-IDRI-0001")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folders = {"classic": folder, **lidc_variants(folder, Path(tmp))}
        figures["convert_s"] = round(time.perf_counter() - t0, 1)
        sizes = {name: sum(p.stat().st_size for p in Path(f).glob("*.dcm")) / 2**20 for name, f in folders.items()}
        reference = read_dicom_series(folder).array
        times: dict[str, list[float]] = {name: [] for name in folders}
        cpu: dict[str, list[float]] = {name: [] for name in folders}
        for _ in range(repeats + 1):  # round 0 warms the page cache and is not counted
            for name, path in folders.items():
                t, c = time.perf_counter(), time.process_time()
                volume = read_dicom_series(path)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
                assert np.array_equal(volume.array, reference), f"{name}: HU differ from the classic read"
        base_wall, base_cpu = statistics.median(times["classic"][1:]), statistics.median(cpu["classic"][1:])
        for name in folders:
            wall, proc = statistics.median(times[name][1:]), statistics.median(cpu[name][1:])
            figures[f"{name}_read_median_s"] = round(wall, 3)
            figures[f"{name}_read_median_cpu_s"] = round(proc, 3)
            figures[f"{name}_cpu_ratio_to_classic"] = round(proc / base_cpu, 2)
            figures[f"{name}_mib"] = round(sizes[name], 1)
            print(f"{name:18s} {wall:6.2f} s wall  {proc:6.2f} s CPU  x{proc / base_cpu:5.2f} CPU vs classic  "
                  f"({wall / base_wall:5.2f} wall)  {sizes[name]:6.1f} MiB")
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    figures["load_average_1min_after"] = os.getloadavg()[0]
    figures["cpu"] = machine_info()["cpu"]
    record("io_dicom_variants_read", figures)


if __name__ == "__main__":
    main()
