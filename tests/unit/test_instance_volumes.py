"""Volumes on instances, on fake VMMs and a fake agent with the real volume manager (mkfs):
attach at create, hot and cold attach and detach, the rules, and what a restart finds."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from managers.instances import (
    InstanceManager,
    InstanceNotFound,
    InstanceState,
    InvalidInstanceSpec,
    VolumeNotAttached,
    VolumeRequest,
    WrongInstanceState,
)
from managers.instances.types import AttachedVolume, Intent, IntentKind
from managers.paths import Paths
from managers.volumes import (
    CreateVolume,
    VolumeBusy,
    VolumeInUse,
    VolumeManager,
    VolumeNotFound,
    disk_serial,
)
from tests.unit.test_guest_config_disk import decode
from tests.unit.test_instance_manager import (
    FakeBackend,
    FakeImages,
    FakeNetwork,
    build,
    request,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)"),
]
TAG_VOLUME = 10


@dataclass
class Node:
    paths: Paths
    images: FakeImages
    backend: FakeBackend
    network: FakeNetwork
    volumes: VolumeManager
    manager: InstanceManager

    def reopen(self) -> InstanceManager:
        return build(self.paths, self.images, self.backend, self.network, volumes=self.volumes)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    images, backend, network = FakeImages(disk), FakeBackend(), FakeNetwork()
    async with VolumeManager(paths) as volumes:
        for name in ("data", "shared", "other"):
            await volumes.create(CreateVolume(name, 16))
        async with build(paths, images, backend, network, volumes=volumes) as manager:
            yield Node(paths, images, backend, network, volumes, manager)


def _mounts(node: Node, instance_id: str) -> list[tuple[bool, str, str]]:
    """The VOLUME records of the instance's config disk: (readonly, source, path)."""
    data = node.paths.instance_config_disk(instance_id).read_bytes()
    found = []
    for tag, value in decode(data):
        if tag == TAG_VOLUME:
            length = int.from_bytes(value[1:3], "little")
            found.append(
                (value[0] == 1, value[3 : 3 + length].decode(), value[3 + length :].decode())
            )
    return found


async def _agent_up(node: Node, key: str) -> None:
    """Wait for the guest to say its program started (the log pump reads it in the
    background), then for the agent's channel."""
    for _ in range(1000):
        if (await node.manager.get(key)).state is InstanceState.RUNNING:
            break
        await anyio.sleep(0.01)
    await node.manager.agent(key)


async def _id(node: Node, name: str) -> str:
    return (await node.volumes.get(name)).id


async def test_volumes_given_at_create_are_disks_and_config(node: Node) -> None:
    data, shared = await _id(node, "data"), await _id(node, "shared")
    created = await node.manager.create(
        request(
            "web",
            volumes=(
                VolumeRequest("data", "/var/lib/data"),
                VolumeRequest(shared, "/shared/", readonly=True),
            ),
        )
    )
    assert created.record is not None
    assert created.record.volumes == (
        AttachedVolume(data, "/var/lib/data", False),
        AttachedVolume(shared, "/shared", True),
    )
    vmm = node.backend.running[created.id]
    assert vmm.readonly[disk_serial(data)] is False
    assert vmm.readonly[disk_serial(shared)] is True  # enforced by the hypervisor
    assert _mounts(node, created.id) == [
        (False, disk_serial(data), "/var/lib/data"),
        (True, disk_serial(shared), "/shared"),
    ]
    uses = (await node.volumes.get("data")).attachments
    assert [(u.instance_id, u.mount_path, u.readonly) for u in uses] == [
        (created.id, "/var/lib/data", False)
    ]
    # Deleting the instance lets go of the volumes and keeps their data.
    await node.manager.delete("web")
    assert (await node.volumes.get("data")).attachments == ()
    assert node.volumes.data_path(data).exists()


@pytest.mark.parametrize(
    ("volumes", "error"),
    [
        ((VolumeRequest("missing", "/data"),), VolumeNotFound),
        ((VolumeRequest("data", "/a"), VolumeRequest("data", "/b")), VolumeInUse),
        ((VolumeRequest("data", "/a"), VolumeRequest("shared", "/a")), InvalidInstanceSpec),
        ((VolumeRequest("data", "/a"), VolumeRequest("shared", "/a/b")), InvalidInstanceSpec),
    ],
)
async def test_a_create_with_bad_volumes_changes_nothing(
    node: Node, volumes: tuple[VolumeRequest, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await node.manager.create(request("web", volumes=volumes))
    assert await node.manager.list() == []
    assert all(v.attachments == () for v in await node.volumes.list())
    assert node.images.held == {"sha256:" + "a" * 64: 0} or node.images.held == {}


@pytest.mark.parametrize("path", ["relative", "/", "/a/../b", "/proc", "/sys/x", "/dev"])
def test_mount_paths_that_cannot_be_used_are_refused(path: str) -> None:
    with pytest.raises(InvalidInstanceSpec):
        VolumeRequest.from_json({"volume_id": "data", "mount_path": path})


async def test_a_read_write_volume_has_one_instance(node: Node) -> None:
    await node.manager.create(request("one", volumes=(VolumeRequest("data", "/d"),)))
    with pytest.raises(VolumeInUse):
        await node.manager.create(request("two", volumes=(VolumeRequest("data", "/d", True),)))
    await node.manager.create(request("ro1", volumes=(VolumeRequest("shared", "/s", True),)))
    await node.manager.create(request("ro2", volumes=(VolumeRequest("shared", "/s", True),)))
    with pytest.raises(VolumeInUse):
        await node.manager.attach_volume("one", VolumeRequest("shared", "/s"))
    assert [i.name for i in await node.manager.list()] == ["one", "ro1", "ro2"]


async def test_hot_attach_and_detach_on_a_running_instance(node: Node) -> None:
    created = await node.manager.create(request("web"))
    await _agent_up(node, "web")
    data = await _id(node, "data")
    attached = await node.manager.attach_volume("web", VolumeRequest("data", "/data", True))
    assert attached.state is InstanceState.RUNNING
    assert attached.record is not None
    assert attached.record.volumes == (AttachedVolume(data, "/data", True),)
    vmm = node.backend.running[created.id]
    assert disk_serial(data) in vmm.disks
    assert vmm.readonly[disk_serial(data)] is True
    assert _mounts(node, created.id) == [(True, disk_serial(data), "/data")]
    with pytest.raises(VolumeInUse, match="already attached"):
        await node.manager.attach_volume("web", VolumeRequest("data", "/again", True))
    detached = await node.manager.detach_volume("web", "data")
    assert detached.record is not None
    assert detached.record.volumes == ()
    assert disk_serial(data) not in vmm.disks
    assert _mounts(node, created.id) == []
    with pytest.raises(VolumeNotAttached):
        await node.manager.detach_volume("web", "data")
    await node.volumes.delete("data")


async def test_a_busy_volume_is_not_detached(node: Node) -> None:
    created = await node.manager.create(request("web"))
    await _agent_up(node, "web")
    data = await _id(node, "data")
    await node.manager.attach_volume("web", VolumeRequest("data", "/busy"))
    with pytest.raises(VolumeBusy):
        await node.manager.detach_volume("web", "data")
    after = await node.manager.get("web")
    assert after.record is not None
    assert after.record.volumes == (AttachedVolume(data, "/busy", False),)
    assert after.record.intent is None
    assert disk_serial(data) in node.backend.running[created.id].disks
    assert len((await node.volumes.get("data")).attachments) == 1


async def test_cold_attach_is_for_the_next_boot_and_standby_refuses(node: Node) -> None:
    created = await node.manager.create(request("web", start=False))
    data = await _id(node, "data")
    attached = await node.manager.attach_volume("web", VolumeRequest("data", "/data"))
    assert attached.state is InstanceState.CREATED
    assert _mounts(node, created.id) == [(False, disk_serial(data), "/data")]
    await node.manager.start_instance("web")
    assert disk_serial(data) in node.backend.running[created.id].disks
    await node.manager.standby("web")
    with pytest.raises(WrongInstanceState):
        await node.manager.attach_volume("web", VolumeRequest("shared", "/shared"))
    with pytest.raises(WrongInstanceState):
        await node.manager.detach_volume("web", "data")
    restored = await node.manager.restore("web")
    assert restored.record is not None
    assert [v.volume_id for v in restored.record.volumes] == [data]
    await node.manager.stop("web")
    await node.manager.detach_volume("web", "data")
    assert _mounts(node, created.id) == []
    with pytest.raises(InstanceNotFound):
        await node.manager.attach_volume("nope", VolumeRequest("data", "/d"))


async def test_a_restart_claims_the_volumes_again(node: Node) -> None:
    await node.manager.create(request("web", volumes=(VolumeRequest("data", "/d"),)))
    await node.manager.__aexit__(None, None, None)
    node.volumes._claims.clear()  # a new process: claims live in memory only
    async with node.reopen():
        assert len((await node.volumes.get("data")).attachments) == 1
        with pytest.raises(VolumeInUse):
            await node.volumes.delete("data")


async def test_an_attach_cut_short_with_no_vm_is_undone(node: Node) -> None:
    created = await node.manager.create(request("web", start=False))
    await node.manager.__aexit__(None, None, None)
    data = await _id(node, "data")
    record = created.record
    assert record is not None
    volume = AttachedVolume(data, "/data", False)
    crashed = record.evolve(intent=Intent(IntentKind.ATTACH, record.created_at, volume=volume))
    node.paths.instance_metadata(created.id).write_text(__import__("json").dumps(crashed.to_json()))
    node.volumes._claims.clear()
    async with node.reopen() as manager:
        after = await manager.get("web")
        assert after.record is not None
        assert after.record.intent is None
        assert after.record.volumes == ()
        assert (await node.volumes.get("data")).attachments == ()
