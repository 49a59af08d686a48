"""``GET /resources`` and admission over HTTP: fake VMMs, the real resource manager on a fake
``/proc`` with 2 GiB of memory, the contract check on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from dataplane.app import create_app
from dataplane.bootstrap import Managers
from dataplane.runtime import Runtime
from dataplane.settings import Settings
from managers.images import ImageManager
from managers.resources import ResourceManager
from tests.support.artifacts import shared_artifacts
from tests.unit.test_instance_manager import FakeBackend, FakeImages, FakeNetwork, build
from tests.unit.test_resources import fake_proc

MIB = 1 << 20


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Litestar]]:
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    proc = fake_proc(tmp_path)

    @asynccontextmanager
    async def fakes(runtime: Runtime) -> AsyncIterator[Managers]:
        images = ImageManager(runtime.paths)
        await images.start()
        try:
            async with ResourceManager(
                runtime.paths.root, runtime.settings.oversubscription, proc=proc
            ) as resources:
                instances = build(
                    runtime.paths,
                    FakeImages(disk),
                    FakeBackend(),
                    FakeNetwork(),
                    admission=resources,
                )
                async with instances:
                    yield Managers(images=images, instances=instances, resources=resources)
        finally:
            await images.close()

    artifacts = shared_artifacts()
    settings = Settings.from_env(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
            "CPU_OVERSUB_RATIO": "1",
        }
    )
    app = create_app(settings, managers=fakes)
    with TestClient(app) as test_client:
        yield test_client
    assert app.state.contract.violations == []


def _create(client: TestClient[Litestar], name: str, **extra: Any) -> Any:
    body = {"name": name, "image": "app", "overlay_size_mb": 64, "entrypoint": ["/app/run"]}
    return client.post("/instances", json=body | extra)


def _instance_dirs(client: TestClient[Litestar]) -> list[str]:
    root = Path(client.app.state.runtime.paths.root) / "instances"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_allocations_follow_instances(client: TestClient[Litestar]) -> None:
    empty = client.get("/resources").json()
    assert empty["allocations"] == []
    assert empty["memory"] == {
        "type": "memory",
        "capacity": 2048 * MIB,
        "effective_limit": 2048 * MIB,
        "allocated": 0,
        "available": 2048 * MIB,
        "oversub_ratio": 1.0,
    }
    assert empty["cpu"]["oversub_ratio"] == 1.0
    assert empty["disk"]["allocated"] == 0
    assert set(empty["usage"]) == {
        "cpu_percent",
        "cpu_interval_seconds",
        "memory_used_bytes",
        "disk_used_bytes",
    }
    web = _create(
        client,
        "web",
        memory_mb=512,
        vcpus=1,
        network={"enabled": True, "bandwidth": {"ingress_mbps": 100}},
    )
    assert web.status_code == 201, web.text
    idle = _create(client, "idle", memory_mb=256, start=False)
    assert idle.status_code == 201, idle.text
    report = client.get("/resources").json()
    assert report["allocations"] == [
        {
            "instance_id": web.json()["id"],
            "instance_name": "web",
            "vcpus": 1,
            "memory_bytes": 512 * MIB,
            "disk_bytes": 64 * MIB,
            "network": {"ingress_mbps": 100, "egress_mbps": None},
        },
        {
            "instance_id": idle.json()["id"],
            "instance_name": "idle",
            "vcpus": 0,
            "memory_bytes": 0,
            "disk_bytes": 64 * MIB,
            "network": None,
        },
    ]
    assert report["network"] == {
        "ingress_mbps": 100,
        "egress_mbps": 0,
        "unlimited_ingress": 0,
        "unlimited_egress": 1,
    }
    patched = client.patch(
        "/instances/web",
        json={"network": {"bandwidth": {"ingress_mbps": 40, "egress_mbps": 10}}},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["network"]["bandwidth"] == {"ingress_mbps": 40, "egress_mbps": 10}
    assert client.get("/resources").json()["network"] == {
        "ingress_mbps": 40,
        "egress_mbps": 10,
        "unlimited_ingress": 0,
        "unlimited_egress": 0,
    }
    for body in [
        {"network": {"bandwidth": {"ingress_mbps": 0}}},
        {"network": {"enabled": False}},
        {"memory_mb": 1024},
    ]:
        refused = client.patch("/instances/web", json=body)
        assert refused.status_code == 400, refused.text
    refused = client.patch("/instances/idle", json={"network": {"bandwidth": {}}})
    assert refused.status_code == 400, refused.text
    assert "without a network" in refused.json()["message"]
    assert report["memory"]["allocated"] == 512 * MIB
    assert report["memory"]["available"] == 1536 * MIB
    assert report["cpu"]["allocated"] == 1
    assert report["disk"]["allocated"] == 128 * MIB
    assert report["disk_breakdown"]["overlays_bytes"] == 128 * MIB
    assert client.post("/instances/web/standby").status_code == 200
    assert client.get("/resources").json()["memory"]["allocated"] == 0
    assert client.get("/resources").json()["network"]["ingress_mbps"] == 0
    assert client.delete("/instances/web").status_code == 204
    assert client.delete("/instances/idle").status_code == 204
    assert client.get("/resources").json()["allocations"] == []


def test_an_instance_that_does_not_fit_is_refused_and_nothing_is_made(
    client: TestClient[Litestar],
) -> None:
    assert _create(client, "big", memory_mb=1536).status_code == 201
    before = _instance_dirs(client)
    refused = _create(client, "more", memory_mb=1024)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["code"] == "insufficient_resources"
    assert body["details"]["resource"] == "memory"
    assert body["details"]["short_by"] == 512 * MIB
    assert "MEMORY_OVERSUB_RATIO" in body["message"]
    assert _instance_dirs(client) == before
    assert [i["name"] for i in client.get("/instances").json()] == ["big"]
    # The name was not kept: the same create fits once the other is gone.
    assert client.delete("/instances/big").status_code == 204
    assert _create(client, "more", memory_mb=1024).status_code == 201


def test_start_and_restore_are_admitted(client: TestClient[Litestar]) -> None:
    assert _create(client, "sleeper", memory_mb=1024).status_code == 201
    assert client.post("/instances/sleeper/standby").status_code == 200
    assert _create(client, "later", memory_mb=1536, start=False).status_code == 201
    assert client.post("/instances/later/start").status_code == 200
    refused = client.post("/instances/sleeper/restore")
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "insufficient_resources"
    assert client.get("/instances/sleeper").json()["state"] == "Standby"
    assert client.post("/instances/later/stop").status_code == 200
    assert client.post("/instances/sleeper/restore").status_code == 200
    refused = client.post("/instances/later/start")
    assert refused.status_code == 409, refused.text
    assert client.get("/instances/later").json()["state"] == "Stopped"
    cpus = client.get("/resources").json()["cpu"]["effective_limit"]
    if cpus >= 64:
        return  # the spec's own ceiling on vcpus comes first
    too_many = _create(client, "wide", memory_mb=64, vcpus=cpus + 1)
    assert too_many.status_code == 409, too_many.text
    assert too_many.json()["details"]["resource"] == "cpu"
