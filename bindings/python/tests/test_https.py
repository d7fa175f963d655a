"""The daemon client over https: TLS with a private CA and a bearer token
(the daemon refuses TCP without both), against a real hci-daemon."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hci
from conftest import _find_binary

TOKEN = "s3cret-token-for-pytest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def https_daemon(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    exe = _find_binary("hci-daemon")
    if exe is None or shutil.which("openssl") is None:
        pytest.skip("needs the hci-daemon binary and openssl")
    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert, key, csr = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "leaf.csr"
    ext = tmp_path / "leaf.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-days", "1", "-subj", "/CN=hci-test-ca",
         "-keyout", str(ca_key), "-out", str(ca)],
        ["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)],
    ):
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = _free_port()
    server = f"https://127.0.0.1:{port}"
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        [
            str(exe), "--data-dir", str(tmp_path / "data"), "--no-controllers",
            "--listen", server, "--tls-cert", str(cert), "--tls-key", str(key),
            "--token-file", str(token_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail((tmp_path / "daemon.log").read_text())
                time.sleep(0.05)
        yield server, ca.read_bytes()
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_https_with_token_and_private_ca(https_daemon: tuple[str, bytes]) -> None:
    server, ca = https_daemon
    c = hci.Client(server, token=TOKEN, ca_pem=ca)
    c.create(hci.Volume("over-tls", {"size": "8Mi"}))
    assert [v.name for v in c.list(hci.Volume)] == ["over-tls"]

    wrong = hci.Client(server, token="not-the-token", ca_pem=ca)
    with pytest.raises(hci.PermissionDenied):
        wrong.list(hci.Volume)
    # Without the private CA the server's certificate is not trusted.
    with pytest.raises(hci.HciError, match="certificate"):
        hci.Client(server, token=TOKEN).list(hci.Volume)
