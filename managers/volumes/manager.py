"""The volume manager: the public surface of the volumes subsystem.

Volumes are block devices that outlive instances: a sparse file with ext4 on it. The
manager makes them (empty, from an image's tree, or from a tar), lists, grows and deletes
them, and keeps the *claims* instances hold on them. Claims live in memory only: the
instance records are where attachments are stored, and the instance manager claims them
again at its start-up, so there is one source of truth on disk and nothing to reconcile.
"""

from __future__ import annotations

import builtins
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import anyio

from managers.clock import now_iso
from managers.failpoints import failpoint
from managers.images.devices import DeviceNode
from managers.images.errors import ImageError, ImageNotFound, ImageNotReady
from managers.paths import Paths
from managers.quarantine import quarantine, quarantined
from managers.volumes import archive, filesystem
from managers.volumes.errors import (
    InvalidVolumeSpec,
    SourceImageMissing,
    SourceImageNotReady,
    VolumeBuildFailed,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
    VolumeQuarantined,
    VolumeTooSmall,
)
from managers.volumes.store import VolumeStore
from managers.volumes.types import (
    ID_RE,
    Attachment,
    CreateVolume,
    SourceKind,
    Volume,
    VolumeIntent,
    VolumeIntentKind,
    VolumeRecord,
    VolumeRef,
    VolumeSource,
    check_name_and_size,
    size_problems,
)

log = logging.getLogger("managers.volumes")

# How much larger than the volume an import's archive may be: tar headers and padding.
_ARCHIVE_SLACK = 1 << 20


class ImageDisk(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def disk_path(self) -> Path | None: ...


class ImageDisks(Protocol):
    """What volumes need of the images subsystem: a ready image, held while its tree is
    unpacked (device nodes as placeholders: they never exist on the host)."""

    def acquire(self, name_or_digest: str) -> ImageDisk: ...

    def release(self, digest: str) -> None: ...

    async def unpack(self, name_or_digest: str, tree: Path) -> list[DeviceNode]: ...


# Told of every change after it happened: ("volume.created", the volume as it then reads).
ChangeCallback = Callable[[str, Volume], None]


class VolumeManager:
    """The node's volumes: create, import, list, get, resize, delete; and instances' claims."""

    def __init__(
        self,
        paths: Paths,
        *,
        images: ImageDisks | None = None,
        on_change: ChangeCallback | None = None,
    ) -> None:
        self._paths = paths
        self._images = images
        self._on_change = on_change
        self._store = VolumeStore(paths)
        self._records: dict[str, VolumeRecord] = {}
        self._names: dict[str, str] = {}  # name -> id, reserved from the start of a create
        self._quarantined: dict[str, tuple[str, str]] = {}  # id -> (path, reason)
        self._claims: dict[str, dict[str, Attachment]] = {}  # volume id -> instance id -> use
        self._busy: dict[str, str] = {}  # volume id -> what is changing it (resize, delete)
        self._locks: dict[str, anyio.Lock] = {}

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> VolumeManager:
        """Load every volume; finish a resize a crash cut short; quarantine what cannot be read."""
        scan = await anyio.to_thread.run_sync(self._store.scan)
        for leftover in scan.leftovers:
            log.info("removed volume folder %s, left by a crash", leftover)
        for name, reason in scan.unreadable.items():
            folder = self._paths.volume_dir(name)
            try:
                moved = await anyio.to_thread.run_sync(
                    quarantine, self._paths, "volumes", folder, reason
                )
                log.warning("quarantined volume %s to %s: %s", name, moved, reason)
            except OSError as error:
                log.error("could not quarantine volume folder %s (%s): %s", folder, reason, error)
        for item in await anyio.to_thread.run_sync(quarantined, self._paths, "volumes"):
            self._quarantined[item.name] = (str(item.path), item.reason)
        for record in scan.records:
            self._records[record.id] = record
            self._names[record.name] = record.id
        for record in scan.records:
            if record.intent is not None:
                log.warning("finishing the resize of volume %s cut short by a crash", record.id)
                try:
                    await self._grow(record, record.intent.size_mb)
                except Exception as error:
                    # The data is still there at one size or the other; a retry settles it.
                    log.error("could not finish resizing volume %s: %s", record.id, error)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Nothing runs in the background; present so the manager is used like the others."""

    # -- queries --------------------------------------------------------------------------
    async def list(self) -> builtins.list[Volume]:
        """Every volume, oldest first."""
        records = sorted(self._records.values(), key=lambda r: (r.created_at, r.id))
        return [self._view(record) for record in records]

    async def get(self, key: str) -> Volume:
        """One volume by id or name."""
        return self._view(self._records[self._resolve(key)])

    def data_path(self, volume_id: str) -> Path:
        """The volume's disk file."""
        return self._paths.volume_data(volume_id)

    # -- create ---------------------------------------------------------------------------
    async def create(self, request: CreateVolume) -> Volume:
        """An empty volume, or one filled from an image's tree (``request.source_image``)."""
        request.check()
        if request.source_image is None:
            return await self._build(request.name, request.size_mb, VolumeSource(), None)
        images = self._images
        if images is None:
            raise InvalidVolumeSpec("this node cannot fill volumes from images")
        try:
            image = images.acquire(request.source_image)
        except ImageNotFound as error:
            raise SourceImageMissing(request.source_image) from error
        except ImageNotReady as error:
            raise SourceImageNotReady(request.source_image, error.message) from error
        try:
            if image.disk_path is None:
                raise SourceImageNotReady(request.source_image, "it has no disk yet")
            source = VolumeSource(SourceKind.IMAGE, image.name, image.digest, request.source_path)

            async def fill(tree: Path) -> tuple[Path, list[DeviceNode]]:
                try:
                    devices = await images.unpack(image.digest, tree)
                except ImageError as error:
                    # The image built from these very layers: whatever fails now is ours.
                    raise VolumeBuildFailed(f"unpacking {image.name}: {error.message}") from error
                root = await anyio.to_thread.run_sync(_subtree, tree, request.source_path)
                return root, _devices_under(tree, root, devices)

            return await self._build(request.name, request.size_mb, source, fill)
        finally:
            images.release(image.digest)

    async def import_archive(self, name: str, size_mb: int, chunks: AsyncIterable[bytes]) -> Volume:
        """A volume holding the tree of a streamed tar (plain, gzip, xz or bzip2)."""
        problems = check_name_and_size(name, size_mb)
        if problems:
            raise InvalidVolumeSpec("; ".join(problems), {"problems": problems})
        limit = size_mb << 20

        async def fill(tree: Path) -> tuple[Path, list[DeviceNode]]:
            spool = tree.parent / "archive.tar"
            received = 0
            with open(spool, "wb") as out:  # noqa: ASYNC230 (written chunk by chunk in a thread)
                async for chunk in chunks:
                    received += len(chunk)
                    if received > limit + _ARCHIVE_SLACK:
                        raise VolumeTooSmall(size_mb, detail="the archive is larger")
                    await anyio.to_thread.run_sync(out.write, chunk)
            stop = threading.Event()
            try:
                await anyio.to_thread.run_sync(
                    archive.unpack, spool, tree, limit, size_mb, stop, abandon_on_cancel=False
                )
            finally:
                stop.set()
                await anyio.to_thread.run_sync(spool.unlink, True)
            return tree, []  # an archive's device nodes are refused

        return await self._build(name, size_mb, VolumeSource(SourceKind.ARCHIVE), fill)

    async def _build(
        self,
        name: str,
        size_mb: int,
        source: VolumeSource,
        fill: Callable[[Path], Awaitable[tuple[Path, builtins.list[DeviceNode]]]] | None,
    ) -> Volume:
        volume_id = self._reserve(name)
        record = VolumeRecord(
            id=volume_id, name=name, size_mb=size_mb, created_at=now_iso(), source=source
        )
        staging: Path | None = None
        scratch: Path | None = None
        try:
            await anyio.to_thread.run_sync(filesystem.check_room, self._store.root, size_mb << 20)
            staging = await anyio.to_thread.run_sync(self._store.staging, volume_id)
            data = staging / "data.raw"
            await anyio.to_thread.run_sync(filesystem.make_sparse, data, size_mb << 20)
            if fill is None:
                await filesystem.format_empty(data)
            else:
                scratch = await anyio.to_thread.run_sync(self._store.scratch, volume_id)
                tree = scratch / "tree"
                await anyio.to_thread.run_sync(tree.mkdir, 0o700)
                tree, devices = await fill(tree)
                await filesystem.format_from_tree(data, tree, size_mb, devices)
            failpoint("volume.formatted")
            await anyio.to_thread.run_sync(self._store.commit, staging, record)
            staging = None
            failpoint("volume.committed")
        except BaseException:
            del self._names[name]
            raise
        finally:
            with anyio.CancelScope(shield=True):
                for leftover in (scratch, staging):
                    if leftover is not None:
                        await anyio.to_thread.run_sync(filesystem.remove_tree, leftover)
        self._records[volume_id] = record
        volume = self._view(record)
        log.info("created volume %s (%s, %d MB, %s)", volume_id, name, size_mb, source.kind)
        self._changed("volume.created", volume)
        return volume

    # -- change ---------------------------------------------------------------------------
    async def resize(self, key: str, size_mb: int) -> Volume:
        """Grow a detached volume to ``size_mb`` (never shrink)."""
        volume_id = self._resolve(key)
        problems = size_problems(size_mb)
        if problems:
            raise InvalidVolumeSpec("; ".join(problems), {"problems": problems})
        async with self._lock(volume_id):
            record = self._records[volume_id]
            if size_mb < record.size_mb:
                raise InvalidVolumeSpec(
                    f"volume {volume_id} is {record.size_mb} MB; shrinking is refused",
                    {"id": volume_id, "size_mb": record.size_mb},
                )
            if size_mb == record.size_mb:
                return self._view(record)
            self._hold(volume_id, "resize")
            try:
                grown = (size_mb - record.size_mb) << 20
                await anyio.to_thread.run_sync(filesystem.check_room, self._store.root, grown)
                record = await self._grow(record, size_mb)
            finally:
                self._busy.pop(volume_id, None)
        volume = self._view(record)
        self._changed("volume.resized", volume)
        return volume

    async def _grow(self, record: VolumeRecord, size_mb: int) -> VolumeRecord:
        intent = VolumeIntent(VolumeIntentKind.RESIZE, now_iso(), size_mb)
        record = await self._save(record.evolve(intent=intent))
        failpoint("volume.resizing")
        with anyio.CancelScope(shield=True):
            await filesystem.grow(self.data_path(record.id), size_mb)
            record = await self._save(record.evolve(size_mb=size_mb, intent=None))
        return record

    async def delete(self, key: str) -> None:
        """Remove a volume that no instance uses, with its data."""
        volume_id = self._resolve(key)
        async with self._lock(volume_id):
            record = self._records.get(volume_id)
            if record is None:
                raise VolumeNotFound(key)
            self._hold(volume_id, "delete")
            try:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._store.remove, volume_id)
            finally:
                self._busy.pop(volume_id, None)
            del self._records[volume_id]
            self._names.pop(record.name, None)
            self._locks.pop(volume_id, None)
        log.info("deleted volume %s (%s)", volume_id, record.name)
        self._changed("volume.deleted", Volume(record))

    # -- claims by instances ----------------------------------------------------------------
    def claim(self, key: str, instance_id: str, mount_path: str, readonly: bool) -> VolumeRef:
        """Hold volume ``key`` for an instance; refused when the rules of sharing forbid it.

        A read-write attachment is the volume's only one; read-only ones share it. Held
        until :meth:`release`, and in memory only (see the module's docstring).
        """
        volume_id = self._resolve(key)
        record = self._records[volume_id]
        busy = self._busy.get(volume_id)
        if busy is not None:
            raise VolumeInUse(
                f"volume {volume_id} is being changed ({busy}); try again when it is done",
                {"id": volume_id},
            )
        holders = self._claims.get(volume_id, {})
        if instance_id in holders:
            raise VolumeInUse(
                f"volume {volume_id} is already attached to instance {instance_id}",
                {"id": volume_id, "instance_id": instance_id},
            )
        writers = [use.instance_id for use in holders.values() if not use.readonly]
        if writers or (holders and not readonly):
            raise VolumeInUse(
                f"volume {volume_id} is attached read-write to {writers[0]}"
                if writers
                else f"volume {volume_id} is attached read-only elsewhere; a read-write "
                "attachment must be its only one",
                {"id": volume_id, "attached_to": sorted(holders)},
            )
        self._claims.setdefault(volume_id, {})[instance_id] = Attachment(
            instance_id, mount_path, readonly
        )
        return VolumeRef(volume_id, record.name, readonly)

    def adopt(self, volume_id: str, instance_id: str, mount_path: str, readonly: bool) -> bool:
        """Re-take a claim an instance record holds (start-up); False if the volume is gone."""
        if volume_id not in self._records:
            return False
        self._claims.setdefault(volume_id, {})[instance_id] = Attachment(
            instance_id, mount_path, readonly
        )
        return True

    def release(self, volume_id: str, instance_id: str) -> None:
        """Drop an instance's claim; releasing one not held does nothing."""
        holders = self._claims.get(volume_id)
        if holders is not None:
            holders.pop(instance_id, None)
            if not holders:
                del self._claims[volume_id]

    def resolve(self, key: str) -> str:
        """The id of the volume ``key`` (an id or a name) names."""
        return self._resolve(key)

    def changed_attachment(self, kind: str, volume_id: str) -> None:
        """Report that an attachment came or went (``volume.attached``/``volume.detached``)."""
        record = self._records.get(volume_id)
        if record is not None:
            self._changed(kind, self._view(record))

    # -- internals ------------------------------------------------------------------------
    def _resolve(self, key: str) -> str:
        if key in self._records:
            return key
        volume_id = self._names.get(key)
        if volume_id is not None and volume_id in self._records:
            return volume_id
        quarantined_as = self._quarantined.get(key)
        if quarantined_as is not None:
            raise VolumeQuarantined(key, *quarantined_as)
        raise VolumeNotFound(key)

    def _reserve(self, name: str) -> str:
        existing = self._names.get(name)
        if existing is None and name in self._records:
            existing = name
        if existing is not None:
            raise VolumeExists(name, existing)
        while True:
            volume_id = secrets.token_hex(6)
            taken = volume_id in self._records or volume_id in self._quarantined
            if not taken and volume_id not in self._names and ID_RE.fullmatch(volume_id):
                break
        self._names[name] = volume_id
        return volume_id

    def _hold(self, volume_id: str, what: str) -> None:
        holders = self._claims.get(volume_id)
        if holders:
            raise VolumeInUse(
                f"volume {volume_id} is attached to {', '.join(sorted(holders))}; detach it first",
                {"id": volume_id, "attached_to": sorted(holders)},
            )
        self._busy[volume_id] = what

    def _lock(self, volume_id: str) -> anyio.Lock:
        return self._locks.setdefault(volume_id, anyio.Lock())

    async def _save(self, record: VolumeRecord) -> VolumeRecord:
        await anyio.to_thread.run_sync(self._store.save, record)
        self._records[record.id] = record
        return record

    def _view(self, record: VolumeRecord) -> Volume:
        holders = self._claims.get(record.id, {})
        return Volume(record, tuple(sorted(holders.values(), key=lambda a: a.instance_id)))

    def _changed(self, kind: str, volume: Volume) -> None:
        if self._on_change is not None:
            self._on_change(kind, volume)


def _devices_under(tree: Path, root: Path, devices: list[DeviceNode]) -> list[DeviceNode]:
    """The device nodes inside ``root`` (a folder of ``tree``), named relative to it."""
    prefix = root.relative_to(tree).as_posix()
    if prefix == ".":
        return devices
    return [
        replace(node, rel=node.rel[len(prefix) + 1 :])
        for node in devices
        if node.rel.startswith(prefix + "/")
    ]


def _subtree(tree: Path, path: str) -> Path:
    """``path`` inside ``tree``, every step a real folder (no symlink is followed)."""
    current = tree
    for part in (p for p in path.split("/") if p not in ("", ".")):
        current = current / part
        try:
            is_dir = os.path.isdir(current) and not os.path.islink(current)
        except OSError:
            is_dir = False
        if not is_dir:
            raise InvalidVolumeSpec(
                f"source.path {path!r} is not a folder in the image", {"path": path}
            )
    return current
