"""The instance manager built on fakes of its ports: hypervisor, images and network.

The real-VM and simulator suites prove the ports; these prove the manager's own rules
(transition table, all-or-nothing create, names and ids, recovery of intents, quarantine,
the exit supervisor) in milliseconds, with the real disk tools and log pump underneath.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream

from managers.guest import GuestArtifacts
from managers.guest.markers import PREFIX
from managers.hypervisors import (
    Acceleration,
    BackendKind,
    DiskSpec,
    HypervisorBackend,
    SpecChanges,
    VmmInfo,
    VmmNotFound,
    VmSpec,
    VmState,
)
from managers.hypervisors.errors import InvalidRequest, VmmDied, wrong_state
from managers.images.errors import ImageNotFound
from managers.instances import (
    AdmissionPort,
    CreateRequest,
    InstanceExists,
    InstanceManager,
    InstanceQuarantined,
    InstanceState,
    VolumePort,
    WrongInstanceState,
    supervise,
)
from managers.instances.types import GuestStatus, RestartPolicy
from managers.network import Allocation, Bandwidth, GuestNetwork, TapError
from managers.paths import Paths
from tests.support.fake_agent import open_fake_agent

pytestmark = pytest.mark.anyio


@dataclass
class FakeImage:
    name: str
    digest: str
    disk_path: Path
    format: str = "ext4"
    config: Any = None


@dataclass
class FakeImages:
    disk: Path
    held: dict[str, int] = field(default_factory=dict)

    def acquire(self, name_or_digest: str) -> FakeImage:
        if name_or_digest not in ("app", "sha256:" + "a" * 64):
            raise ImageNotFound(name_or_digest)
        digest = "sha256:" + "a" * 64
        self.held[digest] = self.held.get(digest, 0) + 1
        return FakeImage("app", digest, self.disk)

    def release(self, digest: str) -> None:
        self.held[digest] -= 1


@dataclass
class FakeNetwork:
    taps: set[str] = field(default_factory=set)
    allocated: dict[str, str] = field(default_factory=dict)
    # The limits each TAP enforces now, as the kernel would hold them.
    limits: dict[str, Bandwidth] = field(default_factory=dict)

    def tap_name(self, instance_id: str) -> str:
        return f"tap-{instance_id}"

    async def start(self, known_instance_ids: list[str]) -> list[str]:
        orphans = {tap for tap in self.taps if tap[4:] not in known_instance_ids}
        self.taps -= orphans
        return sorted(orphans)

    async def allocate(self, instance_id: str, taken: list[str]) -> Allocation:
        address = f"192.168.100.{2 + len(self.allocated)}/24"
        self.allocated[instance_id] = address
        return Allocation(IPv4Interface(address), "02:00:00:00:00:02")

    async def release(self, instance_id: str) -> None:
        self.allocated.pop(instance_id, None)

    async def create_tap(
        self, instance_id: str, allocation: Allocation, *, bandwidth: Bandwidth | None = None
    ) -> str:
        self.taps.add(self.tap_name(instance_id))
        self.limits[instance_id] = bandwidth or Bandwidth()
        return self.tap_name(instance_id)

    async def shape(self, instance_id: str, bandwidth: Bandwidth) -> None:
        if self.tap_name(instance_id) not in self.taps:
            raise TapError(f"no TAP for {instance_id}")
        self.limits[instance_id] = bandwidth

    async def delete_tap(self, instance_id: str) -> None:
        self.taps.discard(self.tap_name(instance_id))
        self.limits.pop(instance_id, None)

    def guest_network(self, allocation: Allocation) -> GuestNetwork:
        gateway = IPv4Interface("192.168.100.1/24").ip
        return GuestNetwork(allocation.address, gateway, gateway, allocation.mac)

    def bridge_exists(self) -> bool:
        return False


class FakeVmm:
    """A VMM in memory; its guest 'prints' the init's markers into the serial file."""

    def __init__(self, backend: FakeBackend, instance_id: str) -> None:
        self.backend = backend
        self._instance_id = instance_id
        self.vm: VmState = VmState.NOT_CREATED
        self.stopped = False
        self.disks: list[str] = []
        self.readonly: dict[str, bool] = {}
        self.memory_mb = 0

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def pid(self) -> int:
        return 0 if self.stopped else 4242

    async def info(self) -> VmmInfo:
        return VmmInfo(BackendKind.CLOUD_HYPERVISOR, "fake", self.pid)

    async def create_and_boot(self, spec: VmSpec) -> None:
        if self.backend.fail_boot:
            raise VmmDied(self.instance_id, "the fake refuses to boot")
        self.vm = VmState.RUNNING
        self.disks = [disk.id for disk in spec.disks]
        self.readonly = {disk.id: disk.readonly for disk in spec.disks}
        self.memory_mb = spec.memory_mb
        script = self.backend.guest_script.pop(0) if self.backend.guest_script else None
        lines = ["init-started", "program-started"]
        if script is not None:
            lines.append(script)
        if spec.serial_file is not None:
            spec.serial_file.write_text("".join(f"\n{PREFIX}{line}\n" for line in lines))
        if script is not None:
            self.vm = VmState.SHUTDOWN

    async def state(self) -> VmState:
        if self.stopped:
            raise VmmDied(self.instance_id, "gone")
        return self.vm

    def known_state(self) -> VmState | None:
        return None

    async def pause(self) -> None:
        if self.vm is not VmState.RUNNING:
            raise wrong_state(self.instance_id, "pause", self.vm.value)
        self.vm = VmState.PAUSED

    async def resume(self) -> None:
        if self.vm is not VmState.PAUSED:
            raise wrong_state(self.instance_id, "resume", self.vm.value)
        self.vm = VmState.RUNNING

    async def shutdown(self, grace_seconds: float) -> bool:
        self.vm = VmState.SHUTDOWN
        return True

    async def reboot(self) -> None:
        self.vm = VmState.RUNNING

    async def snapshot(self, destination: Path) -> None:
        self.vm = VmState.PAUSED
        (destination / "memory").write_bytes(b"fake memory")

    async def add_disk(self, disk: DiskSpec) -> None:
        if disk.id in self.disks:
            raise InvalidRequest(self.instance_id, f"device id {disk.id!r} is already in use")
        self.disks.append(disk.id)
        self.readonly[disk.id] = disk.readonly

    async def remove_disk(self, disk_id: str) -> None:
        if disk_id not in self.disks:
            raise InvalidRequest(self.instance_id, f"no disk with id {disk_id!r}")
        self.disks.remove(disk_id)

    async def disk_ids(self) -> set[str]:
        return set(self.disks)

    async def resize_memory(self, memory_mb: int) -> None:
        if memory_mb <= self.memory_mb:
            raise InvalidRequest(self.instance_id, "memory can only grow")
        self.memory_mb = memory_mb

    async def open_agent(self) -> ByteStream:
        if self.stopped or self.vm is not VmState.RUNNING:
            raise ConnectionRefusedError("the fake guest is not running")
        return await open_fake_agent()

    async def stop(self) -> None:
        self.stopped = True
        self.backend.running.pop(self.instance_id, None)

    async def close(self) -> None:
        pass


@dataclass
class FakeBackend:
    running: dict[str, FakeVmm] = field(default_factory=dict)
    fail_boot: bool = False
    # One entry a boot: the marker the guest prints after program-started (None: runs on).
    guest_script: list[str | None] = field(default_factory=list)

    @property
    def kind(self) -> BackendKind:
        return BackendKind.CLOUD_HYPERVISOR

    async def acceleration(self, kernel: Path | None = None) -> Acceleration:
        return Acceleration.KVM

    async def version(self) -> str:
        return "fake"

    async def start_vmm(self, instance_id: str, workdir: Path) -> FakeVmm:
        vmm = FakeVmm(self, instance_id)
        self.running[instance_id] = vmm
        return vmm

    async def restore(
        self,
        instance_id: str,
        workdir: Path,
        snapshot_dir: Path,
        changes: SpecChanges | None = None,
    ) -> FakeVmm:
        assert (snapshot_dir / "memory").read_bytes() == b"fake memory"
        vmm = await self.start_vmm(instance_id, workdir)
        vmm.vm = VmState.RUNNING
        return vmm

    async def attach(self, instance_id: str, workdir: Path) -> FakeVmm:
        vmm = self.running.get(instance_id)
        if vmm is None:
            raise VmmNotFound(instance_id, "no fake VMM")
        return vmm


@dataclass
class Node:
    paths: Paths
    images: FakeImages
    backend: FakeBackend
    network: FakeNetwork
    manager: InstanceManager

    def reopen(self) -> InstanceManager:
        """A new manager on the same disk, ports and VMMs: a dataplane restart."""
        return build(self.paths, self.images, self.backend, self.network)


def build(
    paths: Paths,
    images: FakeImages,
    backend: FakeBackend,
    network: FakeNetwork,
    changes: list[tuple[str, str]] | None = None,
    volumes: VolumePort | None = None,
    admission: AdmissionPort | None = None,
) -> InstanceManager:
    kernel = paths.root / "kernel"

    async def artifacts() -> GuestArtifacts:
        return GuestArtifacts(vmlinux=kernel, bzimage=kernel, initrd=kernel, kernel_version="6.1")

    backends: dict[str, HypervisorBackend] = {"cloud-hypervisor": backend}
    return InstanceManager(
        paths,
        images=images,
        backends=backends,
        default_hypervisor="cloud-hypervisor",
        artifacts=artifacts,
        network=network,
        on_change=(lambda kind, instance: changes.append((kind, instance.id)))
        if changes is not None
        else None,
        volumes=volumes,
        admission=admission,
    )


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    images, backend, network = FakeImages(disk), FakeBackend(), FakeNetwork()
    async with build(paths, images, backend, network) as manager:
        yield Node(paths, images, backend, network, manager)


_AWAKE = (InstanceState.INITIALIZING, InstanceState.RUNNING)


def request(name: str, **extra: Any) -> CreateRequest:
    return CreateRequest(
        name=name, image="app", overlay_size_mb=16, entrypoint=("/app/run",), **extra
    )


async def test_lifecycle_follows_the_transition_table(node: Node) -> None:
    manager = node.manager
    created = await manager.create(request("web", network=True))
    assert created.state in _AWAKE
    assert (await manager.get("web")).id == created.id
    assert node.network.taps == {f"tap-{created.id}"}
    assert (await manager.pause("web")).state is InstanceState.PAUSED
    with pytest.raises(WrongInstanceState) as refused:
        await manager.pause("web")
    assert refused.value.details["allowed_states"] == ["Initializing", "Running"]
    assert (await manager.standby("web")).state is InstanceState.STANDBY
    assert node.backend.running == {}
    assert node.network.taps == set()
    # The program had started before the standby; it carries on.
    assert (await manager.restore("web")).state is InstanceState.RUNNING
    assert node.network.taps == {f"tap-{created.id}"}
    assert (await manager.stop("web")).state is InstanceState.STOPPED
    with pytest.raises(WrongInstanceState):
        await manager.restore("web")
    assert (await manager.start_instance("web")).state in _AWAKE
    await manager.delete("web")
    assert await manager.list() == []
    assert node.network.taps == set()
    assert node.network.allocated == {}
    assert node.images.held == {"sha256:" + "a" * 64: 0}
    assert list(node.paths.instances.iterdir()) == []


async def test_a_failed_create_leaves_nothing(node: Node) -> None:
    node.backend.fail_boot = True
    with pytest.raises(VmmDied):
        await node.manager.create(request("doomed", network=True))
    assert await node.manager.list() == []
    assert list(node.paths.instances.iterdir()) == []
    assert node.network.taps == set()
    assert node.network.allocated == {}
    assert node.images.held == {"sha256:" + "a" * 64: 0}
    node.backend.fail_boot = False
    assert (await node.manager.create(request("doomed"))).name == "doomed"


async def test_a_name_equal_to_an_id_is_refused(node: Node) -> None:
    first = await node.manager.create(request("first", start=False))
    with pytest.raises(InstanceExists):
        await node.manager.create(request(first.id, start=False))
    with pytest.raises(InstanceExists):
        await node.manager.create(request("first", start=False))
    assert (await node.manager.get(first.id)).name == "first"


async def test_recovery_settles_each_intent(node: Node) -> None:
    manager = node.manager
    rolled_back = await manager.create(request("half-made", start=False))
    asleep = await manager.create(request("asleep"))
    waking = await manager.create(request("waking"))
    await manager.standby("waking")
    await manager.__aexit__(None, None, None)

    def with_intent(instance_id: str, action: str) -> None:
        path = node.paths.instance_metadata(instance_id)
        record = json.loads(path.read_text())
        record["intent"] = {"action": action, "at": "2026-12-06T00:00:00.000Z"}
        path.write_text(json.dumps(record))

    with_intent(rolled_back.id, "create")
    # A standby cut short after its commit: the snapshot is there, the VMM still runs.
    with_intent(asleep.id, "standby")
    node.paths.instance_standby(asleep.id).mkdir()
    # A restore cut short before its VM ran: the standby stays.
    with_intent(waking.id, "restore")
    async with node.reopen() as manager:
        states = {i.name: i.state for i in await manager.list()}
        assert states == {"asleep": InstanceState.STANDBY, "waking": InstanceState.STANDBY}
        assert not node.paths.instance_dir(rolled_back.id).exists()
        assert node.backend.running == {}
        for instance in await manager.list():
            record = json.loads(node.paths.instance_metadata(instance.id).read_text())
            assert record["intent"] is None


async def test_an_unreadable_record_is_quarantined_with_its_disks(node: Node) -> None:
    created = await node.manager.create(request("damaged", start=False))
    await node.manager.__aexit__(None, None, None)
    node.paths.instance_metadata(created.id).write_bytes(b'{"id": "tru')
    async with node.reopen() as manager:
        (listed,) = await manager.list()
        assert listed.state is InstanceState.UNKNOWN
        assert listed.quarantine is not None
        moved = Path(listed.quarantine.path)
        assert (moved / "overlay.raw").stat().st_size == 16 << 20
        with pytest.raises(InstanceQuarantined):
            await manager.delete(created.id)
        assert (await manager.get(created.id)).quarantine == listed.quarantine
    assert not node.paths.instance_dir(created.id).exists()


async def test_an_exited_program_releases_its_vmm_unless_kept(node: Node) -> None:
    node.backend.guest_script = ["program-exited code=4", "program-exited code=0"]
    ended = await node.manager.create(request("ends"))
    kept = await node.manager.create(request("kept", keep_on_exit=True))
    instance = await _wait(node.manager, "ends", lambda i: i.state is InstanceState.STOPPED)
    assert instance.guest.exit_code == 4
    assert instance.pid is None
    assert ended.id not in node.backend.running
    await anyio.sleep(supervise.TICK_SECONDS * 3)
    assert (await node.manager.get("kept")).state is InstanceState.SHUTDOWN
    assert kept.id in node.backend.running


async def test_on_failure_restarts_with_backoff_until_success(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervise, "FIRST_BACKOFF_SECONDS", 0.05)
    node.backend.guest_script = [
        "error reason=program-not-found detail=/app",
        "program-exited code=1",
        "program-exited code=0",
    ]
    await node.manager.create(request("flaky", restart_policy=RestartPolicy.ON_FAILURE))
    done = await _wait(
        node.manager,
        "flaky",
        lambda i: i.state is InstanceState.STOPPED and i.guest.exit_code == 0,
    )
    assert done.restarts == 2
    assert node.backend.guest_script == []


async def test_a_restart_due_survives_a_restart_of_the_manager(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervise, "FIRST_BACKOFF_SECONDS", 3600.0)
    node.backend.guest_script = ["program-exited code=1", None]
    await node.manager.create(request("phoenix", restart_policy=RestartPolicy.ALWAYS))
    await _wait(node.manager, "phoenix", lambda i: i.state is InstanceState.STOPPED)
    await node.manager.__aexit__(None, None, None)
    async with node.reopen() as manager:
        # The hour-long back-off was cut short by the restart: the program runs again now.
        instance = await _wait(manager, "phoenix", lambda i: i.state in _AWAKE)
        assert instance.pid is not None
        # The start clears the pending restart as it finishes, just after the VM is up.
        metadata = node.paths.instance_metadata(instance.id)
        await _wait(
            manager, "phoenix", lambda _: not json.loads(metadata.read_text())["restart_pending"]
        )


def test_backoff_doubles_to_a_ceiling_and_resets_after_a_stable_run() -> None:
    quick = GuestStatus(
        program_started_at="2026-01-01T00:00:00.000Z", exited_at="2026-01-01T00:00:01.000Z"
    )
    delays = []
    restarts = 0
    for _ in range(8):
        delay, restarts = supervise.backoff(restarts, quick)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    stable = GuestStatus(
        program_started_at="2026-01-01T00:00:00.000Z", exited_at="2026-01-01T00:05:00.000Z"
    )
    assert supervise.backoff(restarts, stable) == (1, 1)


async def _wait(manager: InstanceManager, key: str, done: Any) -> Any:
    with anyio.fail_after(10):
        while True:
            instance = await manager.get(key)
            if done(instance):
                return instance
            await anyio.sleep(0.02)


async def test_every_change_is_reported_after_it_happened(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    changes: list[tuple[str, str]] = []
    backend = FakeBackend(guest_script=[None, "program-exited code=3"])
    async with build(paths, FakeImages(disk), backend, FakeNetwork(), changes) as manager:
        web = (await manager.create(request("web"))).id
        for action in (
            manager.pause,
            manager.resume,
            manager.reboot,
            manager.standby,
            manager.restore,
            manager.stop,
        ):
            await action("web")
        with pytest.raises(WrongInstanceState):
            await manager.resume("web")  # refused: nothing changed, nothing reported
        await manager.start_instance("web")
        await _wait(manager, "web", lambda i: i.state is InstanceState.STOPPED)
        await manager.delete("web")
    assert changes == [
        (f"instance.{kind}", web)
        for kind in (
            "created", "started", "paused", "resumed", "rebooted", "standby", "restored",
            "stopped", "started", "exited", "deleted",
        )
    ]  # fmt: skip
