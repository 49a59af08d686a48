"""The app in-process (Litestar's TestClient): routing, the Error shape, validation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from litestar import Litestar
from litestar.testing import TestClient

from dataplane.app import create_app
from dataplane.settings import Settings
from tests.support.server import ROOT


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Litestar]:
    app = create_app(Settings.from_env({"DATA_DIR": str(tmp_path / "data")}))
    yield app
    assert app.state.contract.violations == []


@pytest.fixture
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with TestClient(app) as client:
        yield client


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert set(body) <= {"code", "message", "details"}
    return body


def test_health_reports_version_node_and_hypervisor(client: TestClient[Litestar]) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["version"] == "0.1.0"
    assert body["node_id"] == "NODE_1"
    assert body["hypervisor"]["kind"] in ("cloud-hypervisor", "qemu")
    assert body["uptime_seconds"] >= 0


def test_probes(client: TestClient[Litestar]) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_readyz_is_503_outside_the_lifespan(app: Litestar) -> None:
    # Without entering the client's context the lifespan never ran: not ready.
    client = TestClient(app)
    assert_error(client.get("/readyz"), 503, "unavailable")
    body = client.get("/health").json()
    assert body["status"] == "starting"
    assert body["guest"] == {"status": "preparing", "error": None}


def test_spec_yaml_is_served_byte_for_byte(client: TestClient[Litestar]) -> None:
    response = client.get("/spec.yaml")
    assert response.status_code == 200
    assert response.content == (ROOT / "openapi.yaml").read_bytes()


def test_spec_json_is_the_same_document(client: TestClient[Litestar]) -> None:
    response = client.get("/spec.json")
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == yaml.safe_load((ROOT / "openapi.yaml").read_bytes())


def test_docs_page_loads_only_local_assets(client: TestClient[Litestar]) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert "//cdn" not in page.text
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        assert f"docs/assets/{asset}" in page.text
        response = client.get(f"/docs/assets/{asset}")
        assert response.status_code == 200
        assert len(response.content) > 1000
        cached = client.get(
            f"/docs/assets/{asset}", headers={"If-None-Match": response.headers["etag"]}
        )
        assert cached.status_code == 304


def test_unknown_route_is_404_in_the_error_shape(client: TestClient[Litestar]) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")


def test_wrong_method_is_405_in_the_error_shape(client: TestClient[Litestar]) -> None:
    assert_error(client.delete("/health"), 405, "method_not_allowed")


def test_a_request_the_spec_rejects_is_400_and_never_reaches_a_handler(
    client: TestClient[Litestar],
) -> None:
    body = assert_error(client.get("/docs/assets/..%2F..%2Fetc%2Fpasswd"), 400, "invalid_request")
    assert body["details"]["errors"][0]["parameter"] == "asset"


def test_request_id_is_echoed_or_generated(client: TestClient[Litestar]) -> None:
    given = client.get("/livez", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = client.get("/livez", headers={"X-Request-ID": "bad id\twith space"})
    assert generated.headers["x-request-id"] != "bad id\twith space"
    assert len(generated.headers["x-request-id"]) == 32


def test_contract_validation_off_still_serves(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "CONTRACT_VALIDATION": "false"})
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/docs/assets/nope").status_code == 404


def test_spec_json_is_parseable_json(client: TestClient[Litestar]) -> None:
    assert json.loads(client.get("/spec.json").content)["openapi"] == "3.1.0"
