"""The whole HTTP edge on an instance manager built on fake ports (``create_app(managers=…)``).

What the edge adds to the manager (the contract check in both directions, the error shape, ids
and names in paths, the transition table's answers) is exercised in milliseconds, with no VMM,
no TAP and no registry: the hypervisor, network and image ports are the fakes of
``tests/unit/test_instance_manager.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from dataplane.app import create_app
from dataplane.bootstrap import Managers
from dataplane.runtime import Runtime
from dataplane.settings import Settings
from managers.images import ImageManager
from tests.support.artifacts import shared_artifacts
from tests.unit.test_instance_manager import FakeBackend, FakeImages, FakeNetwork, build


@pytest.fixture(params=["checked", "unchecked"])
def client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient[Litestar]]:
    """The app with its contract check on, and off: a handler must stand on its own."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    network = FakeNetwork()

    @asynccontextmanager
    async def fakes(runtime: Runtime) -> AsyncIterator[Managers]:
        images = ImageManager(runtime.paths)
        await images.start()
        try:
            async with build(runtime.paths, FakeImages(disk), FakeBackend(), network) as instances:
                yield Managers(images=images, instances=instances)
        finally:
            await images.close()

    artifacts = shared_artifacts()
    settings = Settings.from_env(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
            "CONTRACT_VALIDATION": "true" if request.param == "checked" else "false",
        }
    )
    app = create_app(settings, managers=fakes)
    with TestClient(app) as test_client:
        yield test_client
    assert app.state.contract.violations == []


def test_the_edge_drives_whatever_managers_it_is_given(client: TestClient[Litestar]) -> None:
    body = {"name": "web", "image": "app", "entrypoint": ["/app/run"], "overlay_size_mb": 16}
    created = client.post("/instances", json={**body, "network": {"enabled": True}})
    assert created.status_code == 201, created.text
    instance = created.json()
    assert instance["network"]["ip"] == "192.168.100.2/24"
    assert instance["restart_policy"] == "no"
    assert client.get("/instances/web").json()["id"] == instance["id"]
    assert client.post("/instances/web/pause").json()["state"] == "Paused"
    refused = client.post("/instances/web/pause")
    assert refused.status_code == 409
    assert refused.json()["code"] == "wrong_state"
    assert refused.json()["details"]["allowed_states"] == ["Initializing", "Running"]
    clash = client.post("/instances", json={**body, "name": instance["id"]})
    assert clash.status_code == 409
    assert clash.json()["code"] == "instance_exists"
    assert client.post("/instances/web/standby").json()["state"] == "Standby"
    assert client.delete("/instances/web").status_code == 204
    assert client.get("/instances").json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "web", "image": "app", "vcpus": 1.0},
        {"name": "web", "image": "app", "vcpus": True},
        {"name": "web", "image": "app", "workdir": "/app\u0000x"},
        {"name": "web", "image": "app", "env": {"A": 1}},
        {"name": "web", "image": "app", "network": True},
        {"name": "web", "image": "app", "restart_policy": "sometimes"},
        {"name": "web", "image": "app", "surprise": 1},
        {"name": "web"},
        ["not", "an", "object"],
    ],
    ids=lambda body: str(body)[:40],
)
def test_bad_input_is_a_400_and_changes_nothing(client: TestClient[Litestar], body: object) -> None:
    answer = client.post("/instances", json=body)
    assert answer.status_code == 400, answer.text
    assert set(answer.json()) <= {"code", "message", "details"}
    assert client.get("/instances").json() == []


@pytest.mark.parametrize(
    "body",
    [{}, {"name": 1}, {"name": "alpine", "format": "zip"}, {"name": "alpine", "x": 1}, [1]],
    ids=str,
)
def test_a_bad_image_request_is_a_400_and_starts_no_build(
    client: TestClient[Litestar], body: object
) -> None:
    answer = client.post("/images", json=body)
    assert answer.status_code == 400, answer.text
    assert client.get("/images").json() == []


def test_an_archive_in_an_unknown_format_is_a_400(client: TestClient[Litestar]) -> None:
    answer = client.post(
        "/images/import?format=zip",
        content=b"not read",
        headers={"content-type": "application/x-tar"},
    )
    assert answer.status_code == 400, answer.text
    assert client.get("/images").json() == []


BINARY = {"content-type": "application/octet-stream"}


def _running(client: TestClient[Litestar]) -> str:
    created = client.post(
        "/instances", json={"name": "box", "image": "app", "entrypoint": ["/app/run"]}
    )
    assert created.status_code == 201, created.text
    instance_id: str = created.json()["id"]
    for _ in range(200):
        body = client.get(f"/instances/{instance_id}").json()
        if body["state"] == "Running" and body["agent"]["ready"]:
            return instance_id
        time.sleep(0.02)
    raise AssertionError(f"the fake agent never answered: {body}")


def test_exec_through_a_running_instances_agent(client: TestClient[Litestar]) -> None:
    instance_id = _running(client)
    body = client.get(f"/instances/{instance_id}").json()
    assert body["agent"] == {"ready": True, "version": "fake-agent 1"}
    answer = client.post("/instances/box/exec", json={"command": ["exit=3", "a b"]})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["exit_code"], result["stdout"], result["timed_out"]) == (
        3,
        "exit=3 a b\n",
        False,
    )
    raw = client.post("/instances/box/exec", json={"command": ["x"], "encoding": "base64"})
    assert raw.json()["stdout"] == "eAo="
    absent = client.get("/instances/box/stat", params={"path": "/etc/none"})
    assert absent.status_code == 404
    assert absent.json()["code"] == "guest_path_not_found"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"command": []},
        {"command": "ls"},
        {"command": ["ls", 1]},
        {"command": ["ls"], "env": {"A": 1}},
        {"command": ["ls"], "env": {"A=B": "c"}},
        {"command": ["ls"], "workdir": "relative"},
        {"command": ["ls"], "timeout_seconds": 0},
        {"command": ["ls"], "timeout_seconds": 3601},
        {"command": ["ls"], "encoding": "latin-1"},
        {"command": ["ls"], "stdin": "***", "encoding": "base64"},
        {"command": ["ls"], "surprise": True},
        ["ls"],
    ],
    ids=lambda body: str(body)[:40],
)
def test_a_bad_exec_is_a_400(client: TestClient[Litestar], body: object) -> None:
    _running(client)
    answer = client.post("/instances/box/exec", json=body)
    assert answer.status_code == 400, answer.text
    assert set(answer.json()) <= {"code", "message", "details"}


def test_guest_operations_need_a_running_instance(client: TestClient[Litestar]) -> None:
    created = client.post(
        "/instances",
        json={"name": "idle", "image": "app", "entrypoint": ["/app/run"], "start": False},
    )
    assert created.status_code == 201, created.text
    for answer in (
        client.post("/instances/idle/exec", json={"command": ["true"]}),
        client.get("/instances/idle/stat", params={"path": "/"}),
        client.get("/instances/idle/files", params={"path": "/"}),
        client.put("/instances/idle/files", params={"path": "/x"}, content=b"data", headers=BINARY),
    ):
        assert answer.status_code == 409, answer.text
        assert answer.json()["code"] == "wrong_state"
        assert answer.json()["details"]["allowed_states"] == ["Running"]
    missing = client.post("/instances/nobody/exec", json={"command": ["true"]})
    assert missing.status_code == 404


def test_a_bad_path_or_mode_is_a_400(client: TestClient[Litestar]) -> None:
    _running(client)
    for answer in (
        client.get("/instances/box/stat", params={"path": "relative"}),
        client.put(
            "/instances/box/files",
            params={"path": "/x", "mode": "999"},
            content=b"",
            headers=BINARY,
        ),
    ):
        assert answer.status_code == 400, answer.text
