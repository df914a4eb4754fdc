"""A real OpenSSH ``sshd`` on a loopback port, for tests of ``predict --remote`` (and the viewer's SSH runs).

Recipe from ENVIRONMENT-NOTES.md: a private ``sshd_config`` in a temp folder with a freshly generated ed25519
host key and client key, ``StrictModes no`` (keys under /tmp), no PAM or passwords, SFTP in-process, listening
on 127.0.0.1 only. ``sshd -t`` checks the config first; sshd runs in the foreground (``-D``) as a child of the
test, logging to a file, and is always stopped (listener AND every per-connection session process it forked,
found through psutil) when the context exits, even on failure.

``SetEnv`` gives every remote command ``TMPDIR=<server.remote_tmp>`` (so ``mktemp -d`` of the SSH runner lands
in a folder the test can inspect: empty again after every run), ``OMP_NUM_THREADS=1`` and
``OMP_WAIT_POLICY=PASSIVE`` (this machine has 2 shared cores), and ``SHLVL=1`` so that bash does not source the
user's ``~/.bashrc`` for the commands (the remote environment is the sshd default, not the developer's).

Usage::

    with running_sshd(tmp_path) as server:
        predict_over_ssh(..., target=server.target, identity_file=server.client_key,
                         known_hosts=server.known_hosts, remote_python=sys.executable)

Tests skip (with the reason) when ``sshd``/``ssh-keygen`` are missing or the config is refused.

A test module of SSH runs imports the two fixtures at the end, ``isolated_home`` (autouse: every test of the
module gets a fresh ``$HOME``) and ``server`` (one sshd per module), by their function names so that the tests'
parameters do not shadow the import: ``from _sshd import isolated_home_fixture, sshd_server_fixture``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


def find_sshd() -> str | None:
    """Path of the OpenSSH server binary, or None (``.ci/run`` installs openssh-server)."""
    found = shutil.which("sshd")
    if found:
        return found
    return next((c for c in SSHD_CANDIDATES if os.access(c, os.X_OK)), None)


def require_sshd() -> tuple[str, str]:
    """``(sshd, ssh-keygen)`` paths, or skip the test saying what is missing."""
    sshd, keygen = find_sshd(), shutil.which("ssh-keygen")
    if sshd is None or keygen is None:
        pytest.skip("OpenSSH server not installed (sshd/ssh-keygen missing): apt-get install openssh-server")
    return sshd, keygen  # type: ignore[return-value]


def isolate_ssh_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$HOME`` (so no ~/.ssh of the machine is read), no SSH agent and no known_hosts override."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("NODULENET_KNOWN_HOSTS", raising=False)
    return home


def generate_key(path: Path, comment: str = "nodulenet-test") -> Path:
    """A passphrase-less ed25519 key pair ``path`` + ``path.pub``; returns the private key path."""
    _, keygen = require_sshd()
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return path


def known_hosts_line(host: str, port: int, public_key_file: Path) -> str:
    """A known_hosts line for ``host:port`` (OpenSSH writes ``[host]:port`` for ports other than 22)."""
    key_type, key_b64 = public_key_file.read_text().split()[:2]
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key_type} {key_b64}\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class SshServer:
    """A running test sshd and everything a client needs to log in to it."""

    host: str
    port: int
    user: str
    client_key: Path  # private key whose public half is authorised
    known_hosts: Path  # holds exactly this server's host key
    host_public_key: Path
    log: Path
    config: Path
    remote_tmp: Path  # TMPDIR of every remote command
    process: subprocess.Popen = field(repr=False)

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def remote_tmp_entries(self) -> list[str]:
        """What the remote commands left in their TMPDIR (the SSH runner must leave nothing)."""
        return sorted(p.name for p in self.remote_tmp.iterdir())

    def session_processes(self) -> list[psutil.Process]:
        """Every process this sshd started (per-connection sshd processes and the remote commands)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_all(self) -> list[psutil.Process]:
        """SIGKILL the listener and every sshd session process: clients see the connection drop at once.

        Remote commands under a pty get SIGHUP from the kernel when their session dies; any still alive
        are returned so the caller can check or reap them (:meth:`stop` kills them too)."""
        children = self.session_processes()
        sshd_procs = [p for p in children if _name(p).startswith("sshd")]
        for proc in sshd_procs:
            _signal(proc, signal.SIGKILL)
        _signal_pid(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        psutil.wait_procs(sshd_procs, timeout=10)  # gone for sure: no request is served after this returns
        others = [p for p in children if p not in sshd_procs]
        return [p for p in others if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> None:
        children = self.session_processes()
        if self.process.poll() is None:
            _signal_pid(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_pid(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        for proc in children:
            _signal(proc, signal.SIGKILL)
        psutil.wait_procs(children, timeout=5)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _write_config(root: Path, port: int, host_key: Path, authorized: Path, remote_tmp: Path) -> Path:
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PermitTTY yes\n"
        "LogLevel VERBOSE\n"
        "Subsystem sftp internal-sftp\n"
        # SHLVL=1: bash then counts itself a nested shell and does not source ~/.bashrc for ssh commands. The
        # remote side of a test must not depend on (or, when a test kills sshd mid-command, break) the user's
        # shell setup: a pyenv `rehash` in ~/.bashrc killed mid-way leaves a lock that stalls every later shell.
        f"SetEnv TMPDIR={remote_tmp} OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE SHLVL=1\n"
    )
    return config


@contextmanager
def running_sshd(root: Path) -> Iterator[SshServer]:
    """Start a private sshd under ``root`` (a fresh temp folder); stop it, whatever happens."""
    sshd, _ = require_sshd()
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation folder sshd insists on
    host_key = generate_key(root / "host_ed25519", "nodulenet-test-host")
    client_key = generate_key(root / "client_ed25519", "nodulenet-test-client")
    authorized = root / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    remote_tmp = root / "remote-tmp"
    remote_tmp.mkdir()
    log = root / "sshd.log"
    process: subprocess.Popen | None = None
    for _attempt in range(3):  # the free port may be taken between choosing and binding it
        port = _free_port()
        config = _write_config(root, port, host_key, authorized, remote_tmp)
        check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            pytest.skip(f"sshd refuses the test configuration: {check.stderr.strip() or check.stdout.strip()}")
        process = subprocess.Popen([sshd, "-D", "-f", str(config), "-E", str(log)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None and not _port_open(port):
            time.sleep(0.05)
        if process.poll() is None and _port_open(port):
            break
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)
        process = None
    if process is None:
        log_text = log.read_text() if log.exists() else "(no log)"
        raise RuntimeError(f"test sshd did not start on 127.0.0.1; its log:\n{log_text}")
    known_hosts = root / "known_hosts"
    known_hosts.write_text(known_hosts_line("127.0.0.1", port, host_key.with_suffix(".pub")))
    server = SshServer(host="127.0.0.1", port=port, user=getpass.getuser(), client_key=client_key,
                       known_hosts=known_hosts, host_public_key=host_key.with_suffix(".pub"), log=log,
                       config=config, remote_tmp=remote_tmp, process=process)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True, name="isolated_home")
def isolated_home_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`isolate_ssh_client` for every test of a module that imports this fixture."""
    return isolate_ssh_client(tmp_path, monkeypatch)


@pytest.fixture(scope="module", name="server")
def sshd_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """One private sshd for a whole test module."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s
