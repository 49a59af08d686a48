"""Start-up: reconcile the records on disk with the VMMs, TAPs and files a crash left.

Every folder under ``instances/`` is one of:

- **unborn**: no record and nothing but temporaries (a create killed inside its first
  write). Any VMM marked with the folder is ended and the folder removed: nothing in it
  was ever promised to anyone.
- **unreadable**: its record is missing, truncated or invalid. Its VMMs are ended and its
  TAP removed (both are provably ours: marked with the folder, named by it), then the
  folder moves whole, disks included, to ``quarantine/instances/``. It is listed as an
  ``Unknown`` instance with its quarantine, never deleted.
- **a record with an intent**: an operation was cut short. Create is rolled back, delete
  and stop are finished, start is kept if its VM came up (else undone), standby is finished
  if its snapshot was committed (else the VM is resumed unless it was paused before),
  restore is kept if its VM runs (else the standby stays; a VMM that cannot be asked leaves
  the instance ``Unknown`` with its intent, for stop or delete to settle).
- **a record at rest**: its live VMM is re-adopted and its logs caught up.
"""

from __future__ import annotations

import contextlib
import os

import anyio

from managers.atomic import remove_stale_temporaries
from managers.hypervisors import (
    HypervisorError,
    VmmDied,
    VmmNotFound,
    VmState,
    terminate_recorded,
    vmm_pids,
)
from managers.instances import actions, create, standby, volumes
from managers.instances.context import Context, Live, log
from managers.instances.types import InstanceRecord, IntentKind, QuarantineInfo
from managers.quarantine import quarantine, quarantined


async def recover(ctx: Context) -> None:
    """Load every instance and settle what a crash left; one failure never stops the rest."""
    for tombstone in await anyio.to_thread.run_sync(ctx.store.sweep_tombstones):
        log.info("finished removing %s, cut short by a crash", tombstone)
    found = await anyio.to_thread.run_sync(ctx.store.scan)
    for instance_id in found.unborn:
        log.warning("removing instance folder %s, made by a create cut short", instance_id)
        await _end_leftovers(ctx, instance_id)
        await anyio.to_thread.run_sync(ctx.store.remove_unborn, instance_id)
    for instance_id, reason in found.unreadable.items():
        await _quarantine(ctx, instance_id, reason)
    for item in await anyio.to_thread.run_sync(quarantined, ctx.paths, "instances"):
        ctx.quarantined[item.name] = QuarantineInfo(
            path=str(item.path), reason=item.reason, quarantined_at=item.quarantined_at
        )
    for record in found.records:
        ctx.records[record.id] = record
        ctx.names[record.name] = record.id
        # Held for as long as the instance exists; released by delete (or a rollback below).
        with contextlib.suppress(Exception):
            ctx.images.acquire(record.image.digest)
        _claim_volumes(ctx, record)
    for record in list(found.records):
        try:
            await _recover_one(ctx, record)
        except Exception as error:
            log.exception(
                "could not recover instance %s: %s",
                record.id,
                error,
                extra={"instance_id": record.id},
            )
            # Not knowing is said, not guessed: Unknown accepts only stop and delete, which
            # end whatever VMM the folder has.
            live = ctx.live.get(record.id)
            if live is not None and live.vmm is None:
                live.unreachable = f"recovery failed: {error}"


async def _recover_one(ctx: Context, record: InstanceRecord) -> None:
    await anyio.to_thread.run_sync(_tidy, ctx, record.id)
    live = ctx.live_for(record.id)
    intent = record.intent
    if intent is None:
        await _adopt(ctx, record, live)
        return
    log.warning(
        "finishing %s interrupted by a crash at %s",
        intent.action,
        intent.at,
        extra={"instance_id": record.id},
    )
    if intent.action in (IntentKind.ATTACH, IntentKind.DETACH):
        await _adopt(ctx, record, live)
        await _settle_volume(ctx, record, live)
        return
    async with live.lock:
        if intent.action in (IntentKind.START, IntentKind.RESTORE):
            await _attach(ctx, record, live)
        if intent.action is IntentKind.RESTORE:
            ran = await _vm_ran(ctx, record, live, (VmState.RUNNING, VmState.SHUTDOWN))
            if ran is None:
                # A VMM runs that cannot be asked whether its VM ran: keeping the snapshot
                # could pair old memory with a newer disk, dropping it could lose the VM.
                # The instance reads Unknown, the intent stays, stop or delete settles it.
                log.warning(
                    "cannot tell whether the restore finished: %s",
                    live.unreachable,
                    extra={"instance_id": record.id},
                )
                return
        match intent.action:
            case IntentKind.CREATE | IntentKind.DELETE:
                await create.remove(ctx, record, live)
            case IntentKind.STOP:
                await actions.finish_stop(ctx, record, live)
            case IntentKind.START:
                # A Cloud Hypervisor VM created but never booted reads as shut down.
                if await _vm_ran(ctx, record, live, (VmState.RUNNING,)):
                    await ctx.save(record.evolve(intent=None, booted=True))
                    ctx.start_pump(record.id)
                else:
                    await ctx.end_vmm(record.id, live)
                    await ctx.delete_tap(record.id)
                    await ctx.save(record.evolve(intent=None))
            case IntentKind.STANDBY:
                committed = ctx.paths.instance_standby(record.id).is_dir()
                await _attach(ctx, record, live)
                if committed:
                    await standby.finish_standby(ctx, record, live)
                else:
                    await standby.undo_standby(ctx, record, live)
                    if live.vmm is not None:
                        ctx.start_pump(record.id)
            case IntentKind.RESTORE:
                if ran:
                    await standby.finish_restore(ctx, record, live)
                else:
                    await standby.undo_restore(ctx, record, live)
    await anyio.to_thread.run_sync(live.pump.drain)


def _claim_volumes(ctx: Context, record: InstanceRecord) -> None:
    """The record is where attachments live: its volumes (and one being attached) are held."""
    if ctx.volumes is None:
        return
    held = list(record.volumes)
    intent = record.intent
    if intent is not None and intent.action is IntentKind.ATTACH and intent.volume is not None:
        held.append(intent.volume)
    for volume in held:
        if not ctx.volumes.adopt(volume.volume_id, record.id, volume.mount_path, volume.readonly):
            log.error(
                "volume %s of this instance is missing (deleted by hand, or quarantined); "
                "its next boot will fail until it is detached",
                volume.volume_id,
                extra={"instance_id": record.id},
            )


async def _settle_volume(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """An attach or detach cut short: at once with no VM, else once the agent can answer.

    With a VM running, settling needs the guest's agent, which a restarted dataplane only
    reaches after its own start-up; the instance's lock is held meanwhile, so nothing else
    acts on it first.
    """

    async def settle() -> None:
        async with live.lock:
            current = ctx.records.get(record.id)
            if current is not None and current.intent is not None:
                await volumes.settle(ctx, current, live)

    if live.vmm is None or ctx.spawn is None:
        await settle()
    else:
        ctx.spawn(settle)


def _tidy(ctx: Context, instance_id: str) -> None:
    """Drop what a killed atomic write left; close folders made before files were private."""
    folder = ctx.paths.instance_dir(instance_id)
    os.chmod(folder, 0o700)
    remove_stale_temporaries(folder)
    remove_stale_temporaries(ctx.paths.instance_logs(instance_id))


async def _adopt(ctx: Context, record: InstanceRecord, live: Live) -> None:
    await _attach(ctx, record, live)
    if live.unreachable is not None:
        log.warning(
            "the VMM cannot be re-adopted: %s", live.unreachable, extra={"instance_id": record.id}
        )
    # Catch up on output written while we were away, then follow.
    await anyio.to_thread.run_sync(live.pump.drain)
    if live.vmm is not None:
        log.info("re-adopted running VMM", extra={"instance_id": record.id})
        ctx.start_pump(record.id)
    elif live.unreachable is None:
        # The VMM ended while we were away: its TAP has nothing to serve.
        await ctx.delete_tap(record.id)


async def _attach(ctx: Context, record: InstanceRecord, live: Live) -> None:
    backend = ctx.backends.get(record.hypervisor)
    if backend is None:
        live.unreachable = f"no {record.hypervisor} binary on this node"
        return
    workdir = ctx.paths.instance_dir(record.id)
    try:
        live.vmm = await backend.attach(record.id, workdir)
        ctx.start_agent(record.id, live)
    except VmmNotFound:
        live.vmm = None
        # A VMM whose record is damaged is still ours: it is shown (Unknown) and ended by
        # stop or delete, never left running unseen.
        pids = await anyio.to_thread.run_sync(vmm_pids, workdir)
        if pids:
            live.unreachable = f"VMM pid {pids[0]} runs, but its record cannot be read"
    except Exception as error:
        # A record that parses but does not describe a VMM we can drive (a field missing, a
        # layout from another version): the VMM may run, so the instance reads Unknown.
        live.unreachable = str(error) or type(error).__name__


async def _vm_ran(
    ctx: Context, record: InstanceRecord, live: Live, ran: tuple[VmState, ...]
) -> bool | None:
    """Whether the VMM a cut-short start or restore made has its VM in one of ``ran``; None
    when a VMM runs that cannot be asked.

    Paused never counts: a VM still being restored reads paused, and one that never got
    past that has not run, so its snapshot is still the instance.
    """
    if live.unreachable is not None:
        return None
    if live.vmm is None:
        return False
    try:
        state = await live.vmm.state()
    except (VmmNotFound, VmmDied):
        return False
    except HypervisorError as error:
        live.unreachable = str(error)
        return None
    return state in ran


async def _end_leftovers(ctx: Context, instance_id: str) -> None:
    """End the VMMs and remove the TAP of a folder that has no usable record."""
    with contextlib.suppress(Exception):
        await terminate_recorded(ctx.paths.instance_dir(instance_id))
    if ctx.network is not None:
        with contextlib.suppress(Exception):
            await ctx.network.delete_tap(instance_id)


async def _quarantine(ctx: Context, instance_id: str, reason: str) -> None:
    await _end_leftovers(ctx, instance_id)
    folder = ctx.paths.instance_dir(instance_id)
    try:
        moved = await anyio.to_thread.run_sync(quarantine, ctx.paths, "instances", folder, reason)
    except OSError as error:
        # Left where it is (and not loaded): the next start tries again.
        log.error("could not quarantine instance folder %s (%s): %s", folder, reason, error)
        return
    log.warning(
        "quarantined instance %s to %s: %s",
        instance_id,
        moved,
        reason,
        extra={"instance_id": instance_id},
    )
