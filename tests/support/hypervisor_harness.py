"""What the hypervisor conformance suite needs to know about each backend under test.

Three targets share one suite: QEMU with real VMs (KVM when it works, else TCG), the Cloud
Hypervisor simulator, and real Cloud Hypervisor (only where the binary and a usable KVM exist).
A harness builds backends, specs and knows what the guest prints on its serial console.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from managers.hypervisors import (
    Acceleration,
    BackendKind,
    BackendSettings,
    DiskSpec,
    HypervisorBackend,
    Vmm,
    VmSpec,
    open_backend,
)
from managers.hypervisors.accel import probe_acceleration
from managers.hypervisors.process import proc_start_time

from .ch_simulator import WRAPPER
from .ch_simulator.spec import require_spec
from .hypervisor_guest import TICK_MARKER, UP_MARKER, GuestKit

SIMULATOR_BIN = WRAPPER
GUEST_WAIT = 120.0


@dataclass
class Harness:
    name: str
    kind: BackendKind
    settings: BackendSettings
    guest: GuestKit
    up_marker: str
    alive_marker: str
    violations: Path | None = None
    started: list[Vmm] = field(default_factory=list)

    def backend(self) -> HypervisorBackend:
        """A new backend object, as a restarted dataplane would make."""
        return open_backend(self.kind, self.settings)

    def spec(self, folder: Path, disks: tuple[DiskSpec, ...] = ()) -> VmSpec:
        return VmSpec(
            kernel=self.guest.kernel,
            initrd=self.guest.initrd,
            cmdline=self.guest.cmdline,
            serial_file=folder / "serial.log",
            vcpus=1,
            memory_mb=256,
            memory_max_mb=512,
            disks=disks,
        )

    def track(self, vmm: Vmm) -> Vmm:
        self.started.append(vmm)
        return vmm

    async def wait_serial(self, path: Path, marker: str, after: int = 0) -> int:
        """Wait until ``marker`` appears in ``path`` past byte ``after``; return its offset."""
        delay = 0.02
        with anyio.fail_after(GUEST_WAIT):
            while True:
                data = await anyio.to_thread.run_sync(_read, path)
                found = data.find(marker.encode(), after)
                if found >= 0:
                    return found
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.25)

    async def cleanup(self) -> None:
        for vmm in self.started:
            pid = vmm.pid
            with anyio.CancelScope(shield=True):
                await vmm.stop()
            if pid and proc_start_time(pid) is not None:
                # stop() failed to end it: end it by pid so no VMM outlives the test, and fail.
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"VMM pid {pid} survived stop()")

    def check_violations(self) -> None:
        if self.violations is not None and self.violations.exists():
            text = self.violations.read_text().strip()
            if text:
                lines = [json.loads(line) for line in text.splitlines()]
                pytest.fail(f"requests the Cloud Hypervisor reference rejects: {lines}")


def ch_simulator_harness(guest: GuestKit, violations: Path) -> Harness:
    return Harness(
        name="ch-simulator",
        kind=BackendKind.CLOUD_HYPERVISOR,
        settings=BackendSettings(cloud_hypervisor_bin=str(SIMULATOR_BIN), start_timeout=20.0),
        guest=guest,
        up_marker="[ch-simulator] booted",
        alive_marker="[ch-simulator] restored",
        violations=violations,
    )


def qemu_harness(guest: GuestKit) -> Harness:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return Harness(
        name="qemu",
        kind=BackendKind.QEMU,
        settings=BackendSettings(kernel=guest.kernel, start_timeout=20.0),
        guest=guest,
        up_marker=UP_MARKER,
        alive_marker=TICK_MARKER,
    )


async def real_ch_harness(guest: GuestKit) -> Harness:
    binary = os.environ.get("CLOUD_HYPERVISOR_BIN") or shutil.which("cloud-hypervisor")
    if binary is None:
        pytest.skip("real Cloud Hypervisor tier: no cloud-hypervisor binary on PATH")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("real Cloud Hypervisor tier: no QEMU to probe KVM with")
    if await probe_acceleration(qemu, guest.kernel) is not Acceleration.KVM:
        pytest.skip("real Cloud Hypervisor tier: KVM cannot run a guest here (probe booted none)")
    return Harness(
        name="cloud-hypervisor",
        kind=BackendKind.CLOUD_HYPERVISOR,
        settings=BackendSettings(cloud_hypervisor_bin=binary),
        guest=guest,
        up_marker=UP_MARKER,
        alive_marker=TICK_MARKER,
    )


async def harness_for(
    name: str, guest: GuestKit, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    if name == "qemu":
        harness = qemu_harness(guest)
    elif name == "ch-simulator":
        require_spec()
        violations = tmp / "ch-simulator-violations.jsonl"
        monkeypatch.setenv("CH_SIMULATOR_VIOLATIONS", str(violations))
        monkeypatch.setenv("CH_SIMULATOR_PYTHON", sys.executable)
        harness = ch_simulator_harness(guest, violations)
    else:
        harness = await real_ch_harness(guest)
    try:
        yield harness
    finally:
        await harness.cleanup()
    harness.check_violations()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def make_disk(path: Path, size_mb: int = 4) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size_mb << 20)
    return path
