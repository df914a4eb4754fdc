"""``predict --remote``: a real OpenSSH sshd on loopback runs this venv's nodulenet as the "remote" machine.

The shipped demo model on a small phantom: the remote result must equal a local predict of the same scan.
Every remote command gets TMPDIR = ``server.remote_tmp`` (tests/_sshd.py), so "the remote work folder is
removed" is checked by that folder being empty again, after success, failure, cancel and a lost connection.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from _sshd import isolated_home_fixture, running_sshd, sshd_server_fixture  # noqa: F401
from nodulenet.infer.cohort import Shard
from nodulenet.io.findings import ScanFindings
from nodulenet.io.image_files import read_image
from nodulenet.predict_api import PredictOptions, predict_scans
from nodulenet.preprocess.phantom import PhantomConfig, write_phantom
from nodulenet.remote.connection import ConnectionLost, RemoteError
from nodulenet.remote.ssh import Cancelled, predict_over_ssh

pytestmark = pytest.mark.timeout(180)

SMALL = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                      slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0),
                      flip_xyz=(True, False, True))
# One torch thread (2 shared cores); a high threshold keeps the report export short.
OPTIONS = PredictOptions(threshold=0.9, threads=1)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("phantom") / "case1", 1, SMALL)["scan"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny network with random weights (as in test_predict_cohort): a fast remote run with a few findings."""
    import dataclasses

    import torch

    from nodulenet.model import NoduleNet, NoduleNetConfig, to_checkpoint_dict

    config = dataclasses.replace(NoduleNetConfig().scaled(0.125, name="test-eighth"), rpn_test_pre_nms_top_n=64,
                                 rpn_test_post_nms_top_n=4)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(to_checkpoint_dict(NoduleNet(config), config,
                                  extra={"prepare_config": {"overlay": False, "crop_margin_voxels": 4}}), path)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, phantom):
    return predict_scans([phantom], tmp_path_factory.mktemp("local") / "out", OPTIONS,
                         shard=Shard(rank=0, world_size=1, local_rank=0))


def _remote(server, scans, out, **kwargs):
    kwargs.setdefault("options", OPTIONS)
    kwargs.setdefault("progress", False)
    return predict_over_ssh(scans, out, target=server.target, remote_python=sys.executable,
                            identity_file=server.client_key, known_hosts=server.known_hosts, **kwargs)


def _assert_same_result(local_dir: Path, remote_dir: Path, scan: Path) -> int:
    """Same findings (ids, scores to 1e-6, centres to 1e-4 mm), same files, same label map; returns #findings."""
    assert sorted(p.name for p in remote_dir.iterdir()) == sorted(p.name for p in local_dir.iterdir())
    local = ScanFindings.read_json(local_dir / "nodules.json")
    remote = ScanFindings.read_json(remote_dir / "nodules.json")
    assert [f.id for f in remote.findings] == [f.id for f in local.findings]
    for lf, rf in zip(local.findings, remote.findings):
        assert rf.score == pytest.approx(lf.score, abs=1e-6)
        np.testing.assert_allclose(rf.center_world_xyz_mm, lf.center_world_xyz_mm, atol=1e-4)
    assert remote.source.path == str(scan)  # the local scan, not the deleted remote copy
    report = (remote_dir / "report.html").read_text()
    assert str(scan) in report and "nodulenet-remote." not in report
    np.testing.assert_array_equal(read_image(remote_dir / "labels.nii.gz").array,
                                  read_image(local_dir / "labels.nii.gz").array)
    return len(local.findings)


def _predict_processes(server) -> list[psutil.Process]:
    """Remote `nodulenet predict` processes started through this sshd."""
    found = []
    for p in server.session_processes():
        try:
            if "predict" in p.cmdline() and "-m" in p.cmdline():
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_remote_result_equals_local_predict(server, phantom, local_run, tmp_path):
    """A cohort: a good scan, one already done here (skipped), one broken THERE, one missing HERE."""
    out = tmp_path / "out"
    done_here = tmp_path / "case2" / "scan.nii.gz"
    done_here.parent.mkdir()
    shutil.copyfile(phantom, done_here)
    shutil.copytree(local_run.out_dir / local_run.results[0].name, out / "case2_scan")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "case2_scan").iterdir()}
    broken = tmp_path / "broken" / "scan.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(phantom.read_bytes()[:5000])  # a truncated download: fails THERE, on its own
    missing = tmp_path / "missing.nii.gz"  # fails HERE, never sent
    messages: list[str] = []
    reported = []
    run = _remote(server, [phantom, done_here, broken, missing], out, progress=messages.append,
                  on_result=reported.append)

    assert [r.status for r in run.results] == ["done", "skipped", "failed", "failed"]
    assert sorted(r.index for r in reported) == [0, 1, 2, 3]  # on_result once per scan
    done, skipped, failed, absent = run.results
    # Folder names follow the local rules on the LOCAL paths: same file names get their parent folder's name.
    assert [r.name for r in run.results] == ["case1_scan", "case2_scan", "broken_scan", "missing"]
    n = _assert_same_result(local_run.out_dir / local_run.results[0].name, out / done.name, phantom)
    assert n >= 1 and done.n_findings == n == local_run.results[0].n_findings
    assert done.scan == str(phantom) and done.out_dir == str(out / "case1_scan")
    assert set(done.details["files"].values()) == {str(p) for p in (out / done.name).iterdir()}
    # Without --redo a complete result here is not computed or downloaded again, as in a local run.
    assert {p.name: p.stat().st_mtime_ns for p in (out / "case2_scan").iterdir()} == before
    # Errors name the LOCAL files, as a local run would.
    assert str(broken) in failed.error and "nodulenet-remote." not in failed.error
    assert absent.error == f"{missing}: does not exist"
    # summary.json / predict_config.json as a local run writes them, plus where it ran.
    summary = json.loads(run.summary_path.read_text())
    assert (summary["n_scans"], summary["done"], summary["skipped"], summary["failed"]) == (4, 1, 1, 2)
    assert summary["remote"]["host"] == server.target and summary["remote"]["exit_code"] == 1
    config = json.loads(run.config_path.read_text())
    assert config["remote"]["host"] == server.target
    assert config["scans"] == [str(phantom), str(done_here), str(broken), str(missing)]
    assert config["options"]["threshold"] == 0.9
    # The remote output was streamed, the log kept, and nothing is left on the remote side.
    assert any(m.startswith(f"{server.target}| done {phantom}") for m in messages)
    assert f"{server.target}| failed {broken}" in (out / "remote.log").read_text()
    assert server.remote_tmp_entries() == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cli_predict_remote_end_to_end(server, phantom, tiny_weights, tmp_path, isolated_home):
    """`nodulenet predict --remote` as a user runs it: known_hosts from $HOME/.ssh, key from --identity."""
    (isolated_home / ".ssh").mkdir(mode=0o700)
    shutil.copyfile(server.known_hosts, isolated_home / ".ssh" / "known_hosts")
    out = tmp_path / "out"
    env = {"HOME": str(isolated_home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    # The same path names the weights on the "remote" side: it is this machine.
    proc = subprocess.run([sys.executable, "-m", "nodulenet", "predict", str(phantom), "-o", str(out),
                           "--remote", server.target, "--remote-python", sys.executable,
                           "--identity", str(server.client_key), "--weights", str(tiny_weights),
                           "--threshold", "0", "--threads", "1", "--no-dicom"],
                          capture_output=True, text=True, env=env, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    findings = ScanFindings.read_json(out / "scan" / "nodules.json")
    n = len(findings.findings)
    assert n >= 1 and findings.threshold == 0.0 and findings.source.path == str(phantom)
    assert sorted(p.name for p in (out / "scan").iterdir()) == ["candidates.csv", "labels.nii.gz", "nodules.json",
                                                                 "report.html"]
    assert f"done {phantom}: {n} finding(s) -> {out / 'scan'}" in proc.stdout
    assert f"1 of 1 scan(s) done; summary: {out / 'summary.json'}" in proc.stdout
    assert "upload" in proc.stderr and f"{server.target}| done" in proc.stderr  # bars and remote lines
    config = json.loads((out / "predict_config.json").read_text())
    assert config["options"]["weights"] == str(tiny_weights) and config["options"]["dicom_outputs"] is False
    assert "--no-dicom" in config["remote"]["command"]
    assert server.remote_tmp_entries() == []


def test_remote_refusal_is_one_line_and_cleans_up(server, phantom, tmp_path):
    weights = tmp_path / "no-such-model.pt"  # a path on the REMOTE machine
    with pytest.raises(RemoteError) as err:
        _remote(server, [phantom], tmp_path / "out", options=PredictOptions(weights=weights, threads=1))
    message = str(err.value)
    assert message.startswith(f"nodulenet predict on {server.target} stopped with exit code 2: ")
    assert str(weights) in message
    assert server.remote_tmp_entries() == []
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["remote.log"]


def test_missing_remote_nodulenet_is_a_clear_message(server, phantom, tmp_path):
    with pytest.raises(RemoteError) as err:
        predict_over_ssh([phantom], tmp_path / "out", target=server.target, identity_file=server.client_key,
                         known_hosts=server.known_hosts, progress=False)
    assert str(err.value).startswith(f"nodulenet is not installed on {server.target} (`nodulenet version` failed: ")
    assert "--remote-python" in str(err.value)
    with pytest.raises(RemoteError, match=r"nodulenet is not installed on .* for /usr/bin/python3 .*"
                                          r"No module named nodulenet"):
        predict_over_ssh([phantom], tmp_path / "out", target=server.target, identity_file=server.client_key,
                         known_hosts=server.known_hosts, remote_python="/usr/bin/python3", progress=False)
    assert server.remote_tmp_entries() == []


def test_cancel_stops_the_remote_process_and_cleans_up(server, phantom, tmp_path):
    cancel = threading.Event()
    outcome: dict[str, BaseException] = {}

    def work() -> None:
        try:
            _remote(server, [phantom], tmp_path / "out", cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 60
    while not _predict_processes(server) and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.05)
    remote = _predict_processes(server)
    assert remote, "the remote predict never started"
    cancel.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert isinstance(outcome.get("error"), Cancelled)
    assert "cancelled while running nodulenet predict" in str(outcome["error"])
    gone, alive = psutil.wait_procs(remote, timeout=10)
    assert not alive
    assert server.remote_tmp_entries() == []
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("when", ["running", "downloading"])
def test_lost_connection_is_clear_and_leaves_no_complete_looking_output(phantom, tiny_weights, tmp_path, when):
    out = tmp_path / "out"
    with running_sshd(tmp_path / "sshd") as server:
        killed: list[psutil.Process] = []  # the remote predict processes alive at the kill
        kills: list[str] = []

        def watch(message: str) -> None:
            # Runs in the runner's thread: the connection is gone before the runner takes its next step.
            if when == "downloading" and message.startswith("downloading") and not kills:
                kills.append(message)
                server.kill_all()

        def kill_when_running() -> None:
            deadline = time.monotonic() + 60
            while not _predict_processes(server) and time.monotonic() < deadline:
                time.sleep(0.05)
            killed.extend(_predict_processes(server))
            kills.append("running")
            server.kill_all()

        killer = threading.Thread(target=kill_when_running) if when == "running" else None
        if killer:
            killer.start()
        with pytest.raises(ConnectionLost) as err:
            # The same path names the weights on the "remote" side: it is this machine.
            _remote(server, [phantom], out, progress=watch,
                    options=PredictOptions(weights=tiny_weights, threshold=0.0, threads=1))
        if killer:
            killer.join()
        assert kills
        message = str(err.value)
        phase = "running nodulenet predict" if when == "running" else "downloading the results"
        assert message.startswith(f"lost the SSH connection to {server.target} while {phase}")
        assert "could not be removed" in message and "remove it by hand" in message
        if when == "running":  # the pty hung the remote process up: no orphan keeps the GPU busy
            assert killed
            _, alive = psutil.wait_procs(killed, timeout=10)
            assert not alive
    assert not (out / "scan").exists() and not list(out.glob("*/nodules.json"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_remote_dicom_series_equals_local_predict(server, lidc_0001_series, tmp_path):
    """A real DICOM series folder (LIDC-IDRI-0001): every slice uploaded, DICOM SEG + SR come back."""
    local = predict_scans([lidc_0001_series], tmp_path / "local", OPTIONS, shard=Shard(rank=0, world_size=1,
                                                                                           local_rank=0))
    run = _remote(server, [lidc_0001_series], tmp_path / "remote")
    name = local.results[0].name
    assert run.results[0].name == name == "LIDC-IDRI-0001_20603192"
    _assert_same_result(tmp_path / "local" / name, tmp_path / "remote" / name, lidc_0001_series)
    assert {"seg.dcm", "sr.dcm"} <= {p.name for p in (tmp_path / "remote" / name).iterdir()}
    assert server.remote_tmp_entries() == []
