"""Volumes on the Cloud Hypervisor path: attach at create, hot attach (``vm.add-disk``) and detach
(``vm.remove-device``), standby and restore with a volume, every request checked by the simulator
against Cloud Hypervisor's API description. The guest is our agent built standalone, whose
mounts are a table (it never mounts on the host), so what is proved here is the protocol: the
disks Cloud Hypervisor is given and the agent requests that go with them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from managers.guest.initrd import compile_standalone_agent
from tests.integration.test_instances_api import server_env, wait_ready
from tests.support.apps import COUNTER, push_app
from tests.support.registry import running_registry
from tests.support.server import RunningServer, run_server, wait_agent_ready

BOUND = 60.0


@dataclass
class World:
    server: RunningServer
    client: httpx.Client
    image: str
    data_dir: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("volumes-simulator")
    agent = anyio.run(compile_standalone_agent, tmp / "agent")
    with running_registry(tmp / "registry") as registry:
        image = push_app(
            registry.host, "tests/counter", {"/app/counter": COUNTER}, entrypoint=["/app/counter"]
        )
        env = {**server_env(tmp, registry.host), "CH_SIMULATOR_AGENT": str(agent)}
        with (
            run_server(tmp / "data", env) as server,
            httpx.Client(base_url=server.url, timeout=BOUND) as client,
        ):
            assert client.post("/images", json={"name": image}).status_code == 202
            wait_ready(client, image)
            yield World(server, client, image, tmp / "data")
            for instance in client.get("/instances").json():
                client.delete(f"/instances/{instance['id']}")
            for volume in client.get("/volumes").json():
                client.delete(f"/volumes/{volume['id']}")
    violations = tmp / "ch-violations.log"
    assert not violations.exists() or not violations.read_text().strip(), violations.read_text()


def _ok(answer: httpx.Response, status: int = 200) -> dict[str, object]:
    assert answer.status_code == status, answer.text
    body: dict[str, object] = answer.json()
    return body


def _disks(world: World, instance_id: str) -> dict[str, bool]:
    """The disks Cloud Hypervisor holds now (id -> readonly), from the VM's own config."""
    socket = world.data_dir / "instances" / instance_id / "vmm.sock"
    transport = httpx.HTTPTransport(uds=str(socket))
    with httpx.Client(transport=transport, base_url="http://localhost") as vmm:
        info = vmm.get("/api/v1/vm.info").json()
    return {disk["id"]: bool(disk.get("readonly")) for disk in info["config"]["disks"]}


def test_volumes_through_cloud_hypervisor(world: World) -> None:
    client = world.client
    data = _ok(client.post("/volumes", json={"name": "data", "size_mb": 64}), 201)["id"]
    shared = _ok(client.post("/volumes", json={"name": "shared", "size_mb": 64}), 201)["id"]
    created = _ok(
        client.post(
            "/instances",
            json={
                "name": "vols",
                "image": world.image,
                "volumes": [{"volume_id": "data", "mount_path": "/data"}],
            },
        ),
        201,
    )
    instance_id = str(created["id"])
    assert _disks(world, instance_id)[f"vol-{data}"] is False
    wait_agent_ready(client, instance_id)
    attached = _ok(
        client.post(
            f"/instances/{instance_id}/volumes/shared",
            json={"mount_path": "/shared", "readonly": True},
        )
    )
    assert attached["volumes"] == [
        {"volume_id": data, "mount_path": "/data", "readonly": False},
        {"volume_id": shared, "mount_path": "/shared", "readonly": True},
    ]
    assert _disks(world, instance_id)[f"vol-{shared}"] is True  # vm.add-disk, read-only
    _ok(client.post(f"/instances/{instance_id}/standby"))
    restored = _ok(client.post(f"/instances/{instance_id}/restore"))
    assert len(restored["volumes"]) == 2  # type: ignore[arg-type]
    assert {f"vol-{data}", f"vol-{shared}"} <= set(_disks(world, instance_id))
    wait_agent_ready(client, instance_id)
    detached = _ok(client.delete(f"/instances/{instance_id}/volumes/shared"))
    assert [v["volume_id"] for v in detached["volumes"]] == [data]  # type: ignore[attr-defined]
    assert f"vol-{shared}" not in _disks(world, instance_id)  # vm.remove-device
    assert _ok(client.get("/volumes/shared"))["attachments"] == []
    assert client.delete(f"/instances/{instance_id}").status_code == 204
    assert client.delete("/volumes/data").status_code == 204
    assert client.delete("/volumes/shared").status_code == 204
