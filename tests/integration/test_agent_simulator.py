"""Exec and files on the Cloud Hypervisor path: vsock through the simulator's hybrid socket.

The simulator serves the ``vsock`` device as Cloud Hypervisor does (``CONNECT 1024`` on its
Unix socket, ``OK <port>``, then the stream) and runs our agent, built standalone, as the guest
behind it (``CH_SIMULATOR_AGENT``). Every request the dataplane sends to the simulator, the
``vsock`` config of ``vm.create`` included, is checked against Cloud Hypervisor's API description.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    scratch: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("agent-simulator")
    agent = anyio.run(compile_standalone_agent, tmp / "agent")
    scratch = tmp / "scratch"
    scratch.mkdir()
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
            yield World(server, client, image, scratch)
            for instance in client.get("/instances").json():
                client.delete(f"/instances/{instance['id']}")
    violations = tmp / "ch-violations.log"
    assert not violations.exists() or not violations.read_text().strip(), violations.read_text()


def exec_ok(client: httpx.Client, instance_id: str, command: list[str]) -> dict[str, Any]:
    answer = client.post(f"/instances/{instance_id}/exec", json={"command": command})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_exec_files_and_stat_over_hybrid_vsock(world: World) -> None:
    client = world.client
    instance_id = client.post("/instances", json={"name": "vsock", "image": world.image}).json()[
        "id"
    ]
    wait_agent_ready(client, instance_id)
    result = exec_ok(client, instance_id, ["sh", "-c", "echo hi; id -u"])
    assert result["stdout"] == "hi\n65534\n"  # the simulator's guest runs commands as nobody
    target = str(world.scratch / "sent.txt")
    put = client.put(f"/instances/{instance_id}/files", params={"path": target}, content=b"abc")
    assert put.status_code == 200, put.text
    assert client.get(f"/instances/{instance_id}/files", params={"path": target}).content == b"abc"
    assert client.get(f"/instances/{instance_id}/stat", params={"path": target}).json()["size"] == 3


def test_pause_refuses_and_restore_reconnects(world: World) -> None:
    client = world.client
    instance_id = client.post("/instances", json={"name": "cycle", "image": world.image}).json()[
        "id"
    ]
    wait_agent_ready(client, instance_id)
    assert client.post(f"/instances/{instance_id}/pause").status_code == 200
    paused = client.post(f"/instances/{instance_id}/exec", json={"command": ["true"]})
    assert paused.status_code == 409
    assert paused.json()["code"] == "wrong_state"
    assert client.post(f"/instances/{instance_id}/resume").status_code == 200
    assert exec_ok(client, instance_id, ["echo", "resumed"])["stdout"] == "resumed\n"
    assert client.post(f"/instances/{instance_id}/standby").status_code == 200
    body = client.get(f"/instances/{instance_id}").json()
    assert body["agent"] == {"ready": False, "version": None}
    assert client.post(f"/instances/{instance_id}/restore").status_code == 200
    wait_agent_ready(client, instance_id)
    assert exec_ok(client, instance_id, ["echo", "restored"])["stdout"] == "restored\n"
