"""What every instance operation shares: the records, live handles, ports and helpers.

The operations (``create.py``, ``actions.py``, ``standby.py``, ``recovery.py``,
``supervise.py``, ``views.py``) are functions of a :class:`Context`; ``manager.py`` is the
public surface that resolves names, takes the lock and calls them. Records live in memory,
loaded once at start-up; the disk is written through on every change, so a read never
parses a record from disk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from managers.agent import AgentLink
from managers.guest import GuestArtifacts, kernel_cmdline
from managers.guest.cmdline import qemu_extra
from managers.hypervisors import (
    BackendKind,
    DiskSpec,
    HypervisorBackend,
    NetSpec,
    Vmm,
    VmSpec,
    terminate_recorded,
)
from managers.instances.allocations import held_by_all
from managers.instances.errors import InstanceNotFound, InstanceQuarantined, InvalidInstanceSpec
from managers.instances.logs import DEFAULT_RETENTION_BYTES, LogTally, SegmentedLog
from managers.instances.pump import LogPump, PumpSet
from managers.instances.store import InstanceStore
from managers.instances.types import PUMPED_SOURCES, Instance, InstanceRecord, QuarantineInfo
from managers.network import Allocation, Bandwidth, GuestNetwork
from managers.paths import Paths
from managers.resources import Demand
from managers.volumes import VolumeRef, disk_serial

log = logging.getLogger("managers.instances")


class ImageLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def disk_path(self) -> Path | None: ...
    @property
    def config(self) -> Any: ...


class ImageSource(Protocol):
    """What instances need of the images subsystem."""

    def acquire(self, name_or_digest: str) -> ImageLike: ...

    def release(self, digest: str) -> None: ...


class NetworkPort(Protocol):
    """What instances need of the network subsystem (``NetworkManager`` is the real one)."""

    def tap_name(self, instance_id: str) -> str: ...

    async def start(self, known_instance_ids: list[str]) -> list[str]: ...

    async def allocate(self, instance_id: str, taken: list[str]) -> Allocation: ...

    async def release(self, instance_id: str) -> None: ...

    async def create_tap(
        self, instance_id: str, allocation: Allocation, *, bandwidth: Bandwidth | None = None
    ) -> str: ...

    async def shape(self, instance_id: str, bandwidth: Bandwidth) -> None: ...

    async def delete_tap(self, instance_id: str) -> None: ...

    def guest_network(self, allocation: Allocation) -> GuestNetwork: ...

    def bridge_exists(self) -> bool: ...


class VolumePort(Protocol):
    """What instances need of the volumes subsystem (``VolumeManager`` is the real one)."""

    def claim(self, key: str, instance_id: str, mount_path: str, readonly: bool) -> VolumeRef: ...

    def adopt(self, volume_id: str, instance_id: str, mount_path: str, readonly: bool) -> bool: ...

    def release(self, volume_id: str, instance_id: str) -> None: ...

    def resolve(self, key: str) -> str: ...

    def data_path(self, volume_id: str) -> Path: ...

    def changed_attachment(self, kind: str, volume_id: str) -> None: ...


class AdmissionPort(Protocol):
    """What instances need of the resources subsystem (``ResourceManager`` is the real one)."""

    def reserve(
        self, key: str, demand: Demand, held: Mapping[str, Demand]
    ) -> AbstractAsyncContextManager[None]: ...


class IngressPort(Protocol):
    """What instances need of the ingresses subsystem (``IngressManager`` is the real one)."""

    async def instance_removed(self, instance_id: str) -> None: ...


@dataclass
class Live:
    """The in-memory side of one instance: its lock, log pump and VMM handle."""

    lock: anyio.Lock
    pump: LogPump
    vmm: Vmm | None = None
    # A VMM that runs but could not be attached to at start-up (it hangs, or speaks a
    # version we refuse): the instance reads Unknown and stop/delete end it by its record.
    unreachable: str | None = None
    # supervise.py: the boot whose program exit was dealt with, and a pending restart.
    handled_boot: int = -1
    restarts: int = 0
    restart_at: float | None = None
    # The channel to the guest agent while the VMM runs (see ``start_agent``).
    agent: AgentLink | None = None


# Told of every change after it happened: ("instance.paused", the instance as it then reads).
# The edge makes events of these; the instance manager knows nothing of how.
ChangeCallback = Callable[[str, Instance], None]


class Context:
    def __init__(
        self,
        paths: Paths,
        *,
        images: ImageSource,
        backends: Mapping[str, HypervisorBackend],
        default_hypervisor: str,
        artifacts: Callable[[], Awaitable[GuestArtifacts]],
        network: NetworkPort | None,
        stop_grace_seconds: float,
        on_change: ChangeCallback | None = None,
        volumes: VolumePort | None = None,
        admission: AdmissionPort | None = None,
        log_tally: LogTally | None = None,
        ingresses: IngressPort | None = None,
        log_retention_bytes: int = DEFAULT_RETENTION_BYTES,
    ) -> None:
        self.paths = paths
        self.log_retention_bytes = log_retention_bytes
        self.images = images
        self.backends = dict(backends)
        self.default_hypervisor = default_hypervisor
        self.artifacts = artifacts
        self.network = network
        self.volumes = volumes
        self.admission = admission
        self.ingresses = ingresses
        self.log_tally = log_tally or LogTally()
        self.grace = stop_grace_seconds
        self._on_change = on_change
        self.store = InstanceStore(paths)
        self.records: dict[str, InstanceRecord] = {}
        self.names: dict[str, str] = {}  # name -> id, reserved from the start of a create
        self.quarantined: dict[str, QuarantineInfo] = {}  # original id -> where it went
        self.live: dict[str, Live] = {}
        self.pumps = PumpSet()
        # Starts a background task for the manager's lifetime (set by the manager on entry).
        self.spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None] | None = None
        self._network_lock = anyio.Lock()
        self._network_started = False

    def changed(self, kind: str, instance: Instance) -> None:
        """Report a change that has happened (see ``ChangeCallback``)."""
        if self._on_change is not None:
            self._on_change(kind, instance)

    @asynccontextmanager
    async def admitted(self, instance_id: str, demand: Demand) -> AsyncIterator[None]:
        """Run an operation that takes ``demand`` once the node has room (refused if not)."""
        if self.admission is None:
            yield
            return
        async with self.admission.reserve(instance_id, demand, held_by_all(self)):
            yield

    # -- records ----------------------------------------------------------------------
    def resolve(self, key: str) -> str:
        """The id ``key`` names: an id first, then a name (ids never equal another's name)."""
        if key in self.records:
            return key
        instance_id = self.names.get(key)
        if instance_id is not None and instance_id in self.records:
            return instance_id
        info = self.quarantined.get(key)
        if info is not None:
            raise InstanceQuarantined(key, info.path, info.reason)
        raise InstanceNotFound(key)

    def record(self, instance_id: str) -> InstanceRecord:
        record = self.records.get(instance_id)
        if record is None:
            raise InstanceNotFound(instance_id)
        return record

    async def save(self, record: InstanceRecord) -> InstanceRecord:
        """Write ``record`` through to disk (atomically, durably), then keep it."""
        await anyio.to_thread.run_sync(self.store.save, record)
        self.records[record.id] = record
        return record

    def forget(self, record: InstanceRecord) -> None:
        self.records.pop(record.id, None)
        if self.names.get(record.name) == record.id:
            del self.names[record.name]
        self.live.pop(record.id, None)

    # -- live handles -----------------------------------------------------------------
    def live_for(self, instance_id: str) -> Live:
        live = self.live.get(instance_id)
        if live is None:
            paths = self.paths
            live = Live(
                lock=anyio.Lock(),
                pump=LogPump(
                    instance_id=instance_id,
                    serial_raw=paths.instance_serial_raw(instance_id),
                    output_raw=paths.instance_output_raw(instance_id),
                    vmm_raw=paths.instance_vmm_raw(instance_id),
                    logs={source: self.log(instance_id, source) for source in PUMPED_SOURCES},
                    state_file=paths.instance_pump_state(instance_id),
                    status_file=paths.instance_guest_status(instance_id),
                ),
            )
            self.live[instance_id] = live
        return live

    def backend(self, record: InstanceRecord) -> HypervisorBackend:
        backend = self.backends.get(record.hypervisor)
        if backend is None:
            raise InvalidInstanceSpec(
                f"instance {record.id} needs hypervisor {record.hypervisor!r}, "
                "which this node does not have"
            )
        return backend

    def log(self, instance_id: str, source: str) -> SegmentedLog:
        """One source's log of an instance, with the node's retention."""
        return SegmentedLog(
            self.paths.instance_logs(instance_id),
            source,
            retention_bytes=self.log_retention_bytes,
            tally=self.log_tally,
        )

    async def new_output_files(self, instance_id: str, live: Live) -> None:
        """Before a new VMM: remove the serial and output files the last one wrote.

        The new VMM then writes new files (not truncated ones), which the pump, told so,
        reads from their start."""
        paths = self.paths
        for raw in (
            paths.instance_serial_raw(instance_id),
            paths.instance_output_raw(instance_id),
        ):
            await anyio.to_thread.run_sync(raw.unlink, True)
        await anyio.to_thread.run_sync(live.pump.new_vmm)

    def start_pump(self, instance_id: str) -> None:
        self.pumps.add(instance_id, self.live_for(instance_id).pump)

    async def stop_pump(self, instance_id: str, live: Live) -> None:
        """Stop following once no drain runs, then copy what is left."""
        await self.pumps.remove(instance_id)
        await anyio.to_thread.run_sync(live.pump.drain)

    # -- network ----------------------------------------------------------------------
    async def ensure_network(self) -> NetworkPort:
        if self.network is None:
            raise InvalidInstanceSpec("networking is not enabled on this node")
        async with self._network_lock:
            if not self._network_started:
                known = [r.id for r in self.records.values() if r.network.enabled]
                for tap in await self.network.start(known):
                    log.info("removed orphan TAP %s", tap)
                self._network_started = True
        return self.network

    async def create_tap(self, record: InstanceRecord) -> bool:
        """The instance's TAP, when it has a network; True when one was made."""
        if not record.network.enabled:
            return False
        net = await self.ensure_network()
        await net.create_tap(
            record.id,
            Allocation.from_dict(record.network.allocation()),
            bandwidth=record.network.bandwidth,
        )
        return True

    async def delete_tap(self, instance_id: str) -> None:
        """Remove the TAP if there is one; a node without networking has none to remove."""
        if self.network is not None:
            with anyio.CancelScope(shield=True):
                await self.network.delete_tap(instance_id)

    # -- the guest agent ----------------------------------------------------------------
    def start_agent(self, instance_id: str, live: Live) -> AgentLink | None:
        """Keep a channel to the agent of the VMM ``live`` holds, from now until it ends."""
        vmm = live.vmm
        if vmm is None or self.spawn is None:
            return None
        if live.agent is None:
            live.agent = AgentLink(instance_id, vmm.open_agent)
            self.spawn(live.agent.run)
        return live.agent

    async def stop_agent(self, live: Live, reason: str) -> None:
        """Close the agent's channel; operations on it fail with ``reason``."""
        link, live.agent = live.agent, None
        if link is not None:
            with anyio.CancelScope(shield=True):
                await link.stop(reason)

    # -- VMMs -------------------------------------------------------------------------
    async def end_vmm(
        self, instance_id: str, live: Live, reason: str = "the instance's VMM ended"
    ) -> None:
        """End every VMM of the instance: the handle, the recorded one, unrecorded ones."""
        await self.stop_agent(live, reason)
        with anyio.CancelScope(shield=True):
            if live.vmm is not None:
                with contextlib.suppress(Exception):
                    await live.vmm.stop()
                live.vmm = None
            await terminate_recorded(self.paths.instance_dir(instance_id))
            live.unreachable = None

    async def vm_spec(self, record: InstanceRecord) -> VmSpec:
        artifacts = await self.artifacts()
        if record.hypervisor == BackendKind.QEMU.value:
            # The QEMU backend runs the `pc` machine, which boots the bzImage.
            kernel, extra = artifacts.bzimage, qemu_extra("pc")
        else:
            kernel, extra = artifacts.vmlinux, ()
        disks = self.disk_paths(record)
        network = record.network
        return VmSpec(
            kernel=kernel,
            initrd=artifacts.initrd,
            cmdline=kernel_cmdline(extra=extra),
            vcpus=record.vcpus,
            memory_mb=record.memory_mb,
            memory_max_mb=record.memory_max_mb,
            disks=(
                DiskSpec(id="image", path=disks["image"], readonly=True, serial="image"),
                DiskSpec(id="overlay", path=disks["overlay"], serial="overlay"),
                DiskSpec(id="config", path=disks["config"], readonly=True, serial="config"),
                *(self.volume_disk(v.volume_id, v.readonly) for v in record.volumes),
            ),
            net=NetSpec(tap=network.tap or "", mac=network.mac or "") if network.enabled else None,
            serial_file=self.paths.instance_serial_raw(record.id),
            output_file=self.paths.instance_output_raw(record.id),
            agent=True,
        )

    def disk_paths(self, record: InstanceRecord) -> dict[str, Path]:
        """Every disk of the instance by its device id, volumes included."""
        return {
            "image": Path(record.image.disk),
            "overlay": self.paths.instance_overlay(record.id),
            "config": self.paths.instance_config_disk(record.id),
            **{
                disk_serial(volume.volume_id): self.paths.volume_data(volume.volume_id)
                for volume in record.volumes
            },
        }

    def volume_disk(self, volume_id: str, readonly: bool) -> DiskSpec:
        """A volume as a disk: read-only in the VMM when attached read-only, found by serial."""
        serial = disk_serial(volume_id)
        return DiskSpec(
            id=serial, path=self.paths.volume_data(volume_id), readonly=readonly, serial=serial
        )
