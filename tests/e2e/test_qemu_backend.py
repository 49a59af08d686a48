"""QEMU-specific behaviour with real VMs: the acceleration probe, and a restore that replays
hot-plugged devices (a migration only loads into an identical device layout)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from managers.hypervisors import Acceleration, DiskSpec, VmState
from managers.hypervisors.accel import probe_acceleration
from managers.hypervisors.qemu import QemuVmm
from tests.support.hypervisor_guest import GuestKit, test_guest
from tests.support.hypervisor_harness import Harness, harness_for, make_disk

__all__ = ["test_guest"]

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
ID = "inst-qemu"


@pytest.fixture
async def harness(
    test_guest: GuestKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    async for value in harness_for("qemu", test_guest, tmp_path, monkeypatch):
        yield value


def _hardware_kvm() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return any(Path("/sys/module", name).is_dir() for name in ("kvm_intel", "kvm_amd"))


async def test_acceleration_is_decided_by_running_a_guest(harness: Harness) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    accel = await probe_acceleration(qemu, harness.guest.kernel)
    if not _hardware_kvm():
        # No KVM, or only a KVM that cannot run a normal guest (kvm_pvm here): TCG.
        assert accel is Acceleration.TCG
    # Whatever the probe said, the backend uses it and a guest boots with it.
    assert await harness.backend().acceleration() is accel


async def test_restore_replays_hotplugged_disk_and_memory(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    backend = harness.backend()
    vmm = harness.track(await backend.start_vmm(ID, workdir))
    assert isinstance(vmm, QemuVmm)
    spec = harness.spec(workdir)
    await vmm.create_and_boot(spec)
    await harness.wait_serial(spec.serial_file, harness.up_marker)
    await vmm.add_disk(DiskSpec("hot", make_disk(tmp_path / "hot.raw"), serial="hot"))
    await vmm.resize_memory(384)
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    await vmm.snapshot(snapshot)
    await vmm.stop()

    layout = json.loads((snapshot / "vmm-config.json").read_text())
    assert [d["id"] for d in layout["spec"]["disks"]] == ["hot"]
    assert layout["dimms"] == [128]

    restored = harness.track(await backend.restore(ID, workdir, snapshot))
    assert isinstance(restored, QemuVmm)
    assert await restored.state() is VmState.RUNNING
    assert restored.qmp is not None
    summary = await restored.qmp.execute("query-memory-size-summary")
    assert summary["base-memory"] + summary.get("plugged-memory", 0) == 384 << 20
    blocks = await restored.qmp.execute("query-block")
    assert "hot" in json.dumps(blocks)
    offset = spec.serial_file.stat().st_size
    await harness.wait_serial(spec.serial_file, harness.alive_marker, after=offset)
    await restored.remove_disk("hot")
