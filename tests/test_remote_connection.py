"""SSH connection for ``predict --remote``: host-key checks, authentication, clear errors, what gets uploaded.

Runs against a real OpenSSH sshd on a loopback port (``tests/_sshd.py``); skipped when sshd is not installed.
HOME is a temp folder and ssh-agent is hidden, so only the keys and known_hosts files a test names are used.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _sshd import generate_key, isolated_home_fixture, known_hosts_line, sshd_server_fixture  # noqa: F401
from nodulenet.errors import InputError
from nodulenet.remote.connection import (AuthError, HostKeyError, RemoteError, connect, default_known_hosts,
                                         parse_target)
from nodulenet.remote.transfer import plan_upload

pytestmark = pytest.mark.timeout(60)


def _fingerprint(public_key: Path) -> str:
    """What `ssh-keygen -lf` prints for the key: the fingerprint a user would compare."""
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def _run(client, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=20)
    return stdout.read().decode().strip()


def test_known_host_with_key_logs_in_and_runs_commands(server):
    client = connect(server.target, identity_file=server.client_key, known_hosts=server.known_hosts)
    try:
        assert _run(client, "echo $TMPDIR") == str(server.remote_tmp)
    finally:
        client.close()


def test_unknown_host_is_refused_with_its_fingerprint_and_how_to_trust_it(server, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostKeyError) as err:
        connect(server.target, identity_file=server.client_key, known_hosts=known)
    message = str(err.value)
    assert f"[127.0.0.1]:{server.port} is not in {known}" in message
    assert _fingerprint(server.host_public_key) in message
    assert "--accept-new-host-key" in message and "ssh-keyscan" in message
    assert known.read_text() == ""  # nothing trusted behind the user's back


def test_accept_new_host_key_trusts_and_saves_it_keeping_other_lines(server, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"
    known.parent.mkdir()
    other = "example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    known.write_text(other)
    connect(server.target, identity_file=server.client_key, known_hosts=known, accept_new_host_key=True).close()
    assert known.read_text() == other + known_hosts_line("127.0.0.1", server.port, server.host_public_key)
    # Remembered: the next connection needs no flag.
    connect(server.target, identity_file=server.client_key, known_hosts=known).close()


def test_changed_host_key_is_always_refused(server, tmp_path):
    impostor = generate_key(tmp_path / "old_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line("127.0.0.1", server.port, impostor.with_suffix(".pub")))
    before = known.read_text()
    for accept in (False, True):
        with pytest.raises(HostKeyError) as err:
            connect(server.target, identity_file=server.client_key, known_hosts=known, accept_new_host_key=accept)
        message = str(err.value)
        assert "CHANGED" in message and f"[127.0.0.1]:{server.port}" in message
        assert _fingerprint(impostor.with_suffix(".pub")) in message  # the one on file
        assert _fingerprint(server.host_public_key) in message  # the one offered
        assert "ssh-keygen -R" in message
    assert known.read_text() == before


def test_wrong_client_key_is_an_authentication_failure_naming_user_host_and_key(server, tmp_path):
    stranger = generate_key(tmp_path / "stranger")
    with pytest.raises(AuthError) as err:
        connect(server.target, identity_file=stranger, known_hosts=server.known_hosts)
    message = str(err.value)
    assert f"authentication as {server.user} on 127.0.0.1:{server.port} failed" in message
    assert str(stranger) in message and "authorized_keys" in message


def test_missing_identity_file_is_an_input_error(server, tmp_path):
    with pytest.raises(InputError, match="identity .*does not exist"):
        connect(server.target, identity_file=tmp_path / "nope", known_hosts=server.known_hosts)


def test_closed_port_is_a_clear_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(RemoteError, match=f"127.0.0.1:{port} refused the connection: is sshd running"):
            connect(f"someone@127.0.0.1:{port}", known_hosts="/dev/null")


def test_silent_peer_is_a_clear_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts TCP but never speaks SSH
        port = s.getsockname()[1]
        with pytest.raises(RemoteError, match=f"no SSH answer from 127.0.0.1:{port} within 1 s"):
            connect(f"someone@127.0.0.1:{port}", known_hosts="/dev/null", timeout=1)


def test_parse_target_defaults_and_forms(monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "localuser")
    t = parse_target("gpu-box")
    assert (t.user, t.host, t.port, t.known_hosts_name) == ("localuser", "gpu-box", 22, "gpu-box")
    t = parse_target("ana@10.0.0.5:2222")
    assert (t.user, t.address, t.port, t.known_hosts_name) == ("ana", "10.0.0.5", 2222, "[10.0.0.5]:2222")
    t = parse_target("ana@[::1]:2200")
    assert (t.host, t.port, str(t)) == ("::1", 2200, "ana@[::1]:2200")
    for bad in ("ana@", "@host", "host:port", "host:70000"):
        with pytest.raises(InputError, match="--remote"):
            parse_target(bad)


def test_ssh_config_alias_gives_hostname_user_port(isolated_home):
    (isolated_home / ".ssh").mkdir()
    (isolated_home / ".ssh" / "config").write_text("Host gpu\n  HostName 10.1.2.3\n  User ana\n  Port 2022\n")
    t = parse_target("gpu")
    assert (t.user, t.host, t.address, t.port) == ("ana", "gpu", "10.1.2.3", 2022)
    assert parse_target("bob@gpu:23").user == "bob" and parse_target("bob@gpu:23").port == 23


def test_known_hosts_default_follows_env_then_home(isolated_home, monkeypatch):
    assert default_known_hosts() == isolated_home / ".ssh" / "known_hosts"
    monkeypatch.setenv("NODULENET_KNOWN_HOSTS", "/etc/project_known_hosts")
    assert default_known_hosts() == Path("/etc/project_known_hosts")


def test_upload_plan_sends_what_each_scan_needs(tmp_path):
    mhd = tmp_path / "luna" / "1.2.3.mhd"
    mhd.parent.mkdir()
    mhd.write_text("ObjectType = Image\nNDims = 3\nElementDataFile = 1.2.3.zraw\n")
    (tmp_path / "luna" / "1.2.3.zraw").write_bytes(b"x" * 10)
    (tmp_path / "luna" / "other.mhd").write_text("unrelated")
    plan = plan_upload(mhd)
    assert plan.scan_rel == "1.2.3.mhd" and [f.rel for f in plan.files] == ["1.2.3.mhd", "1.2.3.zraw"]

    series = tmp_path / "patient" / "series"
    (series / "sub").mkdir(parents=True)
    dicom = b"\0" * 128 + b"DICM" + b"\0" * 10
    (series / "a.dcm").write_bytes(dicom)
    (series / "sub" / "b.dcm").write_bytes(dicom)
    plan = plan_upload(series)
    assert plan.scan_rel == "series" and [f.rel for f in plan.files] == ["series/a.dcm", "series/sub/b.dcm"]
    assert plan.size == 2 * len(dicom)
    plan = plan_upload(series / "a.dcm")  # one DICOM file stands for its series: the folder goes
    assert plan.scan_rel == "series/a.dcm" and len(plan.files) == 2

    nifti = tmp_path / "ct.nii.gz"
    nifti.write_bytes(b"y" * 7)
    plan = plan_upload(nifti)
    assert (plan.scan_rel, [f.rel for f in plan.files], plan.size) == ("ct.nii.gz", ["ct.nii.gz"], 7)


def test_cli_refuses_unknown_host_in_one_line(server, isolated_home, tmp_path):
    """The real command: exit code 2, one line naming the host and how to trust it, no traceback."""
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not sent")
    env = {"HOME": str(isolated_home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "nodulenet", "predict", str(scan), "-o", str(tmp_path / "out"),
                           "--remote", server.target, "--identity", str(server.client_key)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = " ".join(proc.stderr.split())
    assert f"error: [127.0.0.1]:{server.port} is not in {isolated_home}/.ssh/known_hosts" in error
    assert "--accept-new-host-key" in error
