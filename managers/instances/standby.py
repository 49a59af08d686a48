"""Standby and restore: an instance's whole VM to disk and back.

Standby: record the intent, pause, snapshot into ``standby.partial/``, rename it to
``standby/`` (the commit point: from here the snapshot is the instance), end the VMM and
its TAP, clear the intent. A crash before the rename leaves the VM, which recovery resumes
unless standby found it paused (discarding the partial snapshot); a crash after it leaves a
complete standby, which recovery finishes. The VM is paused from the snapshot on, so nothing
it does after the snapshot can be lost by committing it.

Restore: record the intent, recreate the TAP, restore in a fresh VMM, remove the snapshot,
clear the intent. A crash before the VM runs leaves the standby (recovery ends the new VMM);
once it runs, recovery keeps the VM and removes the snapshot: never both, never neither. A new
VMM that runs but cannot be asked leaves the instance ``Unknown``, its intent kept, until a
stop (which drops the snapshot) or a delete settles it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio

from managers.atomic import fsync_dir
from managers.clock import now_iso
from managers.failpoints import failpoint
from managers.hypervisors import SpecChanges
from managers.instances.context import Context, Live, log
from managers.instances.errors import ActionFailed
from managers.instances.types import InstanceRecord, InstanceState, Intent, IntentKind

# How long a restore waits for the agent to answer (and the guest clock to be set).
RESTORE_CLOCK_WAIT_SECONDS = 5.0


async def standby(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    """pause -> snapshot -> commit -> end the VMM and TAP; undone before the commit on failure."""
    assert live.vmm is not None
    vmm = live.vmm
    was_paused = state is InstanceState.PAUSED
    record = await ctx.save(
        record.evolve(intent=Intent(IntentKind.STANDBY, now_iso(), was_paused=was_paused))
    )
    target = ctx.paths.instance_standby(record.id)
    staging = ctx.paths.instance_standby_partial(record.id)
    step = "pause"
    try:
        await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
        if not was_paused:
            await vmm.pause()
        # Operations under way fail now, with a reason, rather than hang until a restore. Once
        # paused: a guest that saw its host leave would look for it again only slowly.
        await ctx.stop_agent(live, "the instance went to standby")
        failpoint("standby.paused")
        step = "snapshot"
        await anyio.Path(staging).mkdir(mode=0o700)
        await vmm.snapshot(staging)
        failpoint("standby.snapshot_written")
        step = "commit the snapshot"
        await anyio.to_thread.run_sync(_commit, staging, target)
    except BaseException as error:
        with anyio.CancelScope(shield=True):
            if await anyio.Path(target).is_dir():
                # The rename happened (its fsync failed, or we were cancelled right after):
                # the snapshot is the instance now, so the standby is finished, not undone.
                await finish_standby(ctx, record, live)
            else:
                await undo_standby(ctx, record, live)
        if isinstance(error, Exception):
            raise ActionFailed(record.id, "standby", step, error) from error
        raise
    failpoint("standby.committed")
    await finish_standby(ctx, record, live)


async def undo_standby(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """Before the commit: discard the partial snapshot, wake the VM if standby paused it."""
    await anyio.to_thread.run_sync(
        shutil.rmtree, ctx.paths.instance_standby_partial(record.id), True
    )
    intent = record.intent
    if live.vmm is not None:
        ctx.start_agent(record.id, live)
    if live.vmm is not None and intent is not None and not intent.was_paused:
        try:
            await live.vmm.resume()
        except Exception as error:
            # The VM stays paused: still a consistent instance, which a resume can wake.
            log.warning(
                "could not resume after standby: %s", error, extra={"instance_id": record.id}
            )
    await ctx.save(record.evolve(intent=None))


async def finish_standby(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """After the commit: the snapshot is the instance, so the VMM and its TAP go."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(live.pump.drain)
        await ctx.end_vmm(record.id, live, "the instance went to standby")
        await ctx.stop_pump(record.id, live)
        await ctx.delete_tap(record.id)
        await ctx.save(record.evolve(intent=None))


async def restore(ctx: Context, record: InstanceRecord, live: Live, state: InstanceState) -> None:
    """TAP again -> new VMM restoring the snapshot -> running; the snapshot is then removed."""
    record = await ctx.save(record.evolve(intent=Intent(IntentKind.RESTORE, now_iso())))
    snapshot = ctx.paths.instance_standby(record.id)
    step = "recreate the TAP"
    try:
        if await ctx.create_tap(record):
            failpoint("restore.tap")
        step = "restore the VM"
        await ctx.new_output_files(record.id, live)
        changes = SpecChanges(
            disk_paths=ctx.disk_paths(record),
            serial_file=ctx.paths.instance_serial_raw(record.id),
            output_file=ctx.paths.instance_output_raw(record.id),
            tap=record.network.tap,
        )
        live.vmm = await ctx.backend(record).restore(
            record.id, ctx.paths.instance_dir(record.id), snapshot, changes
        )
    except BaseException as error:
        with anyio.CancelScope(shield=True):
            await undo_restore(ctx, record, live)
        if isinstance(error, Exception):
            raise ActionFailed(record.id, "restore", step, error) from error
        raise
    failpoint("restore.running")
    await finish_restore(ctx, record, live)
    await _clock_set(ctx, record, live)


async def _clock_set(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """Wait (bounded) for the agent's handshake, which sets the guest's clock from ours.

    A guest snapshotted before its program started has no agent yet; nothing to wait for."""
    link = ctx.start_agent(record.id, live)
    if link is None or live.pump.status.program_started_at is None:
        return
    began = anyio.current_time()
    if await link.handshake_after(0, RESTORE_CLOCK_WAIT_SECONDS):
        log.info(
            "the agent set the guest's clock %.1f ms after the restore",
            (anyio.current_time() - began) * 1000,
            extra={"instance_id": record.id},
        )
    else:
        log.warning(
            "the agent did not answer within %g s of the restore; the guest's clock is set "
            "when it does",
            RESTORE_CLOCK_WAIT_SECONDS,
            extra={"instance_id": record.id},
        )


async def undo_restore(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """The VM never ran: end whatever VMM was started; the standby stays."""
    await ctx.end_vmm(record.id, live)
    await ctx.delete_tap(record.id)
    await ctx.save(record.evolve(intent=None))


async def finish_restore(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """The VM runs: the snapshot is spent."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(shutil.rmtree, ctx.paths.instance_standby(record.id), True)
        await ctx.save(record.evolve(intent=None))
    ctx.start_pump(record.id)


def _commit(staging: Path, target: Path) -> None:
    staging.rename(target)
    # The rename is the commit point, so it is made durable before the VMM is ended.
    fsync_dir(target.parent)
