"""Cloud Hypervisor backend: one ``cloud-hypervisor`` process per VM, REST over its API socket.

Written against v53.0 (``../shared/reference/cloud-hypervisor-api.yaml`` and the differences
listed beside it); ``vmm.ping`` is checked at start and on attach, and other major versions are
refused rather than driven blind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream

from managers.atomic import write_json_atomic

from .agent_socket import connect_hybrid_vsock
from .ch_api import ChClient
from .ch_config import MIB, disk_config, rewrite_snapshot_config, vm_config
from .errors import (
    HypervisorError,
    InvalidRequest,
    UnsupportedVersion,
    VmmDied,
    VmmProtocolError,
    WrongState,
    wrong_state,
)
from .known import KnownState
from .layout import VmmFiles
from .process import VmmProcess, binary_version, recorded_process, wait_for_socket
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

SUPPORTED_MAJORS = frozenset({53})
SNAPSHOT_FILES = ("config.json", "state.json", "memory-ranges")
_STATES = {
    # Our create_and_boot always boots, so a VM that is merely "Created" has been shut down:
    # v53 reports a powered-off guest (and one after vm.shutdown) as Created.
    "Created": VmState.SHUTDOWN,
    "Running": VmState.RUNNING,
    "Paused": VmState.PAUSED,
    "Shutdown": VmState.SHUTDOWN,
}


def parse_major(version: str) -> int | None:
    head = version.strip().lstrip("v").split(".", 1)[0].split("-", 1)[0]
    return int(head) if head.isdigit() else None


class CloudHypervisorBackend:
    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.binary = (
            settings.cloud_hypervisor_bin
            or os.environ.get("CLOUD_HYPERVISOR_BIN")
            or shutil.which("cloud-hypervisor")
            or "cloud-hypervisor"
        )

    @property
    def kind(self) -> BackendKind:
        return BackendKind.CLOUD_HYPERVISOR

    async def acceleration(self, kernel: Path | None = None) -> Acceleration:
        return Acceleration.KVM

    async def version(self) -> str:
        return await binary_version(self.binary)

    async def start_vmm(self, instance_id: str, workdir: Path) -> ChVmm:
        files = VmmFiles(workdir)
        files.check(instance_id)
        argv = [
            self.binary,
            "--api-socket", f"path={files.socket}",
            "--event-monitor", f"path={files.events}",
            # Keep the VMM when the guest powers off, so the instance reads Shutdown, not gone.
            "--no-shutdown",
        ]  # fmt: skip
        process = await VmmProcess.spawn(
            argv, files, instance_id, {"kind": BackendKind.CLOUD_HYPERVISOR.value}
        )
        vmm = ChVmm(self, instance_id, files, process)
        try:
            await wait_for_socket(process, files, instance_id, self.settings.start_timeout)
            vmm.connect()
            await vmm.check_version()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await vmm.discard()
            raise
        return vmm

    async def restore(
        self,
        instance_id: str,
        workdir: Path,
        snapshot_dir: Path,
        changes: SpecChanges | None = None,
    ) -> ChVmm:
        VmmFiles(workdir).check(instance_id)
        check_snapshot_dir(instance_id, snapshot_dir, SNAPSHOT_FILES)
        config_path = snapshot_dir / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(instance_id, f"unreadable snapshot config: {exc}") from exc
        if not isinstance(config, dict):
            raise InvalidRequest(instance_id, "snapshot config.json is not an object")
        original = json.dumps(config, sort_keys=True)
        changes = replace(changes or SpecChanges(), agent_socket=VmmFiles(workdir).agent_socket)
        problems = rewrite_snapshot_config(config, changes)
        if problems:
            raise InvalidRequest(instance_id, "cannot restore: " + "; ".join(problems))
        if json.dumps(config, sort_keys=True) != original:
            write_json_atomic(config_path, config)
        vmm = await self.start_vmm(instance_id, workdir)
        try:
            await vmm.api().put(
                "vm.restore",
                {
                    "source_url": f"file://{snapshot_dir}",
                    "memory_restore_mode": self.settings.memory_restore_mode.value,
                },
            )
            await vmm.api().put("vm.resume")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await vmm.stop()
            raise
        return vmm

    async def attach(self, instance_id: str, workdir: Path) -> ChVmm:
        files = VmmFiles(workdir)
        process, _ = recorded_process(
            files, BackendKind.CLOUD_HYPERVISOR.value, "Cloud Hypervisor", instance_id
        )
        vmm = ChVmm(self, instance_id, files, process)
        vmm.connect()
        try:
            await vmm.check_version()
        except BaseException:
            await vmm.close()
            raise
        return vmm


class ChVmm:
    def __init__(
        self,
        backend: CloudHypervisorBackend,
        instance_id: str,
        files: VmmFiles,
        process: VmmProcess,
    ) -> None:
        self.backend = backend
        self.files = files
        self.process = process
        self._instance_id = instance_id
        self._client: ChClient | None = None
        self.version = ""
        # The last state read, marked with the size of the event file just before the
        # question: while no other request was made, the VMM lives and the file has not
        # grown, nothing has changed.
        self._known: KnownState | None = None
        self._requests = 0
        self._events_fd: int | None = None

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self) -> None:
        self._client = ChClient(
            self.instance_id,
            self.files.socket,
            self.backend.settings.request_timeout,
            self._transport_error,
        )
        if self._events_fd is None:
            # The VMM made the file before its socket came up; without it every state is asked.
            with contextlib.suppress(OSError):
                self._events_fd = os.open(self.files.events, os.O_RDONLY | os.O_CLOEXEC)

    def api(self) -> ChClient:
        # Anything asked of the VMM may change its state (or follow a change).
        self._requests += 1
        if not self.process.alive():
            raise self._died()
        if self._client is None:
            raise VmmProtocolError(self.instance_id, "not connected to the API socket")
        return self._client

    def known_state(self) -> VmState | None:
        # v53 writes an event for every change of state (boot, pause, resume, shutdown, the
        # guest's own power-off and reboot, delete, restore), so an event file that has not
        # grown since the last answer means that answer still holds. fstat on a held fd and a
        # pidfd poll: no path lookup, nothing that waits on a device.
        known, fd = self._known, self._events_fd
        if known is None or fd is None or not self.process.alive():
            return None
        return known.state if known.holds(self._requests, os.fstat(fd).st_size) else None

    async def check_version(self) -> None:
        answer = await self.api().get("vmm.ping")
        version = answer.get("version") if isinstance(answer, dict) else None
        if not isinstance(version, str):
            raise VmmProtocolError(self.instance_id, f"vmm.ping answered {answer!r:.200}")
        major = parse_major(version)
        if major not in SUPPORTED_MAJORS:
            raise UnsupportedVersion(
                self.instance_id,
                f"Cloud Hypervisor {version} is not supported "
                f"(supported major versions: {', '.join(map(str, sorted(SUPPORTED_MAJORS)))})",
            )
        self.version = version

    async def info(self) -> VmmInfo:
        await self.check_version()
        return VmmInfo(BackendKind.CLOUD_HYPERVISOR, self.version, self.pid)

    async def create_and_boot(self, spec: VmSpec) -> None:
        problems = spec.problems()
        if problems:
            raise InvalidRequest(self.instance_id, "invalid VM spec: " + "; ".join(problems))
        await self.api().put("vm.create", vm_config(spec, self.files.agent_socket))
        try:
            await self.api().put("vm.boot")
        except BaseException:
            # Leave the VMM as fresh as it was: a created-but-unbootable VM helps nobody.
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(HypervisorError):
                    await self.api().put("vm.delete")
            raise

    async def state(self) -> VmState:
        # The mark is taken before asking: an event written meanwhile makes the answer
        # look stale (one more question), never a stale answer look current.
        mark = os.fstat(self._events_fd).st_size if self._events_fd is not None else None
        api = self.api()
        asked = self._requests
        try:
            info = await api.get("vm.info")
        except WrongState as exc:
            if exc.status == 404:
                return self._remember(VmState.NOT_CREATED, asked, mark)
            raise
        state = info.get("state") if isinstance(info, dict) else None
        if state not in _STATES:
            raise VmmProtocolError(self.instance_id, f"vm.info has an unknown state {state!r}")
        return self._remember(_STATES[state], asked, mark)

    def _remember(self, state: VmState, asked: int, mark: int | None) -> VmState:
        if mark is not None:
            self._known = KnownState(state, asked, mark)
        return state

    async def pause(self) -> None:
        await self.api().put("vm.pause")

    async def resume(self) -> None:
        await self.api().put("vm.resume")

    async def shutdown(self, grace_seconds: float) -> bool:
        state = await self.state()
        if state in (VmState.SHUTDOWN, VmState.NOT_CREATED):
            raise wrong_state(self.instance_id, "shut down", state.value)
        if state is VmState.RUNNING:
            await self.api().put("vm.power-button")
            delay = 0.02
            with anyio.move_on_after(grace_seconds):
                while await self.state() is not VmState.SHUTDOWN:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.2)
                return True
        await self.api().put("vm.shutdown")
        return False

    async def reboot(self) -> None:
        await self.api().put("vm.reboot")

    async def snapshot(self, destination: Path) -> None:
        check_destination(self.instance_id, destination)
        state = await self.state()
        if state not in (VmState.RUNNING, VmState.PAUSED):
            raise wrong_state(self.instance_id, "snapshot", state.value)
        if state is VmState.RUNNING:
            await self.pause()
        await self.api().put("vm.snapshot", {"destination_url": f"file://{destination}"})

    async def add_disk(self, disk: DiskSpec) -> None:
        problems = disk.problems()
        if not disk.path.is_file():
            problems.append(f"disk {disk.id!r}: {str(disk.path)!r} does not exist")
        if problems:
            raise InvalidRequest(self.instance_id, "cannot add disk: " + "; ".join(problems))
        answer = await self.api().put("vm.add-disk", disk_config(disk))
        if answer is not None and not (isinstance(answer, dict) and "bdf" in answer):
            raise VmmProtocolError(self.instance_id, f"vm.add-disk answered {answer!r:.200}")

    async def remove_disk(self, disk_id: str) -> None:
        if disk_id not in await self.disk_ids():
            raise InvalidRequest(self.instance_id, f"no disk with id {disk_id!r}")
        await self.api().put("vm.remove-device", {"id": disk_id})

    async def disk_ids(self) -> set[str]:
        info = await self.api().get("vm.info")
        disks = (info.get("config") or {}).get("disks") or [] if isinstance(info, dict) else []
        return {disk["id"] for disk in disks if isinstance(disk, dict) and "id" in disk}

    async def resize_memory(self, memory_mb: int) -> None:
        try:
            info = await self.api().get("vm.info")
            memory: dict[str, Any] = info["config"]["memory"]
            current = (int(memory["size"]) + int(memory.get("hotplugged_size") or 0)) // MIB
            maximum = (int(memory["size"]) + int(memory.get("hotplug_size") or 0)) // MIB
        except (TypeError, KeyError, ValueError) as exc:
            raise VmmProtocolError(self.instance_id, "vm.info lacks the memory config") from exc
        growth = memory_mb - current
        if memory_mb > maximum or growth <= 0 or growth % 128:
            raise InvalidRequest(
                self.instance_id,
                f"memory can only grow in 128 MiB steps from {current} up to {maximum} MiB, "
                f"not to {memory_mb}",
            )
        await self.api().put("vm.resize", {"desired_ram": memory_mb * MIB})

    async def open_agent(self) -> ByteStream:
        return await connect_hybrid_vsock(self.files.agent_socket)

    async def stop(self) -> None:
        if self.process.alive() and self._client is not None:
            try:
                with anyio.fail_after(2):
                    await self._client.put("vmm.shutdown")
            except (HypervisorError, TimeoutError):
                pass
        await self.discard()

    async def discard(self) -> None:
        await self.close()
        await self.process.terminate()
        self.files.remove_runtime()

    async def close(self) -> None:
        self._known = None
        if self._events_fd is not None:
            os.close(self._events_fd)
            self._events_fd = None
        self.process.release()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _died(self) -> VmmDied:
        tail = self.files.log_tail()
        return VmmDied(
            self.instance_id,
            f"Cloud Hypervisor (pid {self.pid}) is gone" + (f" (VMM log: {tail})" if tail else ""),
            self.process.exit_code,
        )

    async def _transport_error(self, exc: Exception) -> HypervisorError:
        # A VMM that is being killed drops its socket a moment before it is reaped.
        if await self.process.wait_exit(0.5):
            return self._died()
        return VmmProtocolError(self.instance_id, f"API socket failed: {exc!r}")
