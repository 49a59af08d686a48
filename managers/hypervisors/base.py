"""The one interface every hypervisor backend implements.

A :class:`HypervisorBackend` starts, restores and re-adopts VMM processes; each VMM is driven
through a :class:`Vmm` handle. One VMM process runs one VM for one instance, in its own session,
so it outlives the dataplane; its files live in the instance's ``workdir`` (see ``layout.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from anyio.abc import ByteStream

from .types import Acceleration, BackendKind, DiskSpec, SpecChanges, VmmInfo, VmSpec, VmState


class Vmm(Protocol):
    """A handle on one running VMM process."""

    @property
    def instance_id(self) -> str: ...

    @property
    def pid(self) -> int:
        """The VMM's process id; 0 while no process exists yet (QEMU starts at boot)."""
        ...

    async def info(self) -> VmmInfo: ...

    async def create_and_boot(self, spec: VmSpec) -> None:
        """Define the VM from ``spec`` and boot it. Raises ``InvalidRequest`` before any change
        when the spec is unusable, ``WrongState`` when the VMM already holds a VM."""
        ...

    async def state(self) -> VmState:
        """Ask the VMM. Raises ``VmmDied`` when the process is gone."""
        ...

    def known_state(self) -> VmState | None:
        """The last answer of :meth:`state`, while the VMM provably has not changed since:
        it is alive, nothing has been asked of it, and it has reported no event. None means
        ask. Never blocks (no request, no path lookup), so a list of many VMs costs no round
        trip for those that sat still."""
        ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def shutdown(self, grace_seconds: float) -> bool:
        """Press the ACPI power button and wait up to ``grace_seconds`` for the guest to power
        off; force it off after that. The VMM process stays. Returns True when the guest
        powered off by itself."""
        ...

    async def reboot(self) -> None: ...

    async def snapshot(self, destination: Path) -> None:
        """Write a snapshot into ``destination`` (an existing, empty directory). A running VM is
        paused first and left paused, so disks and memory stay consistent until the caller
        resumes or stops it."""
        ...

    async def add_disk(self, disk: DiskSpec) -> None:
        """Hot-plug ``disk`` into the running (or paused) VM."""
        ...

    async def remove_disk(self, disk_id: str) -> None:
        """Hot-unplug the disk ``disk_id``; the guest must let go of it (QEMU waits for it)."""
        ...

    async def disk_ids(self) -> set[str]:
        """The ids of the disks the VM has now, as the VMM itself says."""
        ...

    async def resize_memory(self, memory_mb: int) -> None:
        """Grow guest memory to ``memory_mb`` (up to the spec's ``memory_max_mb``)."""
        ...

    async def open_agent(self) -> ByteStream:
        """A new connection to the guest agent's channel. Raises ``OSError`` while the VM has
        no agent channel or nothing answers on it yet."""
        ...

    async def stop(self) -> None:
        """End the VMM process (gracefully if it answers, then by signal) and remove its socket
        and records. Idempotent; never raises for a process that is already gone."""
        ...

    async def close(self) -> None:
        """Drop our connection without touching the VMM (for a dataplane shutdown)."""
        ...


class HypervisorBackend(Protocol):
    @property
    def kind(self) -> BackendKind: ...

    async def acceleration(self, kernel: Path | None = None) -> Acceleration:
        """How guests run: KVM when a probe guest (booting ``kernel``) actually runs on it."""
        ...

    async def version(self) -> str:
        """The VMM binary's version (``--version``), for health reports."""
        ...

    async def start_vmm(self, instance_id: str, workdir: Path) -> Vmm:
        """Start a fresh VMM for ``instance_id`` with its files in ``workdir``."""
        ...

    async def restore(
        self,
        instance_id: str,
        workdir: Path,
        snapshot_dir: Path,
        changes: SpecChanges | None = None,
    ) -> Vmm:
        """Start a new VMM and restore the snapshot in ``snapshot_dir`` into it, rewriting the
        recorded paths by ``changes``. The restored VM is running when this returns."""
        ...

    async def attach(self, instance_id: str, workdir: Path) -> Vmm:
        """Re-adopt the VMM that runs for ``instance_id`` (after a dataplane restart).
        Raises ``VmmNotFound`` when none is alive."""
        ...
