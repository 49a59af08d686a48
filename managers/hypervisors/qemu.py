"""QEMU backend: ``qemu-system-x86_64`` driven over QMP.

QEMU takes the whole VM definition on its command line, so the VMM process starts at
:meth:`QemuVmm.create_and_boot` (``start_vmm`` only prepares the workdir). Snapshots are a QMP
``migrate`` to ``exec:cat > FILE`` plus the device layout; restore replays that layout with
``-incoming``. See README.md for the measured facts behind the choices.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream

from managers.atomic import write_json_atomic
from managers.failpoints import failpoint

from .accel import probe_acceleration
from .agent_socket import connect_unix
from .errors import (
    HypervisorError,
    InvalidRequest,
    OperationTimeout,
    VmmDied,
    VmmProtocolError,
    WrongState,
    wrong_state,
)
from .known import KnownState
from .layout import VmmFiles
from .process import VmmProcess, binary_version, recorded_process, wait_for_socket
from .qemu_argv import MAX_DIMMS, QemuLayout, blockdev_args, build_argv, disk_device_args
from .qmp import QmpClient, QmpConnectionLost
from .snapshot_files import check_destination, check_snapshot_dir
from .types import (
    Acceleration,
    BackendKind,
    BackendSettings,
    DiskSpec,
    SpecChanges,
    VmmInfo,
    VmSpec,
    VmState,
)

MEMORY_FILE = "memory"
LAYOUT_FILE = "vmm-config.json"
_STATUS: dict[str, VmState] = {
    "running": VmState.RUNNING,
    "shutdown": VmState.SHUTDOWN,
    "internal-error": VmState.SHUTDOWN,
    "io-error": VmState.PAUSED,
    "guest-panicked": VmState.SHUTDOWN,
}
_MIGRATION_TIMEOUT = 300.0
# How often a migration (snapshot or restore) is asked whether it has finished.
_POLL_SECONDS = 0.01
_UNPLUG_TIMEOUT = 30.0
# query-migrate statuses of a migration still under way.
_MIGRATING = frozenset(
    {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", "postcopy-active"}
)


class QemuBackend:
    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.qemu_bin = (
            settings.qemu_bin or shutil.which("qemu-system-x86_64") or ("qemu-system-x86_64")
        )

    @property
    def kind(self) -> BackendKind:
        return BackendKind.QEMU

    async def acceleration(self, kernel: Path | None = None) -> Acceleration:
        if self.settings.acceleration is not None:
            return self.settings.acceleration
        probe_kernel = kernel or self.settings.kernel
        if probe_kernel is None:
            # Without a kernel there is nothing to probe with; TCG always works.
            return Acceleration.TCG
        return await probe_acceleration(self.qemu_bin, probe_kernel, self.settings.probe_cache)

    async def version(self) -> str:
        return await binary_version(self.qemu_bin)

    async def start_vmm(self, instance_id: str, workdir: Path) -> QemuVmm:
        files = VmmFiles(workdir)
        files.check(instance_id)
        return QemuVmm(self, instance_id, files)

    async def restore(
        self,
        instance_id: str,
        workdir: Path,
        snapshot_dir: Path,
        changes: SpecChanges | None = None,
    ) -> QemuVmm:
        files = VmmFiles(workdir)
        files.check(instance_id)
        check_snapshot_dir(instance_id, snapshot_dir, (MEMORY_FILE, LAYOUT_FILE))
        try:
            layout = QemuLayout.from_json(json.loads((snapshot_dir / LAYOUT_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(
                instance_id, f"unreadable {LAYOUT_FILE} in snapshot: {exc}"
            ) from exc
        if changes is not None:
            layout.spec = changes.apply(layout.spec)
        problems = layout.spec.problems()
        if problems:
            raise InvalidRequest(instance_id, "cannot restore: " + "; ".join(problems))
        vmm = QemuVmm(self, instance_id, files)
        await vmm.launch(layout, incoming=snapshot_dir / MEMORY_FILE)
        return vmm

    async def attach(self, instance_id: str, workdir: Path) -> QemuVmm:
        files = VmmFiles(workdir)
        process, record = recorded_process(files, BackendKind.QEMU.value, "QEMU", instance_id)
        vmm = QemuVmm(self, instance_id, files)
        try:
            vmm.adopt(process, QemuLayout.from_json(record["layout"]), record)
            vmm.qmp = await QmpClient.connect(
                instance_id, files.socket, self.settings.start_timeout
            )
        except BaseException:
            vmm.qmp = None
            process.release()
            raise
        return vmm


class QemuVmm:
    def __init__(self, backend: QemuBackend, instance_id: str, files: VmmFiles) -> None:
        self.backend = backend
        self.files = files
        self._instance_id = instance_id
        self.process: VmmProcess | None = None
        self.qmp: QmpClient | None = None
        self.layout: QemuLayout | None = None
        self.acceleration = Acceleration.TCG
        # QEMU cannot power a guest off without ending; a forced shutdown stops the vCPUs
        # and remembers that the guest is to be seen as off.
        self.forced_off = False
        # The last state read; it holds while no other command was sent since and QMP stays
        # quiet (see QmpClient.quiet): QEMU announces every run-state change as an event.
        self._known: KnownState | None = None
        self._commands = 0

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def adopt(self, process: VmmProcess, layout: QemuLayout, record: dict[str, Any]) -> None:
        self.process = process
        self.layout = layout
        self.forced_off = bool(record.get("forced_off", False))
        self.acceleration = Acceleration(record.get("acceleration", "tcg"))

    async def info(self) -> VmmInfo:
        qmp = self._client()
        return VmmInfo(BackendKind.QEMU, qmp.version, self.pid)

    async def create_and_boot(self, spec: VmSpec) -> None:
        if self.process is not None:
            raise WrongState(self.instance_id, "this VMM already holds a VM")
        problems = spec.problems()
        if problems:
            raise InvalidRequest(self.instance_id, "invalid VM spec: " + "; ".join(problems))
        await self.launch(QemuLayout.for_boot(spec), incoming=None)

    async def launch(self, layout: QemuLayout, incoming: Path | None) -> None:
        self.acceleration = await self.backend.acceleration(layout.spec.kernel)
        argv = build_argv(
            self.backend.qemu_bin,
            self.instance_id,
            layout,
            self.files.socket,
            self.acceleration,
            incoming,
            self.files.agent_socket,
        )
        settings = self.backend.settings
        self.layout = layout
        process = await VmmProcess.spawn(argv, self.files, self.instance_id, self._record())
        self.process = process
        try:
            await wait_for_socket(process, self.files, self.instance_id, settings.start_timeout)
            self.qmp = await QmpClient.connect(
                self.instance_id, self.files.socket, settings.start_timeout
            )
            if incoming is not None:
                await self._wait_incoming()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._discard()
            raise

    async def _wait_incoming(self) -> None:
        # A steady short poll: a growing back-off noticed completion up to 100 ms late,
        # which is most of what a restore costs beyond QEMU's own work.
        delay = _POLL_SECONDS
        with anyio.move_on_after(_MIGRATION_TIMEOUT):
            while True:
                status = await self._status()
                if status == "running":
                    return
                if status == "paused":
                    # The snapshot was taken paused and QEMU carries that state over.
                    await self._exec("cont")
                    return
                if status not in ("inmigrate", "prelaunch", "finish-migrate", "restore-vm"):
                    raise VmmProtocolError(
                        self.instance_id, f"restore ended in QEMU state {status!r}"
                    )
                await anyio.sleep(delay)
        raise OperationTimeout(self.instance_id, "restore did not finish in time")

    async def state(self) -> VmState:
        if self.process is None:
            return VmState.NOT_CREATED
        asked = self._commands + 1  # _status sends exactly one command
        status = await self._status()
        state = VmState.SHUTDOWN if self.forced_off else _STATUS.get(status, VmState.PAUSED)
        self._known = KnownState(state, asked)
        return state

    def known_state(self) -> VmState | None:
        known, qmp, process = self._known, self.qmp, self.process
        if known is None or qmp is None or process is None or not process.alive():
            return None
        if not known.holds(self._commands) or not qmp.quiet():
            return None
        # A forced power-off of a paused VM sends QEMU no command of its own.
        return VmState.SHUTDOWN if self.forced_off else known.state

    async def pause(self) -> None:
        await self._require(VmState.RUNNING, "pause")
        await self._exec("stop")

    async def resume(self) -> None:
        # A snapshot a dataplane crash left running would stop the guest again when it ends.
        await self._cancel_migration()
        await self._require(VmState.PAUSED, "resume")
        await self._exec("cont")

    async def _cancel_migration(self) -> None:
        """End a migration (snapshot) in flight, and wait until QEMU says it is over."""
        cancelled = False
        with anyio.move_on_after(_MIGRATION_TIMEOUT):
            while True:
                result = await self._exec("query-migrate")
                status = result.get("status") if isinstance(result, dict) else None
                if status not in _MIGRATING:
                    return
                if not cancelled and status != "cancelling":
                    await self._exec("migrate_cancel")
                    cancelled = True
                await anyio.sleep(_POLL_SECONDS)
        raise OperationTimeout(self.instance_id, "a snapshot in flight did not stop in time")

    async def shutdown(self, grace_seconds: float) -> bool:
        state = await self.state()
        if state in (VmState.SHUTDOWN, VmState.NOT_CREATED):
            raise wrong_state(self.instance_id, "shut down", state.value)
        if state is VmState.RUNNING:
            qmp = self._client()
            qmp.forget_events("SHUTDOWN")
            # The press is repeated every second: a guest only just booted may not be
            # listening to its power button yet, and a guest already stopping ignores repeats.
            deadline = anyio.current_time() + grace_seconds
            while (left := deadline - anyio.current_time()) > 0:
                await self._exec("system_powerdown")
                try:
                    await self._call(qmp.wait_event("SHUTDOWN", _is_power_off, min(1.0, left)))
                    return True
                except OperationTimeout:
                    pass
            await self._exec("stop")
        self.forced_off = True
        self._write_record()
        return False

    async def reboot(self) -> None:
        await self._require(VmState.RUNNING, "reboot")
        await self._exec("system_reset")

    async def snapshot(self, destination: Path) -> None:
        check_destination(self.instance_id, destination)
        state = await self.state()
        if state not in (VmState.RUNNING, VmState.PAUSED):
            raise wrong_state(self.instance_id, "snapshot", state.value)
        if state is VmState.RUNNING:
            await self._exec("stop")
        memory = destination / MEMORY_FILE
        await self._exec("migrate", {"uri": f"exec:cat > {shlex.quote(str(memory))}"})
        failpoint("vmm.snapshotting")
        with anyio.move_on_after(_MIGRATION_TIMEOUT) as scope:
            while True:
                result = await self._exec("query-migrate")
                status = result.get("status") if isinstance(result, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    memory.unlink(missing_ok=True)
                    raise VmmProtocolError(
                        self.instance_id,
                        f"snapshot migration {status}: {result.get('error-desc', '')}",
                    )
                await anyio.sleep(_POLL_SECONDS)
        if scope.cancelled_caught:
            await self._exec("migrate_cancel")
            memory.unlink(missing_ok=True)
            raise OperationTimeout(self.instance_id, "snapshot did not finish in time")
        await anyio.to_thread.run_sync(
            write_json_atomic, destination / LAYOUT_FILE, self._layout().to_json()
        )

    async def add_disk(self, disk: DiskSpec) -> None:
        layout = self._layout()
        problems = disk.problems()
        if not disk.path.is_file():
            problems.append(f"disk {disk.id!r}: {str(disk.path)!r} does not exist")
        if disk.id in layout.slots:
            problems.append(f"device id {disk.id!r} is already in use")
        if problems:
            raise InvalidRequest(self.instance_id, "cannot add disk: " + "; ".join(problems))
        state = await self.state()
        if state not in (VmState.RUNNING, VmState.PAUSED):
            raise wrong_state(self.instance_id, "add a disk to", state.value)
        try:
            slot = layout.free_slot()
        except LookupError as exc:
            raise InvalidRequest(self.instance_id, "no free PCI slot for another disk") from exc
        # Recorded first: a dataplane killed after device_add must still know the disk's slot,
        # or a restore would build a QEMU without it. A disk recorded but never added is found
        # by disk_ids(), which asks QEMU.
        before = (dict(layout.slots), layout.spec)
        layout.slots[disk.id] = slot
        layout.spec = _with_disks(layout.spec, (*layout.spec.disks, disk))
        self._write_record()
        added: list[str] = []
        try:
            for node in blockdev_args(disk):
                await self._exec("blockdev-add", node)
                added.append(node["node-name"])
            await self._exec("device_add", disk_device_args(disk, slot))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for node_name in reversed(added):
                    with contextlib.suppress(HypervisorError):
                        await self._exec("blockdev-del", {"node-name": node_name})
                layout.slots, layout.spec = before
                self._write_record()
            raise

    async def remove_disk(self, disk_id: str) -> None:
        layout = self._layout()
        if disk_id not in {disk.id for disk in layout.spec.disks}:
            raise InvalidRequest(self.instance_id, f"no disk with id {disk_id!r}")
        # The guest must acknowledge an ACPI eject; a paused guest cannot.
        await self._require(VmState.RUNNING, "remove a disk from")
        qmp = self._client()
        if disk_id in await self.disk_ids():
            qmp.forget_events("DEVICE_DELETED")
            await self._exec("device_del", {"id": disk_id})
            await self._call(
                qmp.wait_event(
                    "DEVICE_DELETED", lambda d: d.get("device") == disk_id, _UNPLUG_TIMEOUT
                )
            )
        # The block nodes may be there without the device (a crash between the two adds).
        nodes = await self._exec("query-named-block-nodes", {"flat": True})
        names = {n.get("node-name") for n in nodes} if isinstance(nodes, list) else set()
        for node_name in (disk_id, f"f-{disk_id}"):
            if node_name in names:
                await self._exec("blockdev-del", {"node-name": node_name})
        layout.slots.pop(disk_id, None)
        layout.spec = _with_disks(
            layout.spec, tuple(d for d in layout.spec.disks if d.id != disk_id)
        )
        self._write_record()

    async def disk_ids(self) -> set[str]:
        """The disks QEMU has as devices now (``/machine/peripheral`` holds every device id)."""
        layout = self._layout()
        found = await self._exec("qom-list", {"path": "/machine/peripheral"})
        entries = found if isinstance(found, list) else []
        devices = {entry.get("name") for entry in entries if isinstance(entry, dict)}
        return {disk.id for disk in layout.spec.disks if disk.id in devices}

    async def resize_memory(self, memory_mb: int) -> None:
        layout = self._layout()
        current, maximum = layout.memory_mb, layout.spec.max_memory_mb
        growth = memory_mb - current
        if memory_mb > maximum or growth <= 0 or growth % 128:
            raise InvalidRequest(
                self.instance_id,
                f"memory can only grow in 128 MiB steps from {current} up to {maximum} MiB, "
                f"not to {memory_mb}",
            )
        if len(layout.dimms) >= MAX_DIMMS:
            raise InvalidRequest(self.instance_id, "all memory hot-plug slots are used")
        state = await self.state()
        if state not in (VmState.RUNNING, VmState.PAUSED):
            raise wrong_state(self.instance_id, "resize", state.value)
        index = len(layout.dimms)
        await self._exec(
            "object-add",
            {"qom-type": "memory-backend-ram", "id": f"mem-dimm{index}", "size": growth << 20},
        )
        await self._exec(
            "device_add", {"driver": "pc-dimm", "id": f"dimm{index}", "memdev": f"mem-dimm{index}"}
        )
        layout.dimms.append(growth)
        self._write_record()

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.alive() and self.qmp is not None:
            try:
                with anyio.fail_after(2):
                    await self.qmp.execute("quit")
            except (HypervisorError, TimeoutError):
                pass
        await self._discard()

    async def open_agent(self) -> ByteStream:
        if self.layout is None or not self.layout.spec.agent:
            raise ConnectionRefusedError("this VM has no agent channel")
        return await connect_unix(self.files.agent_socket)

    async def close(self) -> None:
        self._known = None
        if self.process is not None:
            self.process.release()
        if self.qmp is not None:
            await self.qmp.aclose()
            self.qmp = None

    # -- internals -----------------------------------------------------------------------------
    async def _discard(self) -> None:
        await self.close()
        if self.process is not None:
            await self.process.terminate()
        self.files.remove_runtime()

    def _record(self) -> dict[str, Any]:
        """What re-adopting this VMM needs, less the process (``VmmProcess.spawn`` adds it)."""
        assert self.layout is not None
        return {
            "kind": BackendKind.QEMU.value,
            "acceleration": self.acceleration.value,
            "forced_off": self.forced_off,
            "layout": self.layout.to_json(),
        }

    def _write_record(self) -> None:
        assert self.process is not None
        self.files.write_record(
            {**self._record(), "pid": self.process.pid, "start_time": self.process.start_time}
        )

    def _layout(self) -> QemuLayout:
        if self.layout is None:
            raise wrong_state(self.instance_id, "change", VmState.NOT_CREATED.value)
        return self.layout

    def _client(self) -> QmpClient:
        if self.process is None:
            raise wrong_state(self.instance_id, "talk to", VmState.NOT_CREATED.value)
        if not self.process.alive():
            raise self._died()
        if self.qmp is None:
            raise VmmProtocolError(self.instance_id, "not connected to QMP")
        return self.qmp

    def _died(self) -> VmmDied:
        code = self.process.exit_code if self.process is not None else None
        tail = self.files.log_tail()
        return VmmDied(
            self.instance_id,
            f"QEMU (pid {self.pid}) is gone" + (f" (VMM log: {tail})" if tail else ""),
            code,
        )

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except QmpConnectionLost as exc:
            if self.process is not None and not await self.process.wait_exit(1.0):
                raise
            raise self._died() from exc

    async def _exec(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        # Anything asked of QEMU may change its state (or follow a change).
        self._commands += 1
        qmp = self._client()
        return await self._call(qmp.execute(command, arguments))

    async def _status(self) -> str:
        result = await self._exec("query-status")
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            raise VmmProtocolError(self.instance_id, f"odd query-status answer: {result!r:.200}")
        return str(result["status"])

    async def _require(self, wanted: VmState, action: str) -> None:
        state = await self.state()
        if state is not wanted:
            raise wrong_state(self.instance_id, action, state.value)


def _with_disks(spec: VmSpec, disks: tuple[DiskSpec, ...]) -> VmSpec:
    return replace(spec, disks=disks)


def _is_power_off(data: dict[str, Any]) -> bool:
    # A guest-initiated reset also raises SHUTDOWN (reason "guest-reset"); it is no power-off.
    return "reset" not in str(data.get("reason", ""))
