"""A real server (uvicorn on 127.0.0.1 in its own process): auth, logs, shutdown, fuzzing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from httpx_ws import WebSocketSession, WebSocketUpgradeError, connect_ws

from tests.support.server import ROOT, RunningServer, run_server

TOKEN = "static-token-for-tests-0123456789"
SECRET = "jwt-secret-for-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("authed") / "data"
    with run_server(
        data, {"AUTH_TOKEN": TOKEN, "JWT_SECRET": SECRET, "LISTEN_ADDR": "127.0.0.1"}
    ) as server:
        yield server


def token(**claims: object) -> str:
    payload = {"sub": "tester", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def get(server: RunningServer, path: str, bearer: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    return httpx.get(server.url + path, headers=headers, timeout=10)


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


# A route behind auth that does not exist: with a good token it is 404, so a 404
# proves the token passed and a 401 proves it did not.
PROTECTED = "/no-such-resource"


def test_health_spec_and_docs_stay_open(authed: RunningServer) -> None:
    for path in ("/health", "/healthz", "/livez", "/readyz", "/spec.yaml", "/spec.json", "/docs"):
        assert get(authed, path).status_code == 200, path


def test_missing_token_is_401(authed: RunningServer) -> None:
    assert_401(get(authed, PROTECTED))


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "bearer", TOKEN, f"Token {TOKEN}", f"Bearer {TOKEN} extra"],
)
def test_malformed_authorization_is_401(authed: RunningServer, header: str) -> None:
    response = httpx.get(authed.url + PROTECTED, headers={"Authorization": header}, timeout=10)
    assert_401(response)


def test_wrong_static_token_is_401(authed: RunningServer) -> None:
    assert_401(get(authed, PROTECTED, TOKEN[:-1] + "x"))
    assert_401(get(authed, PROTECTED, TOKEN + "x"))


def test_expired_jwt_is_401(authed: RunningServer) -> None:
    response = get(authed, PROTECTED, token(exp=int(time.time()) - 60))
    assert_401(response)
    assert "expired" in response.json()["message"]


def test_jwt_without_exp_is_401(authed: RunningServer) -> None:
    assert_401(get(authed, PROTECTED, jwt.encode({"sub": "x"}, SECRET, algorithm="HS256")))


def test_jwt_with_another_algorithm_is_401(authed: RunningServer) -> None:
    payload = {"sub": "x", "exp": int(time.time()) + 300}
    assert_401(get(authed, PROTECTED, jwt.encode(payload, SECRET, algorithm="HS512")))
    unsigned = jwt.encode(payload, "", algorithm="none")
    assert_401(get(authed, PROTECTED, unsigned))


def test_jwt_signed_with_another_secret_is_401(authed: RunningServer) -> None:
    forged = jwt.encode(
        {"exp": int(time.time()) + 300}, "another-secret-0123456789abcdef", algorithm="HS256"
    )
    assert_401(get(authed, PROTECTED, forged))


def test_right_tokens_pass(authed: RunningServer) -> None:
    assert get(authed, PROTECTED, TOKEN).status_code == 404
    assert get(authed, PROTECTED, token()).status_code == 404


def test_every_log_line_is_json_with_a_request_id(authed: RunningServer) -> None:
    response = httpx.get(
        authed.url + PROTECTED, headers={"X-Request-ID": "trace-me-42"}, timeout=10
    )
    assert response.headers["x-request-id"] == "trace-me-42"
    time.sleep(0.2)
    lines = [json.loads(line) for line in authed.log().splitlines() if line.strip()]
    assert all({"time", "level", "message", "request_id"} <= set(line) for line in lines)
    mine = [line for line in lines if line["request_id"] == "trace-me-42"]
    assert mine
    assert mine[-1]["status"] == 401
    assert "static-token" not in authed.log()


def test_unauthenticated_server_warns_and_binds_loopback(tmp_path: Path) -> None:
    with run_server(tmp_path / "data") as server:
        assert get(server, "/health").status_code == 200
        assert get(server, PROTECTED).status_code == 404
        log = server.log()
    assert "unauthenticated" in log
    assert "127.0.0.1" in log


def test_sigterm_shuts_down_gracefully(tmp_path: Path) -> None:
    with run_server(tmp_path / "data") as server:
        assert get(server, "/readyz").status_code == 200
        code = server.stop()
    assert code == 0
    assert "dataplane stopping" in server.log()


def test_schemathesis_finds_no_server_error_and_no_contract_violation(tmp_path: Path) -> None:
    # Registry look-ups fail at once (a proxy on a closed port) instead of waiting
    # for a network this machine does not have.
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    with run_server(tmp_path / "data", {"AUTH_TOKEN": TOKEN, **offline}) as server:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(ROOT / "tests" / "schemathesis.toml"),
                "run",
                str(ROOT / "openapi.yaml"),
                "--url",
                server.url,
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--seed",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_exec_websocket_is_authenticated(authed: RunningServer) -> None:
    url = f"{authed.url}/instances/nobody/exec"
    params = {"command": "true"}
    with httpx.Client(timeout=10, params=params) as client:
        with pytest.raises(WebSocketUpgradeError) as refused, connect_ws(url, client):
            pass
        assert refused.value.response.status_code == 401
    # The same handshake by hand, to read the refusal's body: the error shape.
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    assert_401(httpx.get(url, params=params, headers=handshake, timeout=10))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    session: WebSocketSession
    with (
        httpx.Client(timeout=10, params=params, headers=bearer) as client,
        connect_ws(url, client) as session,
    ):
        message = json.loads(session.receive_text())
        assert message["type"] == "error"
        assert message["code"] == "instance_not_found"
    plain = httpx.get(url, params=params, headers=bearer, timeout=10)
    assert plain.status_code == 426
    assert plain.json()["code"] == "upgrade_required"
