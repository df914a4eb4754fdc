"""``nodulenet serve`` start-up rules: the token file (created 0600, reused, refused when others can read it), no
clear-text bind beyond loopback, TLS through uvicorn, one server per data folder, and the client's errors for an
unreachable server or a bad URL."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from _serverproc import DEFAULT_TOKEN, REPO_ROOT, running_server
from nodulenet.errors import NoduleNetError
from nodulenet.serve.settings import check_bind, is_loopback, resolve_token

pytestmark = pytest.mark.timeout(120)


def test_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    token, where = resolve_token(tmp_path / "data", None)
    path = tmp_path / "data" / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "created" in where and len(token) >= 32
    assert resolve_token(tmp_path / "data", None) == (token, f"in {path}")
    os.chmod(path, 0o644)
    with pytest.raises(NoduleNetError) as err:
        resolve_token(tmp_path / "data", None)
    assert "readable by other users" in str(err.value) and "chmod 600" in str(err.value)


def test_given_token_or_token_file(tmp_path: Path) -> None:
    assert resolve_token(tmp_path, "a-long-enough-token-1234")[0] == "a-long-enough-token-1234"
    holder = tmp_path / "secret.txt"
    holder.write_text("from-a-file-0123456789\n")
    assert resolve_token(tmp_path, str(holder))[0] == "from-a-file-0123456789"
    with pytest.raises(NoduleNetError, match="at least 16 characters"):
        resolve_token(tmp_path, "short")
    assert not (tmp_path / "token").exists()  # a given token is never written to the data folder


def test_non_loopback_bind_needs_tls_or_insecure(tmp_path: Path) -> None:
    from nodulenet.cli import app

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("myhost")
    check_bind("0.0.0.0", tls=True, insecure=False)
    check_bind("0.0.0.0", tls=False, insecure=True)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data", str(tmp_path / "d"), "--workers", "0",
                                      "--token", DEFAULT_TOKEN])
    assert isinstance(result.exception, NoduleNetError)
    assert "clear text" in str(result.exception) and "--ssl-certfile" in str(result.exception)
    assert not (tmp_path / "d" / "server.json").exists()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_server_and_one_server_per_data_folder(tmp_path: Path) -> None:
    from nodulenet.serve.client import ServerClient, ServerUnreachable

    cert, key = _self_signed(tmp_path)
    data = tmp_path / "data"
    with running_server(data, workers=0, args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
                        verify=str(cert)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        # (clients are closed: an idle TLS keep-alive connection holds up uvicorn's graceful stop for 10 s)
        with ServerClient(server.url, server.token, verify=str(cert)) as client:
            info = client.info()
        assert info["tls"] is True and info["workers"]["configured"] == 0
        with pytest.raises(ServerUnreachable) as err, ServerClient(server.url, server.token) as client:
            client.info()  # the certificate is not trusted by default
        assert server.url in str(err.value)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SSL_CERT_FILE", str(cert))  # what `nodulenet predict --server https://...` users set
            with ServerClient(server.url, server.token) as client:
                assert client.info()["tls"] is True
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/health", timeout=3).raise_for_status()
        # a second server on the same data folder is refused with one line, exit code 2
        second = subprocess.run([sys.executable, "-m", "nodulenet", "serve", "--port", "0", "--data", str(data),
                                 "--workers", "0"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                                env={**os.environ, "NODULENET_TOKEN": DEFAULT_TOKEN})
        assert second.returncode == 2
        assert "another nodulenet server" in second.stderr and "Traceback" not in second.stderr
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{server.url}/health", verify=trusted).status_code == 200  # the first one is unharmed


def test_client_errors_name_the_server(tmp_path: Path) -> None:
    import socket

    from nodulenet.serve.client import ServerClient, ServerUnreachable, read_token

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerUnreachable) as err:
        ServerClient(f"http://127.0.0.1:{port}", DEFAULT_TOKEN, timeout=5).info()
    assert f"cannot reach the nodulenet server at http://127.0.0.1:{port}" in str(err.value)
    with pytest.raises(NoduleNetError, match="must look like http"):
        ServerClient("127.0.0.1:8000", DEFAULT_TOKEN)
    with pytest.raises(NoduleNetError, match="no server token"):
        read_token(None)
    holder = tmp_path / "t"
    holder.write_text("  tok-from-file \n")
    assert read_token(str(holder)) == "tok-from-file"


def test_the_client_does_not_need_the_server_extra() -> None:
    """`predict --server` and the viewer import the client on machines without FastAPI/uvicorn."""
    code = ("import sys; import nodulenet.serve.client, nodulenet.serve.client_predict; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'python_multipart', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
