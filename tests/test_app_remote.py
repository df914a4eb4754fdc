"""The viewer's server and SSH modes, end to end against a real ``nodulenet serve`` (tests/_serverproc.py) and a
real OpenSSH sshd on loopback (tests/_sshd.py), and what the user sees when the server is down or the token wrong."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import pytest

from _xvfb import qt_app_fixture, wait_until  # noqa: F401
from nodulenet.io.findings import read_findings_json
from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

pytestmark = pytest.mark.timeout(300)

SMALL = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                      slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(10.0, 16.0))
THRESHOLD = 0.7  # not the default 0.5; the shipped model scores the 2 nodules 1.0 and 0.89 here, nothing else above 0.13


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("remote-viewer")
    paths = write_phantom(root / "phantom", 1, SMALL)
    return {"scan": Path(paths["scan"]), "truth": json.loads(Path(paths["nodules"]).read_text())["nodules"]}


@pytest.fixture
def window(app, phantom, tmp_path):
    from PySide6.QtCore import QSettings

    from nodulenet.app.main_window import MainWindow

    w = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat),
                   results_root=tmp_path / "results")
    w.show()
    loaded = []
    w.scan_loaded.connect(lambda: loaded.append(True))
    w.open_scan(phantom["scan"])
    wait_until(lambda: loaded or w.messages, 60, "the phantom to open")
    assert loaded, w.messages
    w.panel.detect_threshold_box.setValue(THRESHOLD)
    yield w
    w.close()


def _run(window, start) -> tuple[str, list[str]]:
    outcome: list[str] = []
    progress: list[str] = []
    window.detection_finished.connect(outcome.append)
    start()
    window.job.progress.connect(lambda step, total, text: progress.append(text))
    wait_until(lambda: outcome, 240, f"detection ({window.job.mode})")
    if outcome == ["succeeded"]:
        wait_until(lambda: window.results is not None, 30, "the results")
    return outcome[0], progress


def _check_results(window, phantom) -> None:
    folder = window.results.folder
    on_disk = read_findings_json(folder / "nodules.json")
    proxy = window.panel.proxy
    assert proxy.rowCount() == len(on_disk.findings) >= 2
    assert sorted(int(proxy.index(r, 0).data()) for r in range(proxy.rowCount())) == \
        [f.id for f in on_disk.findings]
    assert all(f.score >= THRESHOLD for f in on_disk.findings)  # the threshold travelled with the job
    assert on_disk.source.path == str(phantom["scan"])  # the local path, not the remote copy's
    for nodule in phantom["truth"]:  # the shipped model over there found both phantom nodules
        assert min(math.dist(f.center_world_xyz_mm, nodule["center_world_xyz_mm"]) for f in on_disk.findings) \
            <= nodule["diameter_mm"] / 2
    assert window.results.labels is not None and window.results.labels.max() >= 1  # masks came back too


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from _serverproc import running_server

    with running_server(tmp_path_factory.mktemp("serve") / "data", workers=1) as s:
        yield s


def test_server_mode_end_to_end_and_remembered(window, server, phantom):
    outcome, progress = _run(window, lambda: window.run_on_server(server.url, server.token))
    assert outcome == "succeeded", window.messages
    assert any(text.startswith("Server:") for text in progress)
    _check_results(window, phantom)
    assert window.settings.value("server/url") == server.url
    assert window.settings.value("server/token") == server.token
    from nodulenet.app.detection import ServerDialog

    dialog = ServerDialog(window.settings.value("server/url"), window.settings.value("server/token"), window)
    assert dialog.values() == (server.url, server.token)  # the next run's dialog is filled in


def test_wrong_token_gives_a_message_and_the_window_keeps_running(window, server):
    outcome, _ = _run(window, lambda: window.run_on_server(server.url, "not-the-token"))
    assert outcome == "failed"
    message = window.messages[-1]
    assert "refused the token" in message and server.url in message and "\n" not in message
    assert window.last_message_box.isVisible()
    window.last_message_box.accept()
    assert window.isVisible() and window.results is None and window.panel.run_server.isEnabled()


def test_server_that_is_down_gives_a_message_and_the_window_keeps_running(window):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    url = f"http://127.0.0.1:{port}"
    outcome, _ = _run(window, lambda: window.run_on_server(url, "any"))
    assert outcome == "failed"
    assert "cannot reach" in window.messages[-1] and url in window.messages[-1]
    window.last_message_box.accept()
    assert window.isVisible() and window.volume is not None
    # ... and a bad URL is refused before anything starts.
    window.run_on_server("", "x")
    assert "URL" in window.messages[-1]
    window.last_message_box.accept()


def test_ssh_mode_end_to_end(window, phantom, tmp_path):
    from _sshd import running_sshd

    with running_sshd(tmp_path / "sshd") as sshd:
        outcome, progress = _run(window, lambda: window.run_over_ssh(
            sshd.target, remote_python=sys.executable, identity=str(sshd.client_key), known_hosts=sshd.known_hosts))
        assert outcome == "succeeded", window.messages
        assert sshd.remote_tmp_entries() == []  # the runner cleaned up over there
    assert progress  # the remote output was relayed
    _check_results(window, phantom)
    assert window.settings.value("ssh/target") == sshd.target
    assert window.settings.value("ssh/identity") == str(sshd.client_key)


def test_ssh_host_that_refuses_us_gives_a_message(window, tmp_path):
    from _sshd import running_sshd

    with running_sshd(tmp_path / "sshd") as sshd:
        stranger = tmp_path / "known_hosts_without_it"
        stranger.write_text("")
        outcome, _ = _run(window, lambda: window.run_over_ssh(sshd.target, remote_python=sys.executable,
                                                              identity=str(sshd.client_key), known_hosts=stranger))
    assert outcome == "failed"
    assert "127.0.0.1" in window.messages[-1] and "\n" not in window.messages[-1]
    window.last_message_box.accept()
    assert window.isVisible()


def test_cancel_deletes_the_job_on_the_server(window, server):
    with server.client() as client:
        jobs_before = client.list_jobs()["total"]
    outcome: list[str] = []
    progress: list[str] = []
    window.detection_finished.connect(outcome.append)
    window.run_on_server(server.url, server.token)
    window.job.progress.connect(lambda step, total, text: progress.append(text))
    wait_until(lambda: any(t.startswith("Server:") for t in progress) or outcome, 60, "the job to be on the server")
    window.cancel_detection()
    wait_until(lambda: outcome, 60, "the cancel")
    assert outcome == ["cancelled"]
    with server.client() as client:
        assert client.list_jobs()["total"] == jobs_before  # the job this run made is gone again
    assert window.results is None and window.panel.run_server.isEnabled()
