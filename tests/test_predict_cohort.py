"""``nodulenet predict`` end to end on phantom scans, with a tiny network with RANDOM weights.

Random weights make the detections meaningless, so only plumbing is asserted here: every output is written and
aligned with the input scan, a broken scan does not stop the cohort, errors are clear, output folders are
never left half-written. Detection quality is not asserted anywhere in this file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.export.labelmap import attach_masks_from_label_map
from nodulenet.infer.cohort import Shard
from nodulenet.infer.weights import NoShippedModelError
from nodulenet.io.findings import read_findings_json
from nodulenet.io.image_files import read_image
from nodulenet.model import NoduleNet, NoduleNetConfig, to_checkpoint_dict
from nodulenet.predict_api import PredictOptions, Predictor, ScanPrediction, predict_scans
from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

SMALL_FLIPPED = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                              slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0),
                              flip_xyz=(True, False, True))
# Few proposals keep NMS and the mask head cheap on a random network (about half its anchors score > 0.5).
TEST_NET = dataclasses.replace(NoduleNetConfig().scaled(0.125, name="test-eighth"), rpn_test_pre_nms_top_n=64,
                               rpn_test_post_nms_top_n=4)


def _save_checkpoint(path: Path, config: NoduleNetConfig, weights_config: NoduleNetConfig | None = None) -> Path:
    torch.manual_seed(0)
    d = to_checkpoint_dict(NoduleNet(weights_config or config), weights_config or config,
                           extra={"prepare_config": {"overlay": False, "crop_margin_voxels": 4}})
    d["config"] = config.to_dict()
    torch.save(d, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    scan_a = write_phantom(root / "a", 1, SMALL_FLIPPED)["scan"]
    scan_b = write_phantom(root / "b", 2, SMALL_FLIPPED)["scan"]
    broken = root / "broken" / "scan.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(scan_a.read_bytes()[:5000])  # a truncated download
    listing = root / "cohort.txt"
    listing.write_text(f"# two good scans and a broken one\n{scan_a}\nbroken/scan.nii.gz\n\nb/scan.nii.gz\n")
    weights = _save_checkpoint(root / "tiny.pt", TEST_NET)
    out = root / "out"
    run = predict_scans([listing], out, PredictOptions(weights=weights, threshold=0.0),
                        shard=Shard(rank=0, world_size=1, local_rank=0))
    return {"root": root, "scans": [scan_a, broken, scan_b], "listing": listing, "weights": weights, "out": out,
            "run": run}


def test_one_broken_scan_does_not_stop_the_cohort(data):
    run = data["run"]
    assert [r.status for r in run.results] == ["done", "failed", "done"]
    assert [r.name for r in run.results] == ["a_scan", "broken_scan", "b_scan"]
    failed = run.results[1]
    assert failed.error is not None and str(data["scans"][1]) in failed.error
    assert failed.traceback is None  # a user error is one clear line, not a traceback
    assert not (data["out"] / "broken_scan" / "nodules.json").exists()
    summary = json.loads(run.summary_path.read_text())
    assert (summary["n_scans"], summary["done"], summary["failed"]) == (3, 2, 1)
    assert summary["scans"][1]["error"] == failed.error


def test_every_output_is_written_and_nothing_else_is_left(data):
    for name in ("a_scan", "b_scan"):
        folder = data["out"] / name
        assert sorted(p.name for p in folder.iterdir()) == ["candidates.csv", "labels.nii.gz", "nodules.json",
                                                            "report.html"]
    result = data["run"].results[0]
    assert "not DICOM" in result.details["skipped_outputs"]["dicom_seg"]
    # auto precision is fp32 (bf16 moves scores across the threshold); recorded with the runtime.
    expected = "fp32"
    assert result.details["tiles"] == 1 and result.details["precision"] == expected
    model = read_findings_json(data["out"] / "a_scan" / "nodules.json").model
    assert (model.runtime, model.precision) == ("torch", expected)
    assert set(result.stage_seconds) == {"read_s", "preprocess_s", "network_s", "postprocess_s", "export_s"}


def test_outputs_are_aligned_with_the_input_scan(data):
    scan = read_image(data["scans"][0])
    folder = data["out"] / "a_scan"
    labels = read_image(folder / "labels.nii.gz")
    assert labels.shape_zyx == scan.shape_zyx
    np.testing.assert_allclose(labels.spacing_zyx, scan.spacing_zyx)
    np.testing.assert_allclose(labels.origin_xyz_mm, scan.origin_xyz_mm, atol=1e-4)
    np.testing.assert_allclose(labels.direction, scan.direction, atol=1e-6)  # the flip survives
    findings = read_findings_json(folder / "nodules.json")
    assert findings.geometry == scan.geometry
    assert 1 <= len(findings.findings) <= TEST_NET.rpn_test_post_nms_top_n
    for f in findings.findings:
        np.testing.assert_allclose(scan.voxel_to_world(f.center_zyx), f.center_world_xyz_mm, atol=1e-6)
        where = np.argwhere(labels.array == f.id)
        if len(where):  # a later finding may cover an earlier one's voxels in the label map
            lo, hi = where.min(axis=0), where.max(axis=0) + 1
            assert np.all(lo >= f.box_zyx[:3]) and np.all(hi <= f.box_zyx[3:])
            assert f.voxel_count >= len(where)
    rows = (folder / "candidates.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(findings.findings)


def test_run_records_its_settings_and_uses_the_checkpoint_preprocessing(data):
    recorded = json.loads((data["out"] / "predict_config.json").read_text())
    assert recorded["prepare_config_source"] == "checkpoint"
    assert recorded["prepare_config"]["crop_margin_voxels"] == 4
    assert recorded["network_config"]["name"] == "test-eighth"
    assert recorded["options"]["threshold"] == 0.0
    findings = read_findings_json(data["out"] / "a_scan" / "nodules.json")
    assert findings.model.weights_sha256 == recorded["model"]["weights_sha256"]


def test_rerun_skips_complete_scans_and_retries_failed_ones(data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(data["out"], out)
    run = predict_scans([data["listing"]], out, PredictOptions(weights=data["weights"], threshold=0.0),
                        shard=Shard(0, 1, 0))
    assert [r.status for r in run.results] == ["skipped", "failed", "skipped"]
    # A different threshold is a different result, so the complete folder no longer counts as done.
    assert not Predictor(PredictOptions(weights=data["weights"], threshold=0.5)).is_complete(out / "a_scan")


def test_torchrun_rank_takes_its_share_and_writes_its_own_summary(data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(data["out"], out)
    run = predict_scans([data["listing"]], out, PredictOptions(weights=data["weights"], threshold=0.0),
                        shard=Shard(rank=1, world_size=2, local_rank=1))
    assert [(r.index, r.name, r.status) for r in run.results] == [(1, "broken_scan", "failed")]
    assert run.summary_path.name == "summary.rank1.json"
    assert json.loads(run.summary_path.read_text())["n_scans"] == 1


def _stored_prediction(folder: Path) -> ScanPrediction:
    """A prediction rebuilt from a finished output folder (findings + masks), to re-export without the network."""
    findings = attach_masks_from_label_map(read_findings_json(folder / "nodules.json"),
                                           read_image(folder / "labels.nii.gz"))
    return ScanPrediction(findings=findings, stage_seconds={}, details={})


def test_failed_export_leaves_the_previous_complete_output_untouched(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(data["out"], out)
    before = {p.name: p.read_bytes() for p in (out / "a_scan").iterdir()}
    stored = _stored_prediction(out / "a_scan")
    monkeypatch.setattr(Predictor, "predict_volume", lambda self, ct: stored)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nodulenet.export.api.write_report", disk_full)
    run = predict_scans([data["scans"][0]], out, PredictOptions(weights=data["weights"], threshold=0.0, redo=True),
                        shard=Shard(0, 1, 0))
    (result,) = run.results
    assert result.status == "failed" and "No space left on device" in result.error
    assert {p.name: p.read_bytes() for p in (out / "a_scan").iterdir()} == before


def test_failure_before_export_writes_no_output_folder(data, tmp_path, monkeypatch):
    def network_crash(*args, **kwargs):
        raise RuntimeError("simulated crash in the network")

    monkeypatch.setattr("nodulenet.infer.network.run_network", network_crash)
    out = tmp_path / "out"
    run = predict_scans([data["scans"][0]], out, PredictOptions(weights=data["weights"]), shard=Shard(0, 1, 0))
    (result,) = run.results
    assert result.status == "failed" and "RuntimeError: simulated crash" in result.error
    assert "network_crash" in result.traceback  # an unexpected error keeps its traceback for the bug report
    assert not (out / "a_scan").exists()


def test_max_memory_makes_the_scan_run_in_tiles(data, tmp_path, monkeypatch):
    from nodulenet.infer.tiling import DEFAULT_OVERLAP, estimate_bytes

    # The limit is for the whole process; pretend it holds nothing yet so the budget is exactly the limit.
    monkeypatch.setattr("nodulenet.infer.tiling.current_rss_bytes", lambda: 0.0)
    z, y, x = data["run"].results[0].details["preprocessed_shape_zyx"]
    half_x_tile = estimate_bytes(TEST_NET, (z, y, x // 2 + 1 + DEFAULT_OVERLAP))
    options = PredictOptions(weights=data["weights"], threshold=0.0, max_memory_gb=half_x_tile / 2**30)
    run = predict_scans([data["scans"][0]], tmp_path / "out", options, shard=Shard(0, 1, 0))
    (result,) = run.results
    assert result.status == "done", result.error
    assert result.details["tiles"] >= 2
    assert result.details["network_budget_gib"] == pytest.approx(half_x_tile / 2**30, rel=1e-3)
    assert (Path(result.out_dir) / "nodules.json").is_file()

    too_small = PredictOptions(weights=data["weights"], max_memory_gb=0.1)
    run = predict_scans([data["scans"][0]], tmp_path / "small", too_small, shard=Shard(0, 1, 0))
    assert "--max-memory 0.1 GB leaves too little for the network" in run.results[0].error


def test_missing_shipped_model_is_a_clear_error(data, tmp_path):
    with pytest.raises(NoShippedModelError, match=r"no shipped model is installed .* Pass --weights PATH"):
        predict_scans([data["scans"][0]], tmp_path / "out", PredictOptions(), weights_dir=tmp_path,
                      shard=Shard(0, 1, 0))
    assert not (tmp_path / "out").exists()  # refused before touching anything


def test_weights_that_do_not_match_their_config_are_a_clear_error(data, tmp_path):
    mismatched = _save_checkpoint(tmp_path / "mismatched.pt", TEST_NET, weights_config=NoduleNetConfig().scaled(0.25))
    with pytest.raises(InputError, match=r"mismatched.pt: the weights do not match the network configuration"):
        Predictor(PredictOptions(weights=mismatched))
    garbage = tmp_path / "notes.pt"
    garbage.write_text("these are not weights")
    with pytest.raises(InputError, match=r"notes.pt: not a PyTorch checkpoint file"):
        Predictor(PredictOptions(weights=garbage))


def test_bad_options_are_refused():
    with pytest.raises(NoduleNetError, match="--threshold"):
        PredictOptions(threshold=1.5)
    with pytest.raises(NoduleNetError, match="--device"):
        PredictOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(NoduleNetError, match="--device cuda: no CUDA GPU is available"):
            Predictor(PredictOptions(device="cuda"))


def _cli():
    import typer

    from nodulenet.commands.predict import demo_cmd, predict_cmd

    app = typer.Typer()
    app.command("predict")(predict_cmd)
    app.command("demo")(demo_cmd)
    return app


def test_cli_reports_each_failed_scan_and_exits_1(data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(data["out"], out)
    result = CliRunner().invoke(_cli(), ["predict", str(data["listing"]), "-o", str(out), "--weights",
                                         str(data["weights"]), "--threshold", "0"])
    assert result.exit_code == 1
    assert "failed" in result.output and "broken" in result.output
    assert "2 of 3 scan(s) done" in result.output


def test_cli_demo_without_shipped_model_says_how_to_pass_weights(tmp_path, monkeypatch):
    monkeypatch.setattr("nodulenet.infer.weights.SHIPPED_WEIGHTS_DIR", tmp_path)
    result = CliRunner().invoke(_cli(), ["demo", "-o", str(tmp_path / "demo")])
    assert isinstance(result.exception, NoShippedModelError)
    assert "--weights" in str(result.exception)
    assert not (tmp_path / "demo").exists()  # no phantom generated before the model problem is found
