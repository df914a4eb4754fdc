"""Slow end-to-end check (``-m slow``): a real LIDC-IDRI DICOM series through predict.

The test uses a tiny network with RANDOM weights: it checks the DICOM plumbing only (SEG + SR written and
referencing the input series, label map on the DICOM grid), never detection quality. The README's demo with the
shipped model is tested in ``test_demo_shipped.py`` (default suite).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nodulenet.infer.cohort import Shard
from nodulenet.io.findings import read_findings_json
from nodulenet.io.image_files import read_image
from nodulenet.model import NoduleNet, NoduleNetConfig, to_checkpoint_dict
from nodulenet.predict_api import PredictOptions, predict_scans

pytestmark = pytest.mark.slow


def test_lidc_dicom_series_gets_seg_and_sr_on_its_own_grid(lidc_0001_series, tmp_path):
    import pydicom

    config = dataclasses.replace(NoduleNetConfig().scaled(0.125, name="test-eighth"), rpn_test_pre_nms_top_n=64,
                                 rpn_test_post_nms_top_n=3)
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(to_checkpoint_dict(NoduleNet(config), config), weights)
    run = predict_scans([lidc_0001_series], tmp_path / "out", PredictOptions(weights=weights, threshold=0.0),
                        shard=Shard(0, 1, 0))
    (result,) = run.results
    assert result.status == "done", result.error
    assert result.name == "LIDC-IDRI-0001_20603192"
    folder = tmp_path / "out" / result.name
    assert {p.name for p in folder.iterdir()} == {"nodules.json", "candidates.csv", "labels.nii.gz", "seg.dcm",
                                                  "sr.dcm", "report.html"}
    findings = read_findings_json(folder / "nodules.json")
    assert findings.geometry.shape_zyx == (133, 512, 512)
    labels = read_image(folder / "labels.nii.gz")
    assert labels.shape_zyx == findings.geometry.shape_zyx
    np.testing.assert_allclose(labels.origin_xyz_mm, findings.geometry.origin_xyz_mm, atol=1e-3)
    seg = pydicom.dcmread(folder / "seg.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == findings.source.series_instance_uid
    assert pydicom.dcmread(folder / "sr.dcm").Modality == "SR"
