"""Open a verified, authenticated SSH connection (paramiko) and turn every failure into one clear line.

Target syntax: ``[user@]host[:port]`` (``[user@][v6 address]:port`` for IPv6). The user defaults to the local
user and the port to 22; ``~/.ssh/config`` may map an alias to its ``HostName``, ``User``, ``Port`` and
``IdentityFile`` (what the target spells out wins).

Host keys are verified like OpenSSH's ``StrictHostKeyChecking yes`` against one known_hosts file:
``known_hosts`` argument, else ``$NODULENET_KNOWN_HOSTS``, else ``~/.ssh/known_hosts``. An unknown host is
refused with its fingerprint and how to trust it, unless ``accept_new_host_key`` (then its key is appended to
that file atomically: OpenSSH's ``accept-new``). A host whose key differs from the one on file is ALWAYS
refused, naming both fingerprints; a known host offering only a key type not on file counts as changed.

Keys: ``identity_file``, then ssh-agent, then ``~/.ssh/id_*`` (paramiko's order). No passwords: this runs
unattended.
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import os
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.atomic import write_text_atomic

# paramiko logs failures (a dropped connection, a missing banner) at ERROR from its own thread; with no logging
# configured Python would print them to stderr next to our one-line message. Configured logging still gets them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

KNOWN_HOSTS_ENV = "NODULENET_KNOWN_HOSTS"
CONNECT_TIMEOUT_S = 20.0
KEEPALIVE_S = 30


class RemoteError(NoduleNetError):
    """An SSH problem (reaching, verifying, logging in to, or talking to the host); the message names it."""


class HostKeyError(RemoteError):
    """The host key is unknown (not trusted yet) or has changed."""


class AuthError(RemoteError):
    """The host refused every key offered."""


class ConnectionLost(RemoteError):
    """The connection dropped after it was established."""


@dataclass(frozen=True)
class Target:
    """Where to log in. ``host`` is what the user typed; ``hostname`` what is dialled (after ~/.ssh/config)."""

    user: str
    host: str
    port: int = 22
    hostname: str = ""
    identity_files: tuple[str, ...] = ()  # IdentityFile entries of ~/.ssh/config

    @property
    def address(self) -> str:
        return self.hostname or self.host

    @property
    def known_hosts_name(self) -> str:
        """The name a known_hosts line uses for this host (OpenSSH's and paramiko's rule)."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + ("" if self.port == 22 else f":{self.port}")


def parse_target(text: str, *, ssh_config: Path | None = None) -> Target:
    """``[user@]host[:port]`` -> :class:`Target`, completed from ``~/.ssh/config`` (``ssh_config``)."""
    spec = text.strip()
    user: str | None = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
        if not user:
            raise InputError(None, f"--remote {text!r}: empty user name before '@'")
    port: int | None = None
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InputError(None, f"--remote {text!r}: expected [IPv6 address]:port")
        port_text = rest[1:] if rest else None
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    else:  # a bare IPv6 address has several colons and no port
        host, port_text = spec, None
    if not host:
        raise InputError(None, f"--remote {text!r}: no host name (expected user@host[:port])")
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InputError(None, f"--remote {text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    hostname, identities = host, ()
    config = _ssh_config_entry(host, ssh_config)
    if config:
        hostname = config.get("hostname", host)
        user = user or config.get("user")
        if port is None and str(config.get("port", "")).isdigit():
            port = int(config["port"])
        identities = tuple(config.get("identityfile", ()))
    return Target(user=user or getpass.getuser(), host=host, port=port or 22, hostname=hostname,
                  identity_files=identities)


def _ssh_config_entry(host: str, path: Path | None) -> dict[str, Any]:
    import paramiko

    path = path or Path.home() / ".ssh" / "config"
    if not path.is_file():
        return {}
    try:
        return dict(paramiko.SSHConfig.from_path(str(path)).lookup(host))
    except Exception as exc:  # noqa: BLE001 - a config paramiko cannot parse must not hide the real problem
        raise InputError(path, f"cannot read this SSH config ({type(exc).__name__}: {exc})") from None


def default_known_hosts() -> Path:
    """``$NODULENET_KNOWN_HOSTS`` if set, else ``~/.ssh/known_hosts`` (it may not exist yet)."""
    env = os.environ.get(KNOWN_HOSTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".ssh" / "known_hosts"


def fingerprint(key: Any) -> str:
    """OpenSSH's ``SHA256:<base64>`` fingerprint of a paramiko key (what ``ssh-keygen -lf`` prints)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _add_known_host(path: Path, name: str, key: Any) -> None:
    """Append ``name key-type base64`` to known_hosts; the old lines are kept byte for byte (atomic)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    # A new ~/.ssh gets OpenSSH's own 0700 (it refuses group/world-writable ones).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_text_atomic(path, f"{old}{name} {key.get_name()} {key.get_base64()}\n")


def _host_key_policy(target: Target, known_hosts: Path, accept_new: bool) -> Any:
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        """Called by paramiko only for a host with no key on file (a different key raises BadHostKey)."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            if not accept_new:
                raise HostKeyError(
                    f"{target.known_hosts_name} is not in {known_hosts} (its {key.get_name()} host key is "
                    f"{fingerprint(key)}): check that fingerprint with the host's administrator, then pass "
                    f"--accept-new-host-key to trust and remember it (or add it with `ssh-keyscan -p "
                    f"{target.port} {target.address} >> {known_hosts}`)")
            _add_known_host(known_hosts, hostname, key)
            client.get_host_keys().add(hostname, key.get_name(), key)

    return Policy()


def _tried_keys(identity: Path | None, target: Target) -> str:
    tried = []
    if identity is not None:
        tried.append(f"key {identity}")
    tried += [f"key {p} (ssh config)" for p in target.identity_files]
    if os.environ.get("SSH_AUTH_SOCK"):
        tried.append("ssh-agent")
    home_keys = sorted(str(p) for p in (Path.home() / ".ssh").glob("id_*") if p.suffix != ".pub")
    tried += home_keys
    return ", ".join(tried) if tried else "no key at all (no --identity, no ssh-agent, no ~/.ssh/id_* key)"


def connect(target: Target | str, *, identity_file: str | Path | None = None, known_hosts: str | Path | None = None,
            accept_new_host_key: bool = False, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A connected, authenticated ``paramiko.SSHClient``; :class:`RemoteError` (one line naming the host) if not.

    Raises :class:`HostKeyError` for an unknown or changed host key, :class:`AuthError` when every key is
    refused, :class:`RemoteError` for an unreachable host, a refused connection or a timeout, and
    :class:`~nodulenet.errors.InputError` for a missing identity file or an unreadable known_hosts file.
    """
    import paramiko

    target = parse_target(target) if isinstance(target, str) else target
    identity = None if identity_file is None else Path(identity_file).expanduser()
    if identity is not None and not identity.is_file():
        raise InputError(identity, "SSH identity (private key) file does not exist")
    known = Path(known_hosts).expanduser() if known_hosts is not None else default_known_hosts()
    client = paramiko.SSHClient()
    if known.exists():
        try:
            client.load_host_keys(str(known))
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise InputError(known, f"cannot read this known_hosts file ({exc})") from None
    client.set_missing_host_key_policy(_host_key_policy(target, known, accept_new_host_key))
    key_files = [str(identity)] if identity is not None else []
    key_files += [str(Path(p).expanduser()) for p in target.identity_files if Path(p).expanduser().is_file()]
    where = f"{target.address}:{target.port}"
    started = time.monotonic()
    try:
        client.connect(target.address, port=target.port, username=target.user, key_filename=key_files or None,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
                       allow_agent=True, look_for_keys=True)
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"the host key of {target.known_hosts_name} has CHANGED: {known} has {exc.expected_key.get_name()} "
            f"{fingerprint(exc.expected_key)}, the host offers {exc.key.get_name()} {fingerprint(exc.key)}. "
            f"Refused: this may be an attack. If the host was reinstalled, remove the old entry with `ssh-keygen "
            f"-R '{target.known_hosts_name}' -f {known}` and connect again with --accept-new-host-key") from None
    except paramiko.PasswordRequiredException as exc:
        client.close()
        raise AuthError(f"cannot log in to {target}: a private key is passphrase-protected ({exc}); load it into "
                        f"ssh-agent (`ssh-add KEY`) instead of passing it with --identity") from None
    except paramiko.AuthenticationException:
        client.close()
        raise AuthError(f"authentication as {target.user} on {where} failed (tried {_tried_keys(identity, target)}): "
                        f"is the public key in ~{target.user}/.ssh/authorized_keys there?") from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        codes = {getattr(e, "errno", None) for e in exc.errors.values()}
        if codes == {errno.ECONNREFUSED}:
            raise RemoteError(f"{where} refused the connection: is sshd running there, on port {target.port}?") \
                from None
        raise RemoteError(f"cannot reach {where}: {exc}") from None
    except socket.gaierror as exc:
        client.close()
        raise RemoteError(f"cannot resolve the host name {target.address!r} ({exc.strerror})") from None
    except (socket.timeout, TimeoutError):
        client.close()
        raise RemoteError(f"no answer from {where} within {timeout:.0f} s (host down, or a firewall drops SSH)") \
            from None
    except (paramiko.SSHException, EOFError) as exc:
        client.close()
        if time.monotonic() - started >= 0.9 * timeout or "banner" in str(exc):
            # paramiko reports a silent peer as "No existing session" or a banner error once the time is up
            raise RemoteError(f"no SSH answer from {where} within {timeout:.0f} s (is an SSH server listening "
                              f"there? is the host overloaded?)") from None
        raise RemoteError(f"SSH to {where} failed: {exc or type(exc).__name__}") from None
    except OSError as exc:
        client.close()
        raise RemoteError(f"cannot reach {where}: {exc.strerror or exc}") from None
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(KEEPALIVE_S)  # so a silent hour-long predict does not idle the link out
    return client
