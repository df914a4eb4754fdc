"""Time putting the real LIDC-IDRI-0001 scan into canonical orientation, stored each way a user hands it over.

Run: ``.venv/bin/python benchmarks/orientation.py [--repeats N]``. For each stored orientation (the DICOM
series' own LPS, dcm2niix-like RAS/LAS, sagittal PIL, and an oblique grid rotated 20 degrees about z) it times
:func:`nodulenet.io.orientation.canonical_orientation` (after the padding fill) and the 1 mm resampling that follows it in
:func:`nodulenet.preprocess.prepare.make_network_input`, so the orientation step can be read against the stage it
precedes. CPU and wall seconds are medians; the machine's load average is recorded because the build machines are
shared.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lidc_series, median_seconds  # noqa: E402
from _record import peak_rss_mib, record  # noqa: E402

from nodulenet.io.dicom import read_dicom_series  # noqa: E402
from nodulenet.io.orientation import canonical_orientation  # noqa: E402
from nodulenet.io.volume import Volume  # noqa: E402
from nodulenet.preprocess.config import PrepareConfig  # noqa: E402
from nodulenet.preprocess.prepare import fill_scanner_padding  # noqa: E402
from nodulenet.preprocess.resample import resample_volume, volume_to_sitk  # noqa: E402



def _from_sitk(image: sitk.Image) -> Volume:
    return Volume(sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing())), image.GetOrigin(),
                  image.GetDirection())


def _oblique(image: sitk.Image, degrees: float) -> sitk.Image:
    a = math.radians(degrees)
    rotation = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    size, spacing = np.asarray(image.GetSize(), dtype=float), np.asarray(image.GetSpacing())
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    origin = centre - rotation @ (spacing * (size - 1) / 2)
    return sitk.Resample(image, image.GetSize(), sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         spacing.tolist(), rotation.reshape(-1).tolist(), -1000.0, sitk.sitkInt16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dicom = read_dicom_series(lidc_series("LIDC-IDRI-0001"))
    image = volume_to_sitk(dicom)
    config = PrepareConfig()
    stored = {"LPS (DICOM)": dicom, **{code: _from_sitk(sitk.DICOMOrient(image, code)) for code in ("RAS", "LAS",
                                                                                                    "PIL")},
              "oblique 20 deg": _from_sitk(_oblique(image, 20.0))}
    figures: dict[str, object] = {"load_average_1min_before": os.getloadavg()[0], "repeats": args.repeats,
                                  "scan": "LIDC-IDRI-0001", "shape_zyx": list(dicom.shape_zyx), "cases": {}}
    print(f"{'stored as':16s} {'method':10s} {'orient s':>9s} {'cpu s':>7s} {'resample s':>11s} canonical shape")
    for name, volume in stored.items():
        filled = fill_scanner_padding(volume, config)
        wall, cpu, (canonical, reorientation) = median_seconds(lambda v=filled: canonical_orientation(v), args.repeats)
        resample_wall, _, _ = median_seconds(lambda c=canonical: resample_volume(c, config.spacing_zyx_mm, "linear"), 1)
        method = reorientation.summary()["method"]
        print(f"{name:16s} {method:10s} {wall:9.3f} {cpu:7.3f} {resample_wall:11.3f} {canonical.shape_zyx}")
        figures["cases"][name] = {"method": method, "orient_wall_s": round(wall, 3), "orient_cpu_s": round(cpu, 3),
                                  "resample_1mm_wall_s": round(resample_wall, 3),
                                  "canonical_shape_zyx": list(canonical.shape_zyx)}
        del filled, canonical
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    record("orientation", figures)


if __name__ == "__main__":
    main()
