"""Exec, files, stat and the clock in real guests under QEMU/TCG, through the real API.

The guest agent is the one in our initrd; the host reaches it over a virtio-serial port. Each
test makes its own instance from a busybox image whose program sleeps, so the agent has a
running guest to serve.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_ws import WebSocketSession, connect_ws
from wsproto.events import BytesMessage, TextMessage

from tests.e2e.test_instances_qemu import BOUND
from tests.integration.test_instances_api import wait_ready
from tests.support.apps import push_app
from tests.support.artifacts import shared_artifacts
from tests.support.registry import running_registry
from tests.support.server import RunningServer, run_server, wait_agent_ready

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
    ),
]

SLEEPER = "#!/bin/sh\necho up\nwhile :; do sleep 1; done\n"


@dataclass
class Guest:
    server: RunningServer
    client: httpx.Client
    image: str


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    tmp = tmp_path_factory.mktemp("qemu-agent")
    artifacts = shared_artifacts()
    with running_registry(tmp / "registry") as registry:
        image = push_app(
            registry.host,
            "tests/sleeper",
            {"/app/sleeper": SLEEPER},
            entrypoint=["/app/sleeper"],
            env=["PATH=/bin", "FROM_IMAGE=yes"],
        )
        env = {
            "HYPERVISOR": "qemu",
            "INSECURE_REGISTRIES": registry.host,
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
        }
        with (
            run_server(tmp / "data", env) as server,
            httpx.Client(base_url=server.url, timeout=BOUND) as client,
        ):
            assert client.post("/images", json={"name": image}).status_code == 202
            wait_ready(client, image)
            yield Guest(server, client, image)
            for instance in client.get("/instances").json():
                client.delete(f"/instances/{instance['id']}")


@pytest.fixture
def instance(guest: Guest, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running instance whose agent answers; deleted after the test."""
    name = request.node.name.replace("_", "-")[-40:].strip("-")
    response = guest.client.post("/instances", json={"name": name, "image": guest.image})
    assert response.status_code == 201, response.text
    instance_id = str(response.json()["id"])
    try:
        wait_agent_ready(guest.client, instance_id)
        yield instance_id
    finally:
        guest.client.delete(f"/instances/{instance_id}")


def run(client: httpx.Client, instance_id: str, **request: Any) -> dict[str, Any]:
    response = client.post(f"/instances/{instance_id}/exec", json=request)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_exec_codes_streams_stdin_env_workdir_and_user(guest: Guest, instance: str) -> None:
    client = guest.client
    result = run(client, instance, command=["sh", "-c", "echo out; echo err >&2; exit 5"])
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (5, "out\n", "err\n")
    assert result["timed_out"] is False
    echoed = run(client, instance, command=["cat"], stdin="line one\nline two\n")
    assert echoed["stdout"] == "line one\nline two\n"
    binary = bytes(range(256))
    raw = run(
        client,
        instance,
        command=["cat"],
        stdin=base64.b64encode(binary).decode(),
        encoding="base64",
    )
    assert base64.b64decode(raw["stdout"]) == binary
    env = run(client, instance, command=["sh", "-c", 'echo "$FROM_IMAGE/$MINE"'], env={"MINE": "x"})
    assert env["stdout"] == "yes/x\n"
    assert run(client, instance, command=["pwd"])["stdout"] == "/app\n"
    assert run(client, instance, command=["pwd"], workdir="/tmp")["stdout"] == "/tmp\n"
    assert run(client, instance, command=["id", "-u"])["stdout"] == "0\n"
    assert run(client, instance, command=["id", "-u"], user="app")["stdout"] == "1000\n"


def test_a_timeout_kills_the_command(guest: Guest, instance: str) -> None:
    began = time.monotonic()
    result = run(guest.client, instance, command=["sleep", "61"], timeout_seconds=1)
    assert result["timed_out"] is True
    assert result["exit_code"] is None
    assert time.monotonic() - began < 30
    # The brackets keep the pattern from matching its own command line.
    left = run(guest.client, instance, command=["sh", "-c", "ps | grep -c '[s]leep 6[1]' || true"])
    assert left["stdout"] == "0\n", left


def test_exec_errors_have_the_error_shape(guest: Guest, instance: str) -> None:
    client = guest.client
    missing = client.post(f"/instances/{instance}/exec", json={"command": ["/no/such"]})
    assert missing.status_code == 400
    assert missing.json()["code"] == "exec_failed"
    bad = client.post(f"/instances/{instance}/exec", json={"command": []})
    assert bad.status_code == 400
    assert client.post(f"/instances/{instance}/stop").status_code == 200
    stopped = client.post(f"/instances/{instance}/exec", json={"command": ["true"]})
    assert stopped.status_code == 409
    assert stopped.json()["code"] == "wrong_state"


def test_files_round_trip_directory_tar_and_stat(guest: Guest, instance: str) -> None:
    client = guest.client
    payload = bytes(range(256)) * 4096  # 1 MiB
    put = client.put(
        f"/instances/{instance}/files",
        params={"path": "/tmp/blob.bin", "mode": "0600"},
        content=payload,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put.status_code == 200, put.text
    assert put.json()["size"] == len(payload)
    assert put.json()["mode"] == "0600"
    digest = hashlib.sha256()
    with client.stream(
        "GET", f"/instances/{instance}/files", params={"path": "/tmp/blob.bin"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-file-type"] == "file"
        for chunk in r.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    inside = run(client, instance, command=["sha256sum", "/tmp/blob.bin"])["stdout"]
    assert inside.split()[0] == hashlib.sha256(payload).hexdigest()

    tar = client.get(f"/instances/{instance}/files", params={"path": "/app"})
    assert tar.status_code == 200
    assert tar.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("sleeper"))
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read().decode() == SLEEPER

    info = client.get(f"/instances/{instance}/stat", params={"path": "/app"}).json()
    assert (info["type"], info["uid"]) == ("directory", 0)
    absent = client.get(f"/instances/{instance}/stat", params={"path": "/no/such"})
    assert absent.status_code == 404
    assert absent.json()["code"] == "guest_path_not_found"


def test_concurrent_execs(guest: Guest, instance: str) -> None:
    results: dict[int, str] = {}

    def one(index: int) -> None:
        with httpx.Client(base_url=guest.server.url, timeout=BOUND) as client:
            results[index] = run(client, instance, command=["sh", "-c", f"sleep 1; echo {index}"])[
                "stdout"
            ]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND)
    assert results == {i: f"{i}\n" for i in range(6)}


def test_a_flood_of_output_is_capped_and_the_api_stays_responsive(
    guest: Guest, instance: str
) -> None:
    result = run(
        guest.client,
        instance,
        command=["sh", "-c", "head -c 8000000 /dev/zero"],
        timeout_seconds=120,
    )
    assert result["exit_code"] == 0
    assert result["stdout_truncated"] is True
    assert len(result["stdout"]) == 1 << 20
    assert guest.client.get("/health").status_code == 200


def test_an_interactive_tty_session_over_a_websocket(guest: Guest, instance: str) -> None:
    url = f"{guest.server.url}/instances/{instance}/exec"
    params = {"command": "sh", "tty": "true", "rows": "30", "cols": "90"}
    output = bytearray()
    ended: dict[str, Any] = {}
    http = httpx.Client(timeout=BOUND, params=params)
    session: WebSocketSession
    with http, connect_ws(url, http) as session:
        started = json.loads(session.receive_text())
        assert started["type"] == "started"
        session.send_bytes(b"stty size; echo hel''lo; exit 3\n")
        while not ended:
            message: object = session.receive()
            if isinstance(message, BytesMessage):
                assert message.data[:1] == b"\x01"
                output += message.data[1:]
            else:
                assert isinstance(message, TextMessage)
                ended = json.loads(message.data)
    assert ended == {"type": "exit", "exit_code": 3, "signal": None}
    assert b"30 90" in output
    assert b"hello" in output


def test_exec_and_clock_after_standby_and_restore(guest: Guest, instance: str) -> None:
    client = guest.client
    holder: dict[str, httpx.Response] = {}

    def long_exec() -> None:
        with httpx.Client(base_url=guest.server.url, timeout=BOUND) as other:
            holder["answer"] = other.post(
                f"/instances/{instance}/exec", json={"command": ["sleep", "60"]}
            )

    thread = threading.Thread(target=long_exec)
    thread.start()
    time.sleep(1.0)
    assert client.post(f"/instances/{instance}/standby").status_code == 200
    thread.join(BOUND)
    interrupted = holder["answer"]
    assert interrupted.status_code == 409, interrupted.text
    assert interrupted.json()["code"] == "agent_disconnected"
    assert "standby" in interrupted.json()["message"]

    time.sleep(4)  # the frozen guest's clock falls this far behind
    restored = client.post(f"/instances/{instance}/restore")
    assert restored.status_code == 200
    wait_agent_ready(client, instance)
    before = time.time()
    guest_time = int(run(client, instance, command=["date", "+%s"])["stdout"])
    after = time.time()
    assert int(before) - 1 <= guest_time <= int(after) + 1, (before, guest_time, after)
    assert run(client, instance, command=["echo", "again"])["stdout"] == "again\n"


def test_the_instance_reports_its_agent(guest: Guest, instance: str, tmp_path: Path) -> None:
    body = guest.client.get(f"/instances/{instance}").json()
    assert body["agent"]["ready"] is True
    assert body["agent"]["version"].startswith("dataplane-agent")
