"""One conformance suite for the hypervisor interface, run on every backend.

``qemu`` boots real VMs (TCG here), ``ch-simulator`` drives the Cloud Hypervisor backend against
the simulator (every request checked against the v53 reference), ``cloud-hypervisor`` runs real
Cloud Hypervisor where the binary and a usable KVM exist.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from managers.hypervisors import (
    DiskSpec,
    InvalidRequest,
    SpecChanges,
    Vmm,
    VmmDied,
    VmmNotFound,
    VmState,
    WrongState,
)
from managers.hypervisors.process import proc_start_time
from tests.support.hypervisor_guest import GuestKit, test_guest
from tests.support.hypervisor_harness import Harness, harness_for, make_disk

__all__ = ["test_guest"]

pytestmark = pytest.mark.anyio
BACKENDS = [
    pytest.param("qemu", marks=pytest.mark.e2e),
    "ch-simulator",
    pytest.param("cloud-hypervisor", marks=pytest.mark.e2e),
]
ID = "inst-conformance"


@pytest.fixture(params=BACKENDS)
async def harness(
    request: pytest.FixtureRequest,
    test_guest: GuestKit,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    async for value in harness_for(request.param, test_guest, tmp_path, monkeypatch):
        yield value


def _gone(pid: int, workdir: Path) -> None:
    assert proc_start_time(pid) is None, f"VMM pid {pid} still runs"
    assert not (workdir / "vmm.sock").exists()
    assert not (workdir / "vmm.json").exists()


async def test_full_lifecycle(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    backend = harness.backend()
    vmm = harness.track(await backend.start_vmm(ID, workdir))
    assert await vmm.state() is VmState.NOT_CREATED
    spec = harness.spec(workdir)
    await vmm.create_and_boot(spec)
    await harness.wait_serial(spec.serial_file, harness.up_marker)
    assert vmm.pid > 0
    assert await vmm.state() is VmState.RUNNING
    assert await backend.version()
    info = await vmm.info()
    assert info.kind is backend.kind
    assert info.pid == vmm.pid
    assert info.version

    await vmm.pause()
    assert await vmm.state() is VmState.PAUSED
    await vmm.resume()
    assert await vmm.state() is VmState.RUNNING

    await vmm.resize_memory(384)
    with pytest.raises(InvalidRequest, match=ID):
        await vmm.resize_memory(1024)  # above memory_max_mb

    offset = spec.serial_file.stat().st_size
    await vmm.reboot()
    assert await vmm.state() is VmState.RUNNING
    await harness.wait_serial(spec.serial_file, harness.up_marker, after=offset)

    assert await vmm.shutdown(grace_seconds=60) is True
    assert await vmm.state() is VmState.SHUTDOWN
    pid = vmm.pid
    await vmm.stop()
    _gone(pid, workdir)
    await vmm.stop()  # idempotent


async def polled_until(condition: Callable[[], bool], seconds: float) -> None:
    """Look at a synchronous answer until it holds: known_state() wakes no one when it lapses,
    and that it lapses without any request being made is what these tests show."""
    with anyio.fail_after(seconds):
        for _ in itertools.count():
            if condition():
                return
            await anyio.sleep(0.01)


async def booted_and_up(harness: Harness, tmp_path: Path, cmdline: str = "") -> Vmm:
    """A fresh VMM whose guest has come up, never asked for its state."""
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    spec = harness.spec(workdir)
    spec = replace(spec, cmdline=f"{spec.cmdline} {cmdline}".strip())
    await vmm.create_and_boot(spec)
    assert vmm.known_state() is None  # never asked
    await harness.wait_serial(spec.serial_file, harness.up_marker)
    return vmm


async def test_known_state_holds_only_while_nothing_can_have_changed(
    harness: Harness, tmp_path: Path
) -> None:
    vmm = await booted_and_up(harness, tmp_path)
    assert await vmm.state() is VmState.RUNNING
    assert vmm.known_state() is VmState.RUNNING
    assert vmm.known_state() is VmState.RUNNING  # looking does not use it up

    await vmm.pause()
    assert vmm.known_state() is None  # every request may change the state
    assert await vmm.state() is VmState.PAUSED
    assert vmm.known_state() is VmState.PAUSED
    await vmm.resume()
    assert vmm.known_state() is None
    assert await vmm.state() is VmState.RUNNING

    # The VMM ends without a word to us: noticed by its pidfd, not by asking.
    os.kill(vmm.pid, signal.SIGKILL)
    await polled_until(lambda: vmm.known_state() is None, seconds=10)
    with pytest.raises(VmmDied, match=ID):
        await vmm.state()
    await vmm.stop()


async def test_a_change_the_guest_makes_ends_the_known_state(
    harness: Harness, tmp_path: Path
) -> None:
    vmm = await booted_and_up(harness, tmp_path, "poweroff_after=1")
    assert await vmm.state() is VmState.RUNNING
    assert vmm.known_state() is VmState.RUNNING
    # The guest powers itself off a second after it came up; nothing is asked of the VMM
    # here, so only its own report (Cloud Hypervisor's event file, a QMP event) can tell.
    await polled_until(lambda: vmm.known_state() is not VmState.RUNNING, seconds=60)
    assert vmm.known_state() is None
    assert await vmm.state() is VmState.SHUTDOWN
    assert vmm.known_state() is VmState.SHUTDOWN


async def test_wrong_state_calls(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    with pytest.raises(WrongState, match=ID):
        await vmm.pause()
    spec = harness.spec(workdir)
    await vmm.create_and_boot(spec)
    with pytest.raises(WrongState, match=ID):
        await vmm.resume()
    with pytest.raises(WrongState, match=ID):
        await vmm.create_and_boot(spec)
    await vmm.pause()
    with pytest.raises(WrongState, match=ID):
        await vmm.pause()
    # A paused guest cannot react to the power button: shutdown forces it off.
    assert await vmm.shutdown(grace_seconds=1) is False
    assert await vmm.state() is VmState.SHUTDOWN
    for call in (vmm.resume, vmm.pause, vmm.reboot):
        with pytest.raises(WrongState, match=ID):
            await call()
    with pytest.raises(WrongState, match=ID):
        await vmm.shutdown(grace_seconds=1)


async def test_bad_spec_starts_nothing(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    spec = harness.spec(workdir, disks=(DiskSpec("data", tmp_path / "missing.raw"),))
    with pytest.raises(InvalidRequest, match=r"missing\.raw"):
        await vmm.create_and_boot(spec)
    assert await vmm.state() is VmState.NOT_CREATED


async def test_snapshot_then_restore_in_new_process(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    disk = make_disk(tmp_path / "data.raw")
    spec = harness.spec(workdir, disks=(DiskSpec("data", disk, serial="data"),))
    backend = harness.backend()
    vmm = harness.track(await backend.start_vmm(ID, workdir))
    await vmm.create_and_boot(spec)
    await harness.wait_serial(spec.serial_file, harness.up_marker)

    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "stray").write_text("x")
    with pytest.raises(InvalidRequest, match="not empty"):
        await vmm.snapshot(snapshot)
    (snapshot / "stray").unlink()
    await vmm.snapshot(snapshot)
    assert await vmm.state() is VmState.PAUSED
    old_pid = vmm.pid
    await vmm.stop()
    _gone(old_pid, workdir)

    # The instance's files moved: the restore must follow them.
    moved_disk = disk.rename(tmp_path / "moved.raw")
    new_serial = tmp_path / "restored-serial.log"
    with pytest.raises(InvalidRequest, match=ID):
        await backend.restore(ID, workdir, snapshot)  # the recorded disk path is gone
    assert not (workdir / "vmm.json").exists()
    restored = harness.track(
        await backend.restore(
            ID,
            workdir,
            snapshot,
            SpecChanges(disk_paths={"data": moved_disk}, serial_file=new_serial),
        )
    )
    assert restored.pid != old_pid
    assert await restored.state() is VmState.RUNNING
    await harness.wait_serial(new_serial, harness.alive_marker)
    await restored.pause()
    await restored.resume()


async def test_hot_add_and_remove_disk(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    spec = harness.spec(workdir)
    await vmm.create_and_boot(spec)
    await harness.wait_serial(spec.serial_file, harness.up_marker)
    extra = DiskSpec("extra", make_disk(tmp_path / "extra.raw"), readonly=True, serial="extra")
    await vmm.add_disk(extra)
    with pytest.raises(InvalidRequest, match=ID):
        await vmm.add_disk(DiskSpec("bad", tmp_path / "nope.raw"))
    await vmm.remove_disk("extra")
    with pytest.raises(InvalidRequest, match="extra"):
        await vmm.remove_disk("extra")
    # The slot and id are free again.
    await vmm.add_disk(extra)
    assert await vmm.state() is VmState.RUNNING


async def test_killed_vmm_is_reported_as_died(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    await vmm.create_and_boot(harness.spec(workdir))
    pid = vmm.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VmmDied, match=ID):
        await vmm.state()
    with pytest.raises(VmmDied, match=ID):
        await vmm.pause()
    await vmm.stop()
    _gone(pid, workdir)
    with pytest.raises(VmmNotFound, match=ID):
        await harness.backend().attach(ID, workdir)


async def test_reattach_after_dataplane_restart(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = await harness.backend().start_vmm(ID, workdir)
    harness.track(vmm)
    spec = harness.spec(workdir)
    await vmm.create_and_boot(spec)
    await harness.wait_serial(spec.serial_file, harness.up_marker)
    pid = vmm.pid
    # The dataplane goes away: its connections close, the VMM keeps running.
    await vmm.close()
    assert proc_start_time(pid) is not None
    adopted = harness.track(await harness.backend().attach(ID, workdir))
    assert adopted.pid == pid
    assert await adopted.state() is VmState.RUNNING
    await adopted.pause()
    assert await adopted.state() is VmState.PAUSED
    await adopted.resume()
    await adopted.stop()
    _gone(pid, workdir)


async def test_attach_without_vmm(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(VmmNotFound, match=ID):
        await harness.backend().attach(ID, tmp_path)
    assert not (tmp_path / "vmm.json").exists()
