"""report.html: self-contained, disclaimer, table values, escaped input strings, embedded pictures."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodulenet.export.measurements import finding_from_mask
from nodulenet.export.report import DISCLAIMER, LIDC_CREDIT, write_report
from nodulenet.io.findings import ModelInfo, NoduleMask, ScanFindings, ScanSource
from nodulenet.io.volume import Geometry, Volume

HOSTILE = '<script>alert("x")</script> & Co'


def _phantom(patient_id: str, patient_name: str) -> tuple[ScanFindings, Volume]:
    """A 'chest': soft tissue block with two air lungs, one solid 'nodule' ball in the left lung."""
    geometry = Geometry((30, 96, 128), (2.0, 1.0, 1.0), (-64.0, -48.0, -30.0))
    hu = np.full(geometry.shape_zyx, -1000, np.int16)
    hu[:, 10:86, 8:120] = 40
    hu[:, 20:76, 16:60] = -850  # patient's right lung (low x)
    hu[:, 20:76, 68:112] = -850  # patient's left lung (high x)
    z, y, x = np.mgrid[0:30, 0:96, 0:128]
    ball = ((z - 15) * 2.0) ** 2 + (y - 48.0) ** 2 + (x - 90.0) ** 2 <= 36
    hu[ball] = 25
    volume = Volume.from_geometry(hu, geometry, {"source_path": f"/data/{patient_id}", "format": "nifti",
                                                 "patient_id": patient_id, "patient_name": patient_name})
    crop = ball[10:21, 40:57, 82:99]
    finding = finding_from_mask(1, 0.876, NoduleMask(crop, (10, 40, 82)), volume)
    scan = ScanFindings(ScanSource.from_volume_meta(volume.meta), geometry, [finding],
                        ModelInfo(version="2.0", weights_sha256="e3" * 32), threshold=0.5)
    return scan, volume


def _images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_content(tmp_path: Path) -> None:
    scan, hu = _phantom("LIDC-IDRI-0999", HOSTILE)
    path = write_report(scan, hu, None, tmp_path / "report.html")
    html = path.read_text(encoding="utf-8")
    assert DISCLAIMER in html and "not a medical device" in html
    # Hostile input is shown as text, never as markup.
    assert "<script>" not in html and "alert(&quot;x&quot;)" in html and "&lt;script&gt;" in html
    assert "&amp; Co" in html
    # Table values, rounded as displayed (a 6 mm-radius ball: 12 mm across).
    f = scan.by_id(1)
    row = re.search(r"<tr><td>1</td>(.*?)</tr>", html, re.S)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert cells[0] == "0.876"
    assert cells[1] == f"{f.diameter_mm:.1f}" and 12.0 <= f.diameter_mm <= 12.0 + np.sqrt(2)  # type: ignore[operator]
    assert cells[3] == f"{f.volume_mm3:.0f}" and cells[4] == "25"
    assert cells[5] == "(26.0, 0.0, 0.0)"  # world centre: x = -64 + 90, y = -48 + 48, z = -30 + 15 x 2
    assert cells[6] == "(15.0, 48.0, 90.0)" and cells[7] == "left lung"
    # Non-DICOM: the centre slice by its 1-based number and its world z (z = -30 + 15 x 2 mm).
    assert cells[8] == f"slice 16 of {hu.shape_zyx[0]} (z 0.0 mm)"
    assert LIDC_CREDIT in html  # patient id starts with LIDC-IDRI
    # Self-contained: no external resource, no script.
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html.lower()
    images = _images(html)
    # The whole-slice overview beside the zoomed crops.
    assert len(images) == 2 and all(i.format == "PNG" for i in images) and images[1].size[0] >= 600
    assert images[0].size[0] >= hu.shape_zyx[2]


def test_no_credit_for_other_scans_and_no_findings_message(tmp_path: Path) -> None:
    scan, hu = _phantom("PATIENT-7", "Doe^Jane")
    empty = ScanFindings(scan.source, scan.geometry, [], threshold=0.5)
    html = write_report(empty, hu, np.zeros(hu.shape_zyx, np.uint8), tmp_path / "r.html").read_text()
    assert LIDC_CREDIT not in html and DISCLAIMER in html
    assert "No nodule was found with a score of at least 0.5." in html and not _images(html)
    forced = write_report(empty, hu, None, tmp_path / "r2.html", lidc=True).read_text()
    assert LIDC_CREDIT in forced


def test_label_map_must_be_on_the_grid(tmp_path: Path) -> None:
    scan, hu = _phantom("P", "N")
    with pytest.raises(ValueError, match="not on the scan grid"):
        write_report(scan, hu, np.zeros((2, 2, 2), np.uint8), tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
