"""Slow (``-m slow``, ~1-2 min): the shipped demo model's predict on LIDC-IDRI-0001 as the classic series and as
Enhanced CT multi-frame (uncompressed, JPEG-LS lossless, JPEG 2000 lossless) gives exactly the same findings,
and the SEG of an enhanced source references its frames. The HU arrays' equality is in the default suite
(test_io_dicom_formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from _dicom_writers import lidc_variants

from nodulenet.infer.cohort import Shard
from nodulenet.predict_api import predict_scans

pytestmark = pytest.mark.slow

VARIANTS = ("enhanced", "enhanced_jpegls", "enhanced_jpeg2000")


@pytest.fixture(scope="module")
def runs(lidc_0001_series: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("lidc_predict_variants")
    folders = {"classic": lidc_0001_series, **lidc_variants(lidc_0001_series, root / "in", classic_rle=False)}
    run = predict_scans(list(folders.values()), root / "out", shard=Shard(0, 1, 0))  # the shipped model
    out = {}
    for name, result in zip(folders, run.results):
        assert result.status == "done", f"{name}: {result.error}"
        out[name] = {"result": result, "dir": Path(result.out_dir),
                     "nodules": json.loads((Path(result.out_dir) / "nodules.json").read_text())}
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_findings_as_the_classic_series(runs: dict[str, dict], variant: str) -> None:
    classic, other = runs["classic"]["nodules"], runs[variant]["nodules"]
    assert classic["findings"], "the demo model finds the LUNA16 nodules of LIDC-IDRI-0001"
    assert other["geometry"] == classic["geometry"]
    keys = ("score", "center_world_xyz_mm", "center_zyx", "box_zyx", "diameter_mm", "volume_mm3", "mean_hu", "side")
    assert [{k: f[k] for k in keys} for f in other["findings"]] == \
        [{k: f[k] for k in keys} for f in classic["findings"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_seg_and_sr_reference_the_enhanced_instance(runs: dict[str, dict], variant: str) -> None:
    folder = runs[variant]["dir"]
    source_file = runs[variant]["result"].scan
    source = pydicom.dcmread(next(Path(source_file).glob("*.dcm")), stop_before_pixels=True)
    seg = pydicom.dcmread(folder / "seg.dcm")
    refs = {(str(s.ReferencedSOPInstanceUID), int(s.ReferencedFrameNumber))
            for f in seg.PerFrameFunctionalGroupsSequence for d in f.DerivationImageSequence
            for s in d.SourceImageSequence}
    assert refs and {uid for uid, _ in refs} == {str(source.SOPInstanceUID)}
    # the classic run's SEG covers the same slices: classic slice z is frame 133 - z here
    classic_seg = pydicom.dcmread(runs["classic"]["dir"] / "seg.dcm")
    from nodulenet.io.dicom import read_dicom_series

    z_of_uid = {u: z for z, u in enumerate(read_dicom_series(Path(runs["classic"]["result"].scan))
                                           .meta["sop_instance_uids"])}
    classic_z = {z_of_uid[str(s.ReferencedSOPInstanceUID)] for f in classic_seg.PerFrameFunctionalGroupsSequence
                 for d in f.DerivationImageSequence for s in d.SourceImageSequence}
    assert {frame for _, frame in refs} == {133 - z for z in classic_z}
    assert pydicom.dcmread(folder / "sr.dcm").Modality == "SR"
