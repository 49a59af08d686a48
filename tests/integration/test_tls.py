"""HTTPS and mutual TLS on a real server process, with certificates made here by trustme:
the right client passes, none and a stranger's fail the handshake, bearer auth still applies,
and SIGHUP swaps the certificate and CA for new handshakes while an open connection goes on."""

from __future__ import annotations

import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from dataplane.settings import Settings, SettingsError
from tests.support.server import RunningServer, run_server

TOKEN = "tls-token-0123456789abcdef"


@dataclass
class Pki:
    """A server CA and a client CA, and the files the server reads."""

    server_ca: trustme.CA
    client_ca: trustme.CA
    folder: Path

    def write_server_files(self) -> dict[str, str]:
        cert = self.server_ca.issue_cert("127.0.0.1")
        cert.private_key_pem.write_to_path(str(self.folder / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.folder / "cert.pem"))
        self.client_ca.cert_pem.write_to_path(str(self.folder / "clients.pem"))
        return {
            "TLS_CERT_FILE": str(self.folder / "cert.pem"),
            "TLS_KEY_FILE": str(self.folder / "key.pem"),
            "TLS_CLIENT_CA_FILE": str(self.folder / "clients.pem"),
        }

    def client(self, issuer: trustme.CA | None) -> ssl.SSLContext:
        """A client context trusting the server CA, with a certificate from ``issuer``."""
        context = ssl.create_default_context()
        self.server_ca.configure_trust(context)
        if issuer is not None:
            issuer.issue_cert("client@example").configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(trustme.CA(), trustme.CA(), folder)


@pytest.fixture
def server(pki: Pki, tmp_path: Path) -> Iterator[RunningServer]:
    env = pki.write_server_files() | {"AUTH_TOKEN": TOKEN}
    with run_server(tmp_path / "data", env, tls=pki.client(pki.client_ca)) as running:
        yield running


def _get(url: str, context: ssl.SSLContext, token: str | None = TOKEN) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(verify=context, timeout=10) as client:
        return client.get(f"{url}/instances", headers=headers)


def test_the_right_client_passes_and_bearer_auth_applies_on_top(
    server: RunningServer, pki: Pki
) -> None:
    right = pki.client(pki.client_ca)
    assert _get(server.url, right).status_code == 200
    assert _get(server.url, right, token=None).status_code == 401


def test_no_certificate_and_a_strangers_fail_the_handshake(server: RunningServer, pki: Pki) -> None:
    with pytest.raises(httpx.TransportError):
        _get(server.url, pki.client(None))
    with pytest.raises(httpx.TransportError):
        _get(server.url, pki.client(trustme.CA()))
    with pytest.raises(httpx.TransportError):
        _get(server.url.replace("https://", "http://"), pki.client(pki.client_ca))


def test_sighup_reloads_for_new_handshakes_and_keeps_open_connections(
    server: RunningServer, pki: Pki
) -> None:
    before = pki.client(pki.client_ca)
    with httpx.Client(verify=before, timeout=10) as open_connection:
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert open_connection.get(f"{server.url}/instances", headers=headers).status_code == 200
        old_ca = pki.client_ca
        pki.server_ca, pki.client_ca = trustme.CA(), trustme.CA()
        pki.write_server_files()
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        # The connection opened before the reload is still served, on its old session.
        assert open_connection.get(f"{server.url}/instances", headers=headers).status_code == 200
    assert _get(server.url, pki.client(pki.client_ca)).status_code == 200
    with pytest.raises(httpx.TransportError):
        _get(server.url, pki.client(old_ca))


def test_a_bad_file_on_reload_keeps_the_old_certificate(server: RunningServer, pki: Pki) -> None:
    (pki.folder / "cert.pem").write_text("not a certificate\n")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS reload refused" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert _get(server.url, pki.client(pki.client_ca)).status_code == 200


def test_bad_files_stop_start_up_naming_the_variable(pki: Pki) -> None:
    env = pki.write_server_files()
    garbage = pki.folder / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    other_key = pki.folder / "other-key.pem"
    pki.server_ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    cases = {
        "TLS_CERT_FILE": env | {"TLS_CERT_FILE": str(garbage)},
        "TLS_KEY_FILE": env | {"TLS_KEY_FILE": str(other_key)},
        "TLS_CLIENT_CA_FILE": env | {"TLS_CLIENT_CA_FILE": str(garbage)},
    }
    for variable, broken in cases.items():
        with pytest.raises(SettingsError) as refused:
            Settings.from_env(broken)
        assert refused.value.variable == variable
        assert "\n" not in str(refused.value)
    alone = {"TLS_CERT_FILE": env["TLS_CERT_FILE"]}
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(alone)
    assert refused.value.variable == "TLS_KEY_FILE"
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"TLS_CLIENT_CA_FILE": env["TLS_CLIENT_CA_FILE"]})
    assert refused.value.variable == "TLS_CLIENT_CA_FILE"
    assert Settings.from_env(env).tls is not None
