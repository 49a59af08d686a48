"""Boot, start, stop, reboot, pause and resume; each runs under the instance's lock.

Start and stop record their intent before their first effect and clear it after their
last, so a crash in between is finished or undone by ``recovery.py``. Pause, resume and
reboot leave no half state of their own: the VMM's state is the whole truth.
"""

from __future__ import annotations

import contextlib
import shutil

import anyio

from managers.clock import now_iso
from managers.failpoints import failpoint
from managers.hypervisors import HypervisorError
from managers.instances.context import Context, Live
from managers.instances.types import InstanceRecord, InstanceState, Intent, IntentKind

_S = InstanceState


async def boot(ctx: Context, record: InstanceRecord, live: Live, *, tap_failpoint: str) -> None:
    """Boot a fresh VMM for ``record``; on failure, nothing it made stays (TAP, VMM).

    The caller has recorded its intent, so a crash inside leaves nothing recovery cannot find.
    """
    instance_id = record.id
    # Everything that can refuse without side effects comes first.
    spec = await ctx.vm_spec(record)
    backend = ctx.backend(record)
    await ctx.stop_pump(instance_id, live)
    try:
        if await ctx.create_tap(record):
            failpoint(tap_failpoint)
        await ctx.new_output_files(instance_id, live)
        await anyio.to_thread.run_sync(live.pump.new_boot)
        vmm = await backend.start_vmm(instance_id, ctx.paths.instance_dir(instance_id))
        live.vmm = vmm
        await vmm.create_and_boot(spec)
    except BaseException:
        await ctx.end_vmm(instance_id, live)
        await ctx.delete_tap(instance_id)
        raise
    ctx.start_pump(instance_id)
    ctx.start_agent(instance_id, live)


async def start(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    record = await ctx.save(record.evolve(intent=Intent(IntentKind.START, now_iso())))
    try:
        # A guest that powered off leaves its VMM, and a fresh boot needs a fresh one; any VMM
        # of this folder we hold no handle on would share the disks with it, so it goes too.
        await ctx.end_vmm(record.id, live)
        await boot(ctx, record, live, tap_failpoint="start.tap")
        failpoint("start.booted")
    finally:
        with anyio.CancelScope(shield=True):
            booted = record.booted or live.vmm is not None
            pending = record.restart_pending and live.vmm is None
            await ctx.save(record.evolve(intent=None, booted=booted, restart_pending=pending))


async def stop(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    """Ask the guest to power off (within the grace period), then end the VMM and its TAP."""
    # A restore recovery could not settle (its VMM never answered) may have run the VM: its
    # snapshot no longer matches the disk, so stopping it leaves the disk as the instance.
    void = ctx.paths.instance_standby(record.id)
    voided = record.intent is not None and record.intent.action is IntentKind.RESTORE
    record = await ctx.save(record.evolve(intent=Intent(IntentKind.STOP, now_iso())))
    if live.vmm is not None and state in (_S.INITIALIZING, _S.RUNNING):
        with contextlib.suppress(HypervisorError):
            await live.vmm.shutdown(ctx.grace)
    failpoint("stop.shutdown")
    await ctx.end_vmm(record.id, live, "the instance was stopped")
    if voided:
        await anyio.to_thread.run_sync(shutil.rmtree, void, True)
    await finish_stop(ctx, record, live)


async def finish_stop(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """End the VMM, its TAP and the log pump; clear the intent (stop, and its recovery)."""
    await ctx.end_vmm(record.id, live)
    await ctx.stop_pump(record.id, live)
    await ctx.delete_tap(record.id)
    await ctx.save(record.evolve(intent=None))


async def reboot(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    assert live.vmm is not None
    await ctx.stop_agent(live, "the instance rebooted")
    await anyio.to_thread.run_sync(live.pump.drain)
    await anyio.to_thread.run_sync(live.pump.new_boot)
    try:
        await live.vmm.reboot()
    finally:
        ctx.start_agent(record.id, live)


async def pause(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    assert live.vmm is not None
    await live.vmm.pause()


async def resume(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    assert live.vmm is not None
    await live.vmm.resume()
