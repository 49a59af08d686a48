"""Volumes in real guests under QEMU/TCG, through the real API: data that outlives instances,
read-only disks, hot attach and detach (PCI hot-plug and the guest agent's mounts), a busy
volume, standby and restore with a volume attached, and volumes filled from an image and a tar.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.test_instances_qemu import BOUND
from tests.integration.test_instances_api import wait_ready
from tests.support.apps import push_app
from tests.support.artifacts import shared_artifacts
from tests.support.deploy import as_the_unit
from tests.support.registry import running_registry
from tests.support.server import RunningServer, run_server, wait_agent_ready

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
    ),
]

# Says what it found on /data before anything else runs, then sleeps.
PROGRAM = (
    "#!/bin/sh\n"
    "if [ -f /data/note ]; then echo \"found: $(cat /data/note)\"; else echo 'found: nothing'; fi\n"
    "while :; do sleep 1; done\n"
)


@dataclass
class Node:
    server: RunningServer
    client: httpx.Client
    image: str


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("qemu-volumes")
    artifacts = shared_artifacts()
    with running_registry(tmp / "registry") as registry:
        image = push_app(
            registry.host, "tests/volumes", {"/app/run": PROGRAM}, entrypoint=["/app/run"]
        )
        env = {
            "HYPERVISOR": "qemu",
            "INSECURE_REGISTRIES": registry.host,
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
        }
        # Served with only the systemd unit's capabilities: image pulls, mkfs, extraction,
        # hot-plug and QEMU all work within them.
        with (
            run_server(tmp / "data", env, wrapper=as_the_unit()) as server,
            httpx.Client(base_url=server.url, timeout=BOUND) as client,
        ):
            assert client.post("/images", json={"name": image}).status_code == 202
            wait_ready(client, image)
            yield Node(server, client, image)
            for instance in client.get("/instances").json():
                client.delete(f"/instances/{instance['id']}")
            for volume in client.get("/volumes").json():
                client.delete(f"/volumes/{volume['id']}")


def _ok(answer: httpx.Response, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json() if answer.content else None


def _run(client: httpx.Client, instance: str, script: str) -> dict[str, Any]:
    result: dict[str, Any] = _ok(
        client.post(f"/instances/{instance}/exec", json={"command": ["sh", "-c", script]})
    )
    return result


def _start(node: Node, name: str, volumes: list[dict[str, Any]] | None = None) -> str:
    body: dict[str, Any] = {"name": name, "image": node.image}
    if volumes is not None:
        body["volumes"] = volumes
    instance_id = str(_ok(node.client.post("/instances", json=body), 201)["id"])
    wait_agent_ready(node.client, instance_id)
    return instance_id


def _first_line(client: httpx.Client, instance: str) -> str:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        lines = client.get(f"/instances/{instance}/logs").text
        for line in lines.splitlines():
            if line.startswith("data:") and "found:" in line:
                return line.split("found:", 1)[1].strip().strip('"}')
        time.sleep(0.2)
    raise AssertionError("the program said nothing")


def test_data_written_by_one_instance_is_read_by_the_next(node: Node) -> None:
    client = node.client
    _ok(client.post("/volumes", json={"name": "persist", "size_mb": 64}), 201)
    first = _start(node, "writer", [{"volume_id": "persist", "mount_path": "/data"}])
    assert _first_line(client, first) == "nothing"
    wrote = _run(client, first, "echo kept > /data/note && sync && cat /proc/mounts")
    assert wrote["exit_code"] == 0, wrote
    assert " /data ext4 " in wrote["stdout"]
    _ok(client.delete(f"/instances/{first}"), 204)
    second = _start(node, "reader", [{"volume_id": "persist", "mount_path": "/data"}])
    # Mounted before the program started: its first line saw the file.
    assert _first_line(client, second) == "kept"
    _ok(client.delete(f"/instances/{second}"), 204)


def test_a_read_only_volume_refuses_writes(node: Node) -> None:
    client = node.client
    _ok(client.post("/volumes", json={"name": "frozen", "size_mb": 64}), 201)
    instance = _start(
        node, "ro", [{"volume_id": "frozen", "mount_path": "/data", "readonly": True}]
    )
    refused = _run(client, instance, "touch /data/x")
    assert refused["exit_code"] != 0
    assert "Read-only file system" in refused["stderr"]
    # The disk itself is read-only: even a remount read-write cannot write to it.
    remount = _run(client, instance, "mount -o remount,rw /data && touch /data/x")
    assert remount["exit_code"] != 0
    _ok(client.delete(f"/instances/{instance}"), 204)


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_hot_attach_a_busy_detach_and_a_detach(node: Node) -> None:
    client = node.client
    imported = client.post(
        "/volumes/import?name=site&size_mb=32",
        content=_tar_gz({"www/index.html": b"<p>hello</p>\n"}),
        headers={"content-type": "application/gzip"},
    )
    _ok(imported, 201)
    instance = _start(node, "hot")
    attached = _ok(client.post(f"/instances/{instance}/volumes/site", json={"mount_path": "/srv"}))
    assert [v["mount_path"] for v in attached["volumes"]] == ["/srv"]
    assert _run(client, instance, "cat /srv/www/index.html")["stdout"] == "<p>hello</p>\n"
    holder = _run(client, instance, "sleep 600 < /srv/www/index.html > /dev/null 2>&1 & echo $!")
    pid = holder["stdout"].strip()
    busy = client.delete(f"/instances/{instance}/volumes/site")
    assert busy.status_code == 409, busy.text
    assert busy.json()["code"] == "volume_busy"
    # Nothing changed: still attached, still mounted, still readable.
    assert len(_ok(client.get(f"/instances/{instance}"))["volumes"]) == 1
    assert _run(client, instance, "cat /srv/www/index.html")["stdout"] == "<p>hello</p>\n"
    assert _run(client, instance, f"kill {pid}")["exit_code"] == 0
    time.sleep(0.2)
    detached = _ok(client.delete(f"/instances/{instance}/volumes/site"))
    assert detached["volumes"] == []
    gone = _run(client, instance, "grep ' /srv ' /proc/mounts; ls /sys/block")
    assert " /srv " not in gone["stdout"]
    assert _ok(client.get("/volumes/site"))["attachments"] == []
    # And back again: the same disk hot-plugged a second time.
    _ok(client.post(f"/instances/{instance}/volumes/site", json={"mount_path": "/srv"}))
    assert _run(client, instance, "cat /srv/www/index.html")["stdout"] == "<p>hello</p>\n"
    _ok(client.delete(f"/instances/{instance}"), 204)


def test_standby_and_restore_keep_a_hot_attached_volume(node: Node) -> None:
    client = node.client
    _ok(client.post("/volumes", json={"name": "kept", "size_mb": 64}), 201)
    instance = _start(node, "sleepy")
    _ok(client.post(f"/instances/{instance}/volumes/kept", json={"mount_path": "/kept"}))
    assert _run(client, instance, "echo before > /kept/f && sync")["exit_code"] == 0
    _ok(client.post(f"/instances/{instance}/standby"))
    restored = _ok(client.post(f"/instances/{instance}/restore"))
    assert [v["mount_path"] for v in restored["volumes"]] == ["/kept"]
    wait_agent_ready(client, instance)
    assert _run(client, instance, "cat /kept/f; echo after >> /kept/f")["stdout"] == "before\n"
    _ok(client.delete(f"/instances/{instance}/volumes/kept"))
    _ok(client.delete(f"/instances/{instance}"), 204)


def test_a_volume_filled_from_the_image(node: Node) -> None:
    client = node.client
    made = _ok(
        client.post(
            "/volumes",
            json={
                "name": "from-image",
                "size_mb": 64,
                "source": {"image": node.image, "path": "/app"},
            },
        ),
        201,
    )
    assert made["source"]["type"] == "image"
    instance = _start(
        node, "copy", [{"volume_id": "from-image", "mount_path": "/copy", "readonly": True}]
    )
    listed = _run(client, instance, "cat /copy/run")
    assert listed["stdout"] == PROGRAM
    _ok(client.delete(f"/instances/{instance}"), 204)
