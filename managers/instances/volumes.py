"""Attach and detach a volume: hot while the program runs, cold while no VM runs.

**Hot attach** (``Running``): the intent is recorded, the disk is hot-plugged (read-only in
the VMM when the attachment is), the guest agent mounts it, the config disk is rewritten so
the next boot mounts it too, and the record commits the attachment. Any failure before the
commit takes the disk out again. **Hot detach**: the intent is recorded, the agent syncs and
unmounts (files open there: 409 ``volume_busy``, nothing changed), the config disk is
rewritten, the disk is unplugged, and the record commits. **Cold** (``Created``, ``Stopped``,
``Shutdown``): intent, config disk, commit; the next boot has the disk.

A crash is settled at start-up (:func:`settle`): with no VM running, an attach is undone and
a detach finished; with the VM running, both are carried forward once the agent answers
(the disk plugged and mounted, or unmounted and unplugged), and undone if that fails.
"""

from __future__ import annotations

import contextlib
import errno as errnos

import anyio

from managers.agent import AgentUnavailable, Channel, GuestOperationFailed
from managers.agent.operations import mount, umount
from managers.clock import now_iso
from managers.failpoints import failpoint
from managers.guest import write_config_disk
from managers.hypervisors import InvalidRequest
from managers.instances.context import Context, ImageLike, Live, log
from managers.instances.create import guest_config
from managers.instances.errors import InvalidInstanceSpec, VolumeNotAttached
from managers.instances.types import (
    AttachedVolume,
    InstanceRecord,
    InstanceState,
    Intent,
    IntentKind,
    VolumeRequest,
    volume_problems,
)
from managers.volumes import VolumeBusy, VolumeError, disk_serial

# How long a hot attach or detach waits for an agent that is not up yet.
AGENT_WAIT_SECONDS = 10.0
# At start-up, how long settling a hot attach or detach waits for the agent.
SETTLE_AGENT_WAIT_SECONDS = 30.0


async def attach(
    ctx: Context, record: InstanceRecord, live: Live, state: InstanceState, request: VolumeRequest
) -> InstanceRecord:
    """Attach ``request``'s volume (under the instance's lock, the state checked)."""
    if ctx.volumes is None:
        raise InvalidInstanceSpec("volumes are not enabled on this node")
    resolved = ctx.volumes.claim(request.volume, record.id, request.mount_path, request.readonly)
    volume = AttachedVolume(resolved.id, request.mount_path, request.readonly)
    try:
        problems = volume_problems((*record.volumes, volume))
        if problems:
            raise InvalidInstanceSpec("; ".join(problems), {"problems": problems})
        intent = Intent(IntentKind.ATTACH, now_iso(), volume=volume)
        record = await ctx.save(record.evolve(intent=intent))
        failpoint("attach.recorded")
        if state is InstanceState.RUNNING:
            await _plug(ctx, record, live, volume)
        attached = record.evolve(volumes=(*record.volumes, volume))
        await _write_config(ctx, attached)
        record = await ctx.save(attached.evolve(intent=None))
    except BaseException:
        with anyio.CancelScope(shield=True):
            ctx.volumes.release(volume.volume_id, record.id)
            if record.intent is not None:
                await _write_config(ctx, record)
                record = await ctx.save(record.evolve(intent=None))
        raise
    log.info(
        "attached volume %s at %s", volume.volume_id, volume.mount_path,
        extra={"instance_id": record.id},
    )  # fmt: skip
    ctx.volumes.changed_attachment("volume.attached", volume.volume_id)
    return record


async def detach(
    ctx: Context, record: InstanceRecord, live: Live, state: InstanceState, key: str
) -> InstanceRecord:
    """Detach the volume ``key`` (id or name) names (under the instance's lock)."""
    volume = _attached(ctx, record, key)
    record = await ctx.save(
        record.evolve(intent=Intent(IntentKind.DETACH, now_iso(), volume=volume))
    )
    failpoint("detach.recorded")
    try:
        if state is InstanceState.RUNNING:
            await _unmount(live, volume)
            failpoint("detach.unmounted")
        detached = record.evolve(volumes=tuple(v for v in record.volumes if v != volume))
        await _write_config(ctx, detached)
        if state is InstanceState.RUNNING:
            await _unplug(record, live, volume)
    except BaseException:
        with anyio.CancelScope(shield=True):
            if state is InstanceState.RUNNING:
                # The guest lets go only once the disk is gone: give it back its mount.
                with contextlib.suppress(Exception):
                    await _mount(live, volume)
            await _write_config(ctx, record)
            await ctx.save(record.evolve(intent=None))
        raise
    record = await ctx.save(detached.evolve(intent=None))
    if ctx.volumes is not None:
        ctx.volumes.release(volume.volume_id, record.id)
        ctx.volumes.changed_attachment("volume.detached", volume.volume_id)
    log.info("detached volume %s", volume.volume_id, extra={"instance_id": record.id})
    return record


async def settle(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """Finish or undo an attach or detach a crash cut short (the caller holds the lock)."""
    intent = record.intent
    assert intent is not None
    assert intent.volume is not None
    volume = intent.volume
    running = live.vmm is not None and live.unreachable is None
    if intent.action is IntentKind.ATTACH:
        if running:
            try:
                await _plug(ctx, record, live, volume, SETTLE_AGENT_WAIT_SECONDS)
            except Exception as error:
                log.warning(
                    "could not finish attaching volume %s, undoing it: %s",
                    volume.volume_id, error, extra={"instance_id": record.id},
                )  # fmt: skip
            else:
                attached = record.evolve(volumes=(*record.volumes, volume), intent=None)
                await _write_config(ctx, attached)
                await ctx.save(attached)
                return
        if ctx.volumes is not None:
            ctx.volumes.release(volume.volume_id, record.id)
        await _write_config(ctx, record)
        await ctx.save(record.evolve(intent=None))
        return
    detached = record.evolve(volumes=tuple(v for v in record.volumes if v != volume), intent=None)
    if running:
        try:
            await _unmount(live, volume, SETTLE_AGENT_WAIT_SECONDS)
            await _unplug(record, live, volume)
        except Exception as error:
            log.warning(
                "could not finish detaching volume %s, keeping it: %s",
                volume.volume_id, error, extra={"instance_id": record.id},
            )  # fmt: skip
            with contextlib.suppress(Exception):
                await _mount(live, volume, SETTLE_AGENT_WAIT_SECONDS)
            await _write_config(ctx, record)
            await ctx.save(record.evolve(intent=None))
            return
    await _write_config(ctx, detached)
    await ctx.save(detached)
    if ctx.volumes is not None:
        ctx.volumes.release(volume.volume_id, record.id)


# -- steps ------------------------------------------------------------------------------------
async def _plug(
    ctx: Context,
    record: InstanceRecord,
    live: Live,
    volume: AttachedVolume,
    wait: float = AGENT_WAIT_SECONDS,
) -> None:
    """The disk into the VM and mounted by the guest; on failure, the disk out again."""
    vmm = live.vmm
    assert vmm is not None
    serial = disk_serial(volume.volume_id)
    if serial not in await vmm.disk_ids():
        await vmm.add_disk(ctx.volume_disk(volume.volume_id, volume.readonly))
    failpoint("attach.plugged")
    try:
        await _mount(live, volume, wait)
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await _unplug(record, live, volume)
        raise


async def _unplug(record: InstanceRecord, live: Live, volume: AttachedVolume) -> None:
    vmm = live.vmm
    assert vmm is not None
    with contextlib.suppress(InvalidRequest):  # already gone
        await vmm.remove_disk(disk_serial(volume.volume_id))


async def _mount(live: Live, volume: AttachedVolume, wait: float = AGENT_WAIT_SECONDS) -> None:
    channel = await _channel(live, wait)
    await mount(channel, disk_serial(volume.volume_id), volume.mount_path, readonly=volume.readonly)


async def _unmount(live: Live, volume: AttachedVolume, wait: float = AGENT_WAIT_SECONDS) -> None:
    channel = await _channel(live, wait)
    try:
        await umount(channel, disk_serial(volume.volume_id), volume.mount_path)
    except GuestOperationFailed as error:
        if error.errno == errnos.EBUSY:
            raise VolumeBusy(
                f"files are open under {volume.mount_path} in the guest; close them and detach "
                "again",
                {"volume_id": volume.volume_id, "mount_path": volume.mount_path},
            ) from error
        raise


async def _channel(live: Live, wait: float) -> Channel:
    link = live.agent
    if link is None:
        raise AgentUnavailable("the instance has no channel to its agent")
    return await link.channel(wait)


async def _write_config(ctx: Context, record: InstanceRecord) -> None:
    """The config disk as ``record`` says: what the guest's next boot mounts."""
    image: ImageLike = ctx.images.acquire(record.image.digest)
    try:
        await write_config_disk(
            ctx.paths.instance_config_disk(record.id), guest_config(record, image)
        )
    finally:
        ctx.images.release(record.image.digest)


def _attached(ctx: Context, record: InstanceRecord, key: str) -> AttachedVolume:
    for volume in record.volumes:
        if volume.volume_id == key:
            return volume
    if ctx.volumes is not None:
        with contextlib.suppress(VolumeError):
            volume_id = ctx.volumes.resolve(key)
            for volume in record.volumes:
                if volume.volume_id == volume_id:
                    return volume
    raise VolumeNotAttached(record.id, key)
