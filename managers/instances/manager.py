"""The instance manager: lifecycle, derived state, standby/restore, logs, recovery.

One lock per instance serialises its actions; different instances never wait on
each other. The state is never stored: it is derived from the files (metadata,
standby snapshot) and from asking the VMM, so a crash or restart cannot leave a
stale state behind.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from managers.guest import (
    GuestArtifacts,
    GuestConfig,
    NetworkConfig,
    create_overlay_disk,
    kernel_cmdline,
    write_config_disk,
)
from managers.guest.cmdline import qemu_extra
from managers.hypervisors import (
    BackendKind,
    DiskSpec,
    HypervisorBackend,
    HypervisorError,
    NetSpec,
    SpecChanges,
    Vmm,
    VmmDied,
    VmmNotFound,
    VmSpec,
    VmState,
    terminate_recorded,
)
from managers.hypervisors import WrongState as HypervisorWrongState
from managers.images.errors import ImageNotFound
from managers.instances.errors import (
    ActionFailed,
    ImageMissing,
    ImageNotReady,
    InstanceExists,
    InstanceNotFound,
    InvalidInstanceSpec,
    WrongInstanceState,
)
from managers.instances.logs import LogLine, SegmentedLog
from managers.instances.pump import LogPump, PumpSet, now_iso
from managers.instances.store import InstanceStore
from managers.instances.types import (
    LOG_SOURCES,
    CreateRequest,
    GuestStatus,
    Instance,
    InstanceState,
)
from managers.network import Allocation, NetworkManager
from managers.paths import Paths

log = logging.getLogger("managers.instances")

S = InstanceState
_LIVE = (S.INITIALIZING, S.RUNNING, S.PAUSED, S.SHUTDOWN, S.UNKNOWN)


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


@dataclass
class _Live:
    lock: anyio.Lock
    pump: LogPump
    vmm: Vmm | None = None
    # A VMM that runs but could not be attached to at start-up (it hangs, or speaks a
    # version we refuse): the instance reads Unknown and stop/delete end it by its record.
    unreachable: str | None = None


class InstanceManager:
    def __init__(
        self,
        paths: Paths,
        *,
        images: ImageSource,
        backends: Mapping[str, HypervisorBackend],
        default_hypervisor: str,
        artifacts: Callable[[], Awaitable[GuestArtifacts]],
        network: NetworkManager | None = None,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        self._paths = paths
        self._images = images
        self._backends = dict(backends)
        self._default_hypervisor = default_hypervisor
        self._artifacts = artifacts
        self._network = network
        self._grace = stop_grace_seconds
        self._store = InstanceStore(paths)
        self._live: dict[str, _Live] = {}
        self._names: dict[str, str] = {}
        self._create_lock = anyio.Lock()
        self._network_lock = anyio.Lock()
        self._network_started = False
        self._pumps = PumpSet()
        self._tg: TaskGroup | None = None
        self._exit_stack = contextlib.AsyncExitStack()

    # -- lifecycle of the manager ---------------------------------------------
    async def start(self) -> None:
        """Load every instance, clean what a crash left half-made, re-adopt running VMMs."""
        self._tg = await self._exit_stack.enter_async_context(anyio.create_task_group())
        self._tg.start_soon(self._pumps.run)
        for instance_id in await anyio.to_thread.run_sync(self._store.half_made):
            log.warning(
                "removing half-made instance %s", instance_id, extra={"instance_id": instance_id}
            )
            await self._discard_half_made(instance_id)
        for record in await anyio.to_thread.run_sync(self._store.load_all):
            # One instance that cannot be re-adopted must not keep the node from starting.
            try:
                await self._recover(record)
            except Exception as error:
                log.exception(
                    "could not recover instance %s: %s",
                    record["id"],
                    error,
                    extra={"instance_id": record["id"]},
                )
        # The host bridge is made on first use, so a node whose instances never ask
        # for a network never has its interfaces touched. One that already has the
        # bridge is adopted now, which also removes TAPs a crash left behind.
        if self._network is not None and bridge_exists(self._network.settings.bridge_name):
            await self._ensure_network()

    async def _recover(self, record: dict[str, Any]) -> None:
        instance_id = record["id"]
        self._names[record["name"]] = instance_id
        live = self._live_for(instance_id)
        with contextlib.suppress(Exception):
            self._images.acquire(record["image"]["digest"])
        workdir = self._paths.instance_dir(instance_id)
        backend = self._backends.get(record["hypervisor"])
        if backend is None:
            live.unreachable = f"no {record['hypervisor']} binary on this node"
        else:
            try:
                live.vmm = await backend.attach(instance_id, workdir)
            except VmmNotFound:
                live.vmm = None
            except HypervisorError as error:
                live.unreachable = str(error)
        if live.unreachable is not None:
            log.warning(
                "the VMM cannot be re-adopted: %s",
                live.unreachable,
                extra={"instance_id": instance_id},
            )
        if live.vmm is not None:
            log.info("re-adopted running VMM", extra={"instance_id": instance_id})
            # A crash between a restore and the removal of its snapshot leaves a stale one.
            await anyio.to_thread.run_sync(
                shutil.rmtree, self._paths.instance_standby(instance_id), True
            )
        # Catch up on output written while we were away, then follow.
        await anyio.to_thread.run_sync(live.pump.drain)
        if live.vmm is not None:
            self._start_pump(instance_id)

    async def _ensure_network(self) -> NetworkManager:
        if self._network is None:
            raise InvalidInstanceSpec("networking is not enabled on this node")
        async with self._network_lock:
            if not self._network_started:
                known = [r["id"] for r in self._store.load_all() if r["network"].get("enabled")]
                removed = await self._network.start(known)
                for tap in removed:
                    log.info("removed orphan TAP %s", tap)
                self._network_started = True
        return self._network

    async def close(self) -> None:
        """Stop following logs; VMMs keep running and are re-adopted by the next start."""
        for live in self._live.values():
            if live.vmm is not None:
                with contextlib.suppress(Exception):
                    await live.vmm.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        await self._exit_stack.aclose()
        self._tg = None

    # -- queries --------------------------------------------------------------
    async def list(self, state: InstanceState | None = None) -> builtins.list[Instance]:
        records = await anyio.to_thread.run_sync(self._store.load_all)
        found = [await self._view(r) for r in records]
        found.sort(key=lambda i: str(i.record.get("created_at", "")))
        return [i for i in found if state is None or i.state == state]

    async def get(self, key: str) -> Instance:
        return await self._view(await self._load(key))

    # -- create / delete ------------------------------------------------------
    async def create(self, request: CreateRequest) -> Instance:
        request.check()
        kind = request.hypervisor or self._default_hypervisor
        if kind not in self._backends:
            raise InvalidInstanceSpec(
                f"hypervisor {kind!r} is not available here",
                {"available": sorted(self._backends)},
            )
        async with self._create_lock:
            existing = self._names.get(request.name)
            if existing is not None:
                raise InstanceExists(request.name, existing)
            instance_id = self._new_id()
            # Reserved now so a concurrent create with the same name fails fast.
            self._names[request.name] = instance_id
        try:
            image = self._acquire_image(request.image)
        except BaseException:
            self._names.pop(request.name, None)
            raise
        allocation: Allocation | None = None
        directory = self._paths.instance_dir(instance_id)
        live = self._live_for(instance_id)
        async with live.lock:
            try:
                directory.mkdir(parents=True)
                self._paths.instance_logs(instance_id).mkdir()
                await create_overlay_disk(
                    self._paths.instance_overlay(instance_id), request.overlay_size_mb << 20
                )
                network: dict[str, Any] = {"enabled": request.network}
                if request.network:
                    net = await self._ensure_network()
                    allocation = await net.allocate(instance_id, self._taken_addresses())
                    guest_net = net.guest_network(allocation)
                    network.update(
                        allocation.to_dict(),
                        tap=net.tap_name(instance_id),
                        gateway=str(guest_net.gateway),
                        dns=str(guest_net.dns),
                    )
                record = self._new_record(instance_id, request, kind, image, network)
                await write_config_disk(
                    self._paths.instance_config_disk(instance_id), self._guest_config(record, image)
                )
                await anyio.to_thread.run_sync(self._store.save, record)
                log.info(
                    "created instance %s (%s) from %s",
                    instance_id,
                    request.name,
                    image.name,
                    extra={"instance_id": instance_id},
                )
                if request.start:
                    await self._boot(record, live)
            except BaseException as error:
                # Rolled back under the lock: nothing else can act on a half-made instance.
                log.warning(
                    "create of %s failed, rolling back: %s",
                    request.name,
                    error,
                    extra={"instance_id": instance_id},
                )
                with anyio.CancelScope(shield=True):
                    await self._teardown(instance_id, live, allocation is not None)
                    self._images.release(image.digest)
                    self._forget_name(request.name, instance_id)
                raise
        return await self.get(instance_id)

    async def delete(self, key: str) -> None:
        instance_id = (await self._load(key))["id"]
        live = self._live_for(instance_id)
        async with live.lock:
            # Another delete may have finished while this one waited for the lock.
            record = await self._load(instance_id)
            await self._teardown(instance_id, live, bool(record["network"].get("enabled")))
            self._images.release(record["image"]["digest"])
            self._forget_name(record["name"], instance_id)
        log.info("deleted instance %s", instance_id)

    def _forget_name(self, name: str, instance_id: str) -> None:
        if self._names.get(name) == instance_id:
            del self._names[name]

    # -- actions --------------------------------------------------------------
    async def start_instance(self, key: str) -> Instance:
        startable = (S.CREATED, S.STOPPED, S.SHUTDOWN)
        return await self._act(key, "start", startable, self._do_start, None)

    async def stop(self, key: str) -> Instance:
        return await self._act(key, "stop", _LIVE, self._do_stop, S.STOPPED)

    async def reboot(self, key: str) -> Instance:
        return await self._act(key, "reboot", (S.INITIALIZING, S.RUNNING), self._do_reboot, None)

    async def pause(self, key: str) -> Instance:
        running = (S.INITIALIZING, S.RUNNING)
        return await self._act(key, "pause", running, self._do_pause, S.PAUSED, optimistic=True)

    async def resume(self, key: str) -> Instance:
        return await self._act(key, "resume", (S.PAUSED,), self._do_resume, None, optimistic=True)

    async def standby(self, key: str) -> Instance:
        awake = (S.INITIALIZING, S.RUNNING, S.PAUSED)
        return await self._act(key, "standby", awake, self._do_standby, S.STANDBY)

    async def restore(self, key: str) -> Instance:
        return await self._act(key, "restore", (S.STANDBY,), self._do_restore, None)

    async def _act(
        self,
        key: str,
        action: str,
        allowed: tuple[InstanceState, ...],
        work: Callable[[dict[str, Any], _Live, InstanceState], Awaitable[None]],
        after: InstanceState | None,
        *,
        optimistic: bool = False,
    ) -> Instance:
        """Run ``work`` under the lock if the state allows it.

        ``after`` is the state a successful action leaves (None: ask, as the program
        may or may not have started); the VMM has just accepted the action, so asking
        it again would only cost another round trip.
        """
        # A name resolves without touching the disk; the record is read once, under the lock.
        instance_id = self._names.get(key, key)
        live = self._live_for(instance_id) if instance_id in self._live else None
        if live is None:
            instance_id = (await self._load(key))["id"]
            live = self._live_for(instance_id)
        async with live.lock:
            record = await self._load(instance_id)
            if optimistic and live.vmm is not None and live.unreachable is None:
                # The VMM enforces the same rule (it pauses only a running VM and resumes
                # only a paused one), so it is asked once: the state is read only to
                # explain a refusal.
                try:
                    await work(record, live, S.RUNNING if action == "pause" else S.PAUSED)
                except HypervisorWrongState:
                    state = await self._state(record, live, owner=True)
                    raise WrongInstanceState(
                        instance_id, action, state, [str(s) for s in allowed]
                    ) from None
            else:
                state = await self._state(record, live, owner=True)
                if state not in allowed:
                    raise WrongInstanceState(instance_id, action, state, [str(s) for s in allowed])
                await work(record, live, state)
            log.info("%s done", action, extra={"instance_id": instance_id})
            if after is None:
                after = self._running_or_initializing(live)
            pid = live.vmm.pid if live.vmm is not None else None
            return Instance(record=record, state=after, guest=live.pump.status, pid=pid or None)

    @staticmethod
    def _running_or_initializing(live: _Live) -> InstanceState:
        status = live.pump.status
        if status.exited_at is not None:
            return S.SHUTDOWN
        return S.RUNNING if status.program_started_at else S.INITIALIZING

    async def _do_start(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        if live.vmm is not None:
            # A guest that powered off leaves its VMM; a fresh boot needs a fresh one.
            await live.vmm.stop()
            live.vmm = None
        await self._boot(record, live)

    async def _do_stop(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        if live.vmm is None:
            # Unknown: a VMM we cannot talk to; end it by the pid it recorded.
            await terminate_recorded(self._paths.instance_dir(record["id"]))
            live.unreachable = None
            await self._after_vmm_gone(record, live)
            return
        vmm = live.vmm
        if state in (S.INITIALIZING, S.RUNNING):
            with contextlib.suppress(HypervisorError):
                await vmm.shutdown(self._grace)
        await vmm.stop()
        live.vmm = None
        await self._after_vmm_gone(record, live)

    async def _do_reboot(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        assert live.vmm is not None
        await anyio.to_thread.run_sync(live.pump.drain)
        await anyio.to_thread.run_sync(live.pump.new_boot)
        await live.vmm.reboot()

    async def _do_pause(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        assert live.vmm is not None
        await live.vmm.pause()

    async def _do_resume(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        assert live.vmm is not None
        await live.vmm.resume()

    async def _do_standby(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        """pause -> snapshot -> stop the VMM -> release the TAP; undo on failure."""
        assert live.vmm is not None
        instance_id = record["id"]
        vmm = live.vmm
        target = self._paths.instance_standby(instance_id)
        staging = target.with_name("standby.partial")
        await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
        step = "pause"
        try:
            if state is not S.PAUSED:
                await vmm.pause()
            step = "snapshot"
            staging.mkdir()
            await vmm.snapshot(staging)
            step = "stop the VMM"
            await anyio.to_thread.run_sync(live.pump.drain)
            await vmm.stop()
        except BaseException as error:
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
            if step != "stop the VMM" and state is not S.PAUSED:
                with contextlib.suppress(Exception):
                    await vmm.resume()
            if isinstance(error, Exception):
                raise ActionFailed(instance_id, "standby", step, error) from error
            raise
        # Past this point the VMM is gone: the snapshot is the instance.
        staging.rename(target)
        live.vmm = None
        await self._stop_pump(instance_id, live)
        if record["network"].get("enabled") and self._network is not None:
            await self._network.delete_tap(instance_id)

    async def _do_restore(self, record: dict[str, Any], live: _Live, state: InstanceState) -> None:
        """TAP again -> new VMM restoring the snapshot -> running; the snapshot is then removed."""
        instance_id = record["id"]
        snapshot = self._paths.instance_standby(instance_id)
        step = "recreate the TAP"
        network = record["network"]
        try:
            if network.get("enabled"):
                net = await self._ensure_network()
                await net.create_tap(instance_id, Allocation.from_dict(network))
            step = "restore the VM"
            # The new VMM writes the serial file afresh; a new file (not a truncated
            # one) lets the log pump tell it from the old one it has fully read.
            self._paths.instance_serial_raw(instance_id).unlink(missing_ok=True)
            changes = SpecChanges(
                disk_paths=self._disk_paths(record),
                serial_file=self._paths.instance_serial_raw(instance_id),
                tap=network.get("tap"),
            )
            live.vmm = await self._backend(record).restore(
                instance_id, self._paths.instance_dir(instance_id), snapshot, changes
            )
        except BaseException as error:
            live.vmm = None
            if network.get("enabled") and self._network is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._network.delete_tap(instance_id)
            if isinstance(error, Exception):
                raise ActionFailed(instance_id, "restore", step, error) from error
            raise
        await anyio.to_thread.run_sync(shutil.rmtree, snapshot, True)
        self._start_pump(instance_id)

    # -- logs -----------------------------------------------------------------
    async def log_for(self, key: str, source: str) -> SegmentedLog:
        if source not in LOG_SOURCES:
            raise InvalidInstanceSpec(f"unknown log source {source!r}")
        record = await self._load(key)
        return SegmentedLog(self._paths.instance_logs(record["id"]), source)

    async def read_log(
        self, key: str, source: str, *, after: int | None, tail: int | None
    ) -> tuple[builtins.list[LogLine], int]:
        """Lines to send first: after an offset (resume), the last ``tail``, or all.

        The pump is drained first, so what the guest printed is there; a last line
        without its newline is included once no VMM can finish it.
        """
        log_file = await self.log_for(key, source)
        instance_id = (await self._load(key))["id"]
        live = self._live.get(instance_id)
        if live is not None:
            await anyio.to_thread.run_sync(live.pump.drain)
        final = live is None or live.vmm is None
        if after is not None:
            return await anyio.to_thread.run_sync(lambda: log_file.read_lines(after, final=final))
        if tail is not None:
            return await anyio.to_thread.run_sync(lambda: log_file.tail(tail, final=final))
        return await anyio.to_thread.run_sync(lambda: log_file.read_lines(0, final=final))

    async def exists(self, key: str) -> bool:
        try:
            await self._load(key)
        except InstanceNotFound:
            return False
        return True

    # -- internals ------------------------------------------------------------
    async def _load(self, key: str) -> dict[str, Any]:
        instance_id = self._names.get(key, key)
        record = await anyio.to_thread.run_sync(self._store.load, instance_id)
        if record is None:
            raise InstanceNotFound(key)
        return record

    def _live_for(self, instance_id: str) -> _Live:
        live = self._live.get(instance_id)
        if live is None:
            paths = self._paths
            live = _Live(
                lock=anyio.Lock(),
                pump=LogPump(
                    serial_raw=paths.instance_serial_raw(instance_id),
                    vmm_raw=paths.instance_vmm_raw(instance_id),
                    app_log=SegmentedLog(paths.instance_logs(instance_id), "app"),
                    vmm_log=SegmentedLog(paths.instance_logs(instance_id), "vmm"),
                    state_file=paths.instance_pump_state(instance_id),
                    status_file=paths.instance_guest_status(instance_id),
                ),
            )
            self._live[instance_id] = live
        return live

    def _backend(self, record: dict[str, Any]) -> HypervisorBackend:
        kind = record["hypervisor"]
        backend = self._backends.get(kind)
        if backend is None:
            raise InvalidInstanceSpec(f"instance {record['id']} needs hypervisor {kind!r}")
        return backend

    def _new_id(self) -> str:
        while True:
            candidate = secrets.token_hex(6)
            if not self._paths.instance_dir(candidate).exists():
                return candidate

    def _acquire_image(self, name: str) -> ImageLike:
        try:
            image = self._images.acquire(name)
        except ImageNotFound as error:
            raise ImageMissing(f"no image {name!r} on this node", {"image": name}) from error
        except Exception as error:
            raise ImageNotReady(
                f"image {name!r} cannot be used: {error}", {"image": name}
            ) from error
        if image.disk_path is None:
            self._images.release(image.digest)
            raise ImageNotReady(f"image {name!r} has no disk yet", {"image": name})
        return image

    def _taken_addresses(self) -> builtins.list[str]:
        return [
            str(r["network"]["address"])
            for r in self._store.load_all()
            if r["network"].get("address")
        ]

    def _new_record(
        self,
        instance_id: str,
        request: CreateRequest,
        kind: str,
        image: ImageLike,
        network: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "id": instance_id,
            "name": request.name,
            "created_at": now_iso(),
            "image": {
                "name": image.name,
                "digest": image.digest,
                "format": image.format,
                "disk": str(image.disk_path),
            },
            "hypervisor": kind,
            "vcpus": request.vcpus,
            "memory_mb": request.memory_mb,
            "memory_max_mb": request.memory_max_mb,
            "overlay_size_mb": request.overlay_size_mb,
            "env": dict(request.env),
            "entrypoint": list(request.entrypoint) if request.entrypoint is not None else None,
            "cmd": list(request.cmd) if request.cmd is not None else None,
            "workdir": request.workdir,
            "network": network,
            "booted": False,
        }

    def _guest_config(self, record: dict[str, Any], image: ImageLike) -> GuestConfig:
        config = image.config
        image_entry = tuple(config.entrypoint) if config else ()
        image_cmd = tuple(config.cmd) if config else ()
        if record["entrypoint"] is not None:
            # As with `docker run --entrypoint`: a new entrypoint drops the image's cmd.
            entrypoint = tuple(record["entrypoint"])
            cmd = tuple(record["cmd"] or ())
        else:
            entrypoint = image_entry
            cmd = tuple(record["cmd"]) if record["cmd"] is not None else image_cmd
        env: dict[str, str] = {}
        for item in config.env if config else ():
            name, _, value = item.partition("=")
            env[name] = value
        env.update(record["env"])
        network = record["network"]
        return GuestConfig(
            entrypoint=entrypoint,
            cmd=cmd,
            env=env,
            workdir=record["workdir"] or (config.workdir if config else "") or "",
            user=config.user if config else "",
            hostname=record["name"],
            network=NetworkConfig(
                address=network["address"],
                gateway=network.get("gateway"),
                dns=(network["dns"],) if network.get("dns") else (),
                mac=network.get("mac"),
            )
            if network.get("enabled")
            else None,
        )

    def _disk_paths(self, record: dict[str, Any]) -> dict[str, Path]:
        instance_id = record["id"]
        return {
            "image": Path(record["image"]["disk"]),
            "overlay": self._paths.instance_overlay(instance_id),
            "config": self._paths.instance_config_disk(instance_id),
        }

    async def _vm_spec(self, record: dict[str, Any]) -> VmSpec:
        artifacts = await self._artifacts()
        instance_id = record["id"]
        disks = self._disk_paths(record)
        network = record["network"]
        if record["hypervisor"] == BackendKind.QEMU.value:
            # The QEMU backend runs the `pc` machine, which boots the bzImage.
            kernel, extra = artifacts.bzimage, qemu_extra("pc")
        else:
            kernel, extra = artifacts.vmlinux, ()
        return VmSpec(
            kernel=kernel,
            initrd=artifacts.initrd,
            cmdline=kernel_cmdline(extra=extra),
            vcpus=record["vcpus"],
            memory_mb=record["memory_mb"],
            memory_max_mb=record["memory_max_mb"],
            disks=(
                DiskSpec(id="image", path=disks["image"], readonly=True, serial="image"),
                DiskSpec(id="overlay", path=disks["overlay"], serial="overlay"),
                DiskSpec(id="config", path=disks["config"], readonly=True, serial="config"),
            ),
            net=NetSpec(tap=network["tap"], mac=network["mac"]) if network.get("enabled") else None,
            serial_file=self._paths.instance_serial_raw(instance_id),
        )

    async def _boot(self, record: dict[str, Any], live: _Live) -> None:
        """Boot a fresh VMM; on failure, nothing it made stays (TAP, VMM)."""
        instance_id = record["id"]
        network = record["network"]
        # Everything that can refuse without side effects comes first.
        spec = await self._vm_spec(record)
        backend = self._backend(record)
        await self._stop_pump(instance_id, live)
        tap_made = False
        try:
            if network.get("enabled"):
                net = await self._ensure_network()
                await net.create_tap(instance_id, Allocation.from_dict(network))
                tap_made = True
            await anyio.to_thread.run_sync(
                self._paths.instance_serial_raw(instance_id).unlink, True
            )
            await anyio.to_thread.run_sync(live.pump.new_boot)
            vmm = await backend.start_vmm(instance_id, self._paths.instance_dir(instance_id))
            live.vmm = vmm
            try:
                await vmm.create_and_boot(spec)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await vmm.stop()
                live.vmm = None
                raise
        except BaseException:
            if tap_made and self._network is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._network.delete_tap(instance_id)
            raise
        if not record.get("booted"):
            record["booted"] = True
            await anyio.to_thread.run_sync(self._store.save, record)
        self._start_pump(instance_id)

    def _start_pump(self, instance_id: str) -> None:
        self._pumps.add(instance_id, self._live_for(instance_id).pump)

    async def _stop_pump(self, instance_id: str, live: _Live) -> None:
        """Stop following once no drain runs, then copy what is left."""
        await self._pumps.remove(instance_id)
        await anyio.to_thread.run_sync(live.pump.drain)

    async def _after_vmm_gone(self, record: dict[str, Any], live: _Live) -> None:
        await self._stop_pump(record["id"], live)
        if record["network"].get("enabled") and self._network is not None:
            await self._network.delete_tap(record["id"])

    async def _state(self, record: dict[str, Any], live: _Live, *, owner: bool) -> InstanceState:
        """The instance's state. Only the lock's ``owner`` may clean up after a VMM that
        vanished; a reader that does not hold the lock just reports it."""
        instance_id = record["id"]
        vmm = live.vmm
        if vmm is None:
            if live.unreachable is not None:
                return S.UNKNOWN
            if self._paths.instance_standby(instance_id).is_dir():
                return S.STANDBY
            return S.STOPPED if record.get("booted") else S.CREATED
        vm_state = vmm.known_state()
        if vm_state is not None:
            return self._from_vm_state(vm_state, live)
        try:
            vm_state = await vmm.state()
        except (VmmNotFound, VmmDied):
            if owner and live.vmm is vmm:
                await self._vmm_vanished(record, live)
            return S.STOPPED
        except HypervisorError as error:
            log.warning("VMM does not answer: %s", error, extra={"instance_id": instance_id})
            return S.UNKNOWN
        return self._from_vm_state(vm_state, live)

    def _from_vm_state(self, vm_state: VmState, live: _Live) -> InstanceState:
        if vm_state is VmState.PAUSED:
            return S.PAUSED
        if vm_state is VmState.SHUTDOWN:
            return S.SHUTDOWN
        if vm_state is VmState.NOT_CREATED:
            return S.UNKNOWN
        return self._running_or_initializing(live)

    async def _vmm_vanished(self, record: dict[str, Any], live: _Live) -> None:
        log.warning("the VMM exited", extra={"instance_id": record["id"]})
        if live.vmm is not None:
            with contextlib.suppress(Exception):
                await live.vmm.stop()
        live.vmm = None
        await self._after_vmm_gone(record, live)

    async def _view(self, record: dict[str, Any]) -> Instance:
        live = self._live_for(record["id"])
        known = live.vmm.known_state() if live.vmm is not None else None
        if known is not None:
            # Nothing to ask and nothing to clean up: no need for the lock.
            state = self._from_vm_state(known, live)
        elif live.lock.locked():
            # An action is under way; report without waiting for it or touching anything.
            state = await self._state(record, live, owner=False)
        else:
            async with live.lock:
                state = await self._state(record, live, owner=True)
        status: GuestStatus = live.pump.status
        pid = live.vmm.pid if live.vmm is not None else None
        return Instance(record=record, state=state, guest=status, pid=pid or None)

    async def _teardown(self, instance_id: str, live: _Live, networked: bool) -> None:
        """Remove everything an instance owns; every step tolerates what is already gone."""
        if live.vmm is not None:
            with contextlib.suppress(Exception):
                await live.vmm.stop()
            live.vmm = None
        # A VMM we could not attach to (or whose stop failed) is ended by its record.
        with contextlib.suppress(Exception):
            await terminate_recorded(self._paths.instance_dir(instance_id))
        live.unreachable = None
        await self._pumps.remove(instance_id)
        if networked and self._network is not None:
            with contextlib.suppress(Exception):
                await self._network.delete_tap(instance_id)
            with contextlib.suppress(Exception):
                await self._network.release(instance_id)
        await anyio.to_thread.run_sync(self._store.remove, instance_id)
        self._live.pop(instance_id, None)

    async def _discard_half_made(self, instance_id: str) -> None:
        directory = self._paths.instance_dir(instance_id)
        for backend in self._backends.values():
            with contextlib.suppress(Exception):
                vmm = await backend.attach(instance_id, directory)
                await vmm.stop()
        with contextlib.suppress(Exception):
            await terminate_recorded(directory)
        if self._network is not None:
            with contextlib.suppress(Exception):
                await self._network.delete_tap(instance_id)
        await anyio.to_thread.run_sync(shutil.rmtree, directory, True)


def bridge_exists(name: str) -> bool:
    return Path("/sys/class/net", name, "bridge").is_dir()
