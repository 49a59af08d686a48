"""Create and delete: an instance comes into being whole, and goes whole.

Create writes the record, with a ``create`` intent, before its first effect (overlay,
address, TAP, VMM) and clears the intent after its last; delete records its intent before
ending anything. A crash in between leaves a record that says what was under way, and
``recovery.py`` rolls a create back or finishes a delete, so a retry always works.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable

import anyio

from managers.clock import now_iso
from managers.failpoints import failpoint
from managers.guest import (
    GuestConfig,
    NetworkConfig,
    VolumeMount,
    create_overlay_disk,
    write_config_disk,
)
from managers.hypervisors import BackendKind, agent_transport, output_transport
from managers.images.errors import ImageNotFound
from managers.instances.actions import boot
from managers.instances.allocations import boot_demand, held
from managers.instances.context import Context, ImageLike, Live, log
from managers.instances.errors import (
    ImageMissing,
    ImageUnusable,
    InstanceExists,
    InvalidInstanceSpec,
)
from managers.instances.types import (
    AttachedVolume,
    CreateRequest,
    ImageRef,
    InstanceRecord,
    Intent,
    IntentKind,
    NetworkRecord,
    VolumeRequest,
)
from managers.volumes import disk_serial


async def create(ctx: Context, request: CreateRequest, reserve: anyio.Lock) -> InstanceRecord:
    """Make the instance (and boot it when asked); all or nothing."""
    request.check()
    kind = request.hypervisor or ctx.default_hypervisor
    if kind not in ctx.backends:
        raise InvalidInstanceSpec(
            f"hypervisor {kind!r} is not available here", {"available": sorted(ctx.backends)}
        )
    async with reserve:
        _check_name(ctx, request.name)
        instance_id = _new_id(ctx)
        # Reserved now so a concurrent create with the same name fails fast.
        ctx.names[request.name] = instance_id
    try:
        image = _acquire_image(ctx, request.image)
    except BaseException:
        del ctx.names[request.name]
        raise
    try:
        volumes = claim_volumes(ctx, instance_id, request.volumes)
    except BaseException:
        ctx.images.release(image.digest)
        del ctx.names[request.name]
        raise
    record = InstanceRecord(
        id=instance_id,
        name=request.name,
        created_at=now_iso(),
        image=ImageRef(
            name=image.name, digest=image.digest, format=image.format, disk=str(image.disk_path)
        ),
        hypervisor=kind,
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        memory_max_mb=request.memory_max_mb,
        overlay_size_mb=request.overlay_size_mb,
        env=dict(request.env),
        entrypoint=request.entrypoint,
        cmd=request.cmd,
        workdir=request.workdir,
        network=NetworkRecord(enabled=request.network, bandwidth=request.bandwidth),
        intent=Intent(IntentKind.CREATE, now_iso()),
        restart_policy=request.restart_policy,
        keep_on_exit=request.keep_on_exit,
        volumes=volumes,
    )
    live = ctx.live_for(instance_id)
    demand = boot_demand(record) if request.start else held(record, None)
    async with live.lock, contextlib.AsyncExitStack() as admission:
        try:
            # Refused here, for want of room, or for a folder already there (never ours to
            # remove): before anything is made.
            await admission.enter_async_context(ctx.admitted(instance_id, demand))
            await anyio.to_thread.run_sync(ctx.store.create_folder, instance_id)
        except BaseException:
            ctx.images.release(image.digest)
            release_volumes(ctx, record)
            ctx.forget(record)
            raise
        try:
            record = await ctx.save(record)
            failpoint("create.recorded")
            await create_overlay_disk(
                ctx.paths.instance_overlay(instance_id), request.overlay_size_mb << 20
            )
            failpoint("create.overlay")
            if request.network:
                record = await ctx.save(await _allocate(ctx, record))
            await write_config_disk(
                ctx.paths.instance_config_disk(instance_id), guest_config(record, image)
            )
            if request.start:
                await boot(ctx, record, live, tap_failpoint="create.tap")
                failpoint("create.booted")
            record = await ctx.save(record.evolve(intent=None, booted=request.start))
        except BaseException as error:
            # Rolled back under the lock: nothing else can act on a half-made instance.
            log.warning(
                "create of %s failed, rolling back: %s",
                request.name,
                error,
                extra={"instance_id": instance_id},
            )
            with anyio.CancelScope(shield=True):
                await remove(ctx, record, live)
            raise
    log.info(
        "created instance %s (%s) from %s",
        instance_id,
        request.name,
        image.name,
        extra={"instance_id": instance_id},
    )
    return record


async def delete(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """Remove the instance and everything it owns (under its lock)."""
    record = await ctx.save(record.evolve(intent=Intent(IntentKind.DELETE, now_iso())))
    failpoint("delete.recorded")
    await ctx.end_vmm(record.id, live, "the instance was deleted")
    failpoint("delete.vmm_stopped")
    await remove(ctx, record, live)
    log.info("deleted instance %s", record.id)


async def remove(ctx: Context, record: InstanceRecord, live: Live) -> None:
    """End and remove whatever the instance has; every step tolerates what is already gone.

    For a delete, a create rolled back, and recovery finishing either. The folder, record
    included, goes last (renamed to a tombstone in one step), so a crash before that leaves
    the record and its intent for the next start, and a crash after it only the tombstone.
    """
    instance_id = record.id
    network = ctx.network if record.network.enabled else None
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("end the VMM", lambda: ctx.end_vmm(instance_id, live)),
        ("stop following logs", lambda: ctx.pumps.remove(instance_id)),
    ]
    ingresses = ctx.ingresses
    if ingresses is not None:
        # Before the address is released: a forward must never reach its next holder.
        steps.append(("remove its ingresses", lambda: ingresses.instance_removed(instance_id)))
    if network is not None:
        steps += [
            ("remove the TAP", lambda: network.delete_tap(instance_id)),
            ("release the address", lambda: network.release(instance_id)),
        ]
    steps.append(
        ("remove the files", lambda: anyio.to_thread.run_sync(ctx.store.remove, instance_id))
    )
    with anyio.CancelScope(shield=True):
        # Every step is tried whatever the others do; a failed one is reported, not raised, so
        # a create's own error reaches its caller unchanged. What is left (a TAP, a folder) has
        # no record any more and goes at the next start.
        for label, step in steps:
            try:
                await step()
            except Exception as error:
                log.error(
                    "removing instance %s: could not %s: %s",
                    instance_id,
                    label,
                    error,
                    extra={"instance_id": instance_id},
                )
        ctx.images.release(record.image.digest)
        release_volumes(ctx, record)
        ctx.forget(record)


def claim_volumes(
    ctx: Context, instance_id: str, requests: tuple[VolumeRequest, ...]
) -> tuple[AttachedVolume, ...]:
    """Hold every requested volume for the instance, or none of them."""
    if not requests:
        return ()
    if ctx.volumes is None:
        raise InvalidInstanceSpec("volumes are not enabled on this node")
    claimed: list[AttachedVolume] = []
    try:
        for request in requests:
            # The same volume twice is refused by the claim itself (already attached).
            ref = ctx.volumes.claim(
                request.volume, instance_id, request.mount_path, request.readonly
            )
            claimed.append(AttachedVolume(ref.id, request.mount_path, request.readonly))
    except BaseException:
        for volume in claimed:
            ctx.volumes.release(volume.volume_id, instance_id)
        raise
    return tuple(claimed)


def release_volumes(ctx: Context, record: InstanceRecord) -> None:
    """Let go of the instance's volumes; their data stays."""
    if ctx.volumes is None:
        return
    for volume in record.volumes:
        ctx.volumes.release(volume.volume_id, record.id)


def guest_config(record: InstanceRecord, image: ImageLike) -> GuestConfig:
    """What the guest's init applies: the image's config overridden by the request's."""
    config = image.config
    image_entry = tuple(config.entrypoint) if config else ()
    image_cmd = tuple(config.cmd) if config else ()
    if record.entrypoint is not None:
        # As with `docker run --entrypoint`: a new entrypoint drops the image's cmd.
        entrypoint = record.entrypoint
        cmd = record.cmd or ()
    else:
        entrypoint = image_entry
        cmd = record.cmd if record.cmd is not None else image_cmd
    env: dict[str, str] = {}
    for item in config.env if config else ():
        name, _, value = item.partition("=")
        env[name] = value
    env.update(record.env)
    network = record.network
    return GuestConfig(
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        workdir=record.workdir or (config.workdir if config else "") or "",
        user=config.user if config else "",
        hostname=record.name,
        network=NetworkConfig(
            address=network.address or "",
            gateway=network.gateway,
            dns=(network.dns,) if network.dns else (),
            mac=network.mac,
        )
        if network.enabled
        else None,
        agent_transport=agent_transport(BackendKind(record.hypervisor)),
        output_transport=output_transport(BackendKind(record.hypervisor)),
        volumes=tuple(
            VolumeMount(disk_serial(v.volume_id), v.mount_path, v.readonly) for v in record.volumes
        ),
    )


async def _allocate(ctx: Context, record: InstanceRecord) -> InstanceRecord:
    net = await ctx.ensure_network()
    taken = [
        r.network.address
        for r in ctx.records.values()
        if r.network.address is not None and r.id != record.id
    ]
    allocation = await net.allocate(record.id, taken)
    guest = net.guest_network(allocation)
    return record.evolve(
        network=NetworkRecord(
            enabled=True,
            address=str(allocation.address),
            mac=allocation.mac,
            tap=net.tap_name(record.id),
            gateway=str(guest.gateway),
            dns=str(guest.dns),
            bandwidth=record.network.bandwidth,
        )
    )


def _check_name(ctx: Context, name: str) -> None:
    existing = ctx.names.get(name)
    if existing is not None:
        raise InstanceExists(name, existing)
    if name in ctx.records or name in ctx.quarantined:
        # A name equal to an id would make the lookup of that id ambiguous.
        raise InstanceExists(name, name, is_id=True)


def _new_id(ctx: Context) -> str:
    """48 random bits no instance, name or quarantined folder uses; the folder's own mkdir
    refuses the rare id whose folder exists for another reason."""
    while True:
        candidate = secrets.token_hex(6)
        if not (candidate in ctx.records or candidate in ctx.names or candidate in ctx.quarantined):
            return candidate


def _acquire_image(ctx: Context, name: str) -> ImageLike:
    try:
        image = ctx.images.acquire(name)
    except ImageNotFound as error:
        raise ImageMissing(f"no image {name!r} on this node", {"image": name}) from error
    except Exception as error:
        raise ImageUnusable(f"image {name!r} cannot be used: {error}", {"image": name}) from error
    if image.disk_path is None:
        ctx.images.release(image.digest)
        raise ImageUnusable(f"image {name!r} has no disk yet", {"image": name})
    return image
