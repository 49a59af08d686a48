"""``GET /metrics`` in process on fake VMMs: auth, bounded labels, what is read at scrape time,
parsed with prometheus-client's own parser."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from dataplane.app import create_app
from dataplane.bootstrap import Managers
from dataplane.metrics.scrape import endpoint_label, vmm_usage
from dataplane.runtime import Runtime
from dataplane.settings import Settings
from managers.images import ImageManager
from managers.resources import ResourceManager
from tests.support.artifacts import shared_artifacts
from tests.support.metrics import scrape
from tests.unit.test_instance_manager import FakeBackend, FakeImages, FakeNetwork, build
from tests.unit.test_resources import fake_proc

TOKEN = "metrics-token-0123456789"


def _app(tmp_path: Path, **env: str) -> Litestar:
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    proc = fake_proc(tmp_path)

    @asynccontextmanager
    async def fakes(runtime: Runtime) -> AsyncIterator[Managers]:
        images = ImageManager(runtime.paths, observer=runtime.metrics)
        await images.start()
        try:
            async with (
                ResourceManager(
                    runtime.paths.root, runtime.settings.oversubscription, proc=proc
                ) as resources,
                build(
                    runtime.paths,
                    FakeImages(disk),
                    FakeBackend(),
                    FakeNetwork(),
                    admission=resources,
                ) as instances,
            ):
                yield Managers(images=images, instances=instances, resources=resources)
        finally:
            await images.close()

    artifacts = shared_artifacts()
    settings = Settings.from_env(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
            "AUTH_TOKEN": TOKEN,
        }
        | env
    )
    return create_app(settings, managers=fakes)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Litestar]]:
    app = _app(tmp_path)
    with TestClient(app) as test_client:
        test_client.headers["authorization"] = f"Bearer {TOKEN}"
        yield test_client
    assert app.state.contract.violations == []


def test_metrics_need_the_token_like_any_endpoint(client: TestClient[Litestar]) -> None:
    refused = client.get("/metrics", headers={"authorization": ""})
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"


def test_metrics_public_opens_only_metrics(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path, METRICS_PUBLIC="true")) as anonymous:
        assert anonymous.get("/metrics").status_code == 200
        assert anonymous.get("/resources").status_code == 401
        assert anonymous.get("/instances").status_code == 401


def test_counts_follow_instances(client: TestClient[Litestar]) -> None:
    body = {"name": "web", "image": "app", "overlay_size_mb": 64, "entrypoint": ["/app/run"]}
    assert client.post("/instances", json=body).status_code == 201
    assert client.post("/instances/web/pause").status_code == 200
    samples = scrape(client)
    assert samples[("dataplane_instances", frozenset({("state", "Paused")}))] == 1
    assert samples[("dataplane_instances", frozenset({("state", "Standby")}))] == 0
    operations = "dataplane_instance_operation_duration_seconds_count"
    assert samples[(operations, frozenset({("operation", "create")}))] == 1
    assert samples[(operations, frozenset({("operation", "pause")}))] == 1
    assert samples[("dataplane_resource_allocated", frozenset({("resource", "cpu")}))] == 1
    assert samples[("dataplane_resource_allocated", frozenset({("resource", "disk")}))] == 64 << 20
    # A refused operation is counted as a request, not timed as an operation.
    assert client.post("/instances/web/pause").status_code == 409
    samples = scrape(client)
    assert samples[(operations, frozenset({("operation", "pause")}))] == 1
    refused = (
        "dataplane_http_requests_total",
        frozenset({("method", "POST"), ("route", "/instances/{id}/{action}"), ("status", "409")}),
    )
    assert samples[refused] == 1
    assert client.delete("/instances/web").status_code == 204
    samples = scrape(client)
    assert samples[("dataplane_instances", frozenset({("state", "Paused")}))] == 0


def test_route_labels_stay_bounded_whatever_the_paths(client: TestClient[Litestar]) -> None:
    for index in range(50):
        client.get(f"/instances/missing-{index}")
        client.get(f"/no/such/path/{index}")
    routes = {
        dict(labels)["route"]
        for name, labels in scrape(client)
        if name == "dataplane_http_requests_total"
    }
    # (The scrape itself is counted once it has answered.)
    assert routes == {"/instances/{id}", "unmatched"}


def test_webhook_labels_hide_credentials_and_queries() -> None:
    assert endpoint_label("https://user:pw@hooks.example:8443/in?key=secret") == (
        "https://hooks.example:8443/in"
    )


def test_vmm_usage_reads_proc_stat(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    # A command name with spaces and a ')' of its own, then the fields stat(5) lists.
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 8 + ["1000"] + ["0"] * 20
    (tmp_path / "42" / "stat").write_text("42 (qemu (x) y) " + " ".join(fields))
    usage = vmm_usage("abc", 42, str(tmp_path))
    assert usage is not None
    assert usage.cpu_seconds == 400 / os.sysconf("SC_CLK_TCK")
    assert usage.resident_bytes == 1000 * os.sysconf("SC_PAGE_SIZE")
    assert vmm_usage("abc", 43, str(tmp_path)) is None
