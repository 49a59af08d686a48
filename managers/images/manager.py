"""The image manager: requests, the build queue, the cache and start-up recovery.

A build moves an image pending -> pulling -> unpacking -> converting -> ready | failed. Work that
blocks (HTTP through the synchronous oras SDK, unpacking, hashing) runs in worker threads that
watch a stop flag, so cancelling a build (close, delete) ends it within one chunk or tar entry.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc

from ..clock import now_iso
from ..failpoints import failpoint
from ..paths import Paths
from . import disk, references
from .archive import ingest_archive
from .devices import DeviceNode
from .errors import (
    BuildFailed,
    FormatConflict,
    ImageError,
    ImageInUse,
    ImageNotFound,
    ImageNotReady,
    InvalidArchive,
    InvalidFormat,
    RegistryError,
    RegistryUnreachable,
    StorageFull,
)
from .layout import OciLayout
from .manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    ImageManifest,
    load_json,
    media_type_of,
    parse_config,
    select_platform,
    to_oci_manifest,
)
from .reference import Reference, is_digest, parse_reference
from .references import References
from .registry import RegistryClient
from .registry_threads import RegistryThreads
from .scratch import DEFAULT_SCRATCH, Scratch, unpacked_estimate
from .store import Record, RecordStore
from .types import (
    DISK_FORMATS,
    PROGRESS_INTERVAL,
    BuildObserver,
    DiskFormat,
    Image,
    ImageStatus,
    Progress,
)
from .unpack import Unpacker

T = TypeVar("T")
_log = logging.getLogger(__name__)

_DOWNLOADS_PER_BUILD = 4
_BLOB_READ_TIMEOUT = 60.0
_MAX_ARCHIVE_BYTES = 64 << 30
#: What an image may unpack to unless ``IMAGE_MAX_UNPACKED_BYTES`` says otherwise.
DEFAULT_MAX_UNPACKED_BYTES = 64 << 30


def _default_docker_config() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


class _Counter:
    """Bytes done, bumped from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        """Add ``n`` bytes to the count (thread-safe)."""
        with self._lock:
            self.value += n


async def _run_stoppable(
    work: Callable[[threading.Event], T],
    run: Callable[[Callable[[], None], threading.Event], Awaitable[None]] | None = None,
) -> T:
    """Run ``work(stop)`` in a thread (through ``run``, given the runner: a registry thread);
    on cancellation set ``stop`` and wait for it to return."""
    stop = threading.Event()
    finished = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def runner() -> None:
        try:
            outcome.append(work(stop))
        except BaseException as exc:
            failure.append(exc)
        finally:
            finished.set()

    try:
        if run is None:
            await anyio.to_thread.run_sync(runner, abandon_on_cancel=True)
        else:
            await run(runner, stop)
    except anyio.get_cancelled_exc_class():
        stop.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait)
        raise
    if failure:
        raise failure[0]
    return outcome[0]


@dataclass
class _Entry:
    record: Record
    changed: anyio.Event = field(default_factory=anyio.Event)
    refs: int = 0
    scope: anyio.CancelScope | None = None
    idle: anyio.Event = field(default_factory=anyio.Event)

    @property
    def building(self) -> bool:
        """A build may still add blobs; a build that reached ready/failed is merely unwinding."""
        return self.scope is not None and not self.record.image.status.terminal

    @property
    def image(self) -> Image:
        """The public image of this entry's record."""
        return self.record.image


@dataclass(frozen=True, slots=True)
class _Resolved:
    digest: str
    top: bytes
    platform_digest: str
    platform: bytes


class ImageManager:
    """Pulls images, builds their disks, and keeps them while they are used or fresh."""

    def __init__(
        self,
        paths: Paths,
        *,
        max_concurrent_builds: int = 2,
        cache_seconds: int | None = None,
        insecure_registries: frozenset[str] = frozenset(),
        docker_config: Path | None = None,
        resolve_timeout: float = 5.0,
        scratch_dir: Path | None = DEFAULT_SCRATCH,
        on_change: Callable[[str, Image], None] | None = None,
        observer: BuildObserver | None = None,
        max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    ) -> None:
        if max_concurrent_builds < 1:
            raise ValueError("max_concurrent_builds must be at least 1")
        self._paths = paths
        self._layout = OciLayout(paths.oci_layout, paths.tmp / "blobs")
        self._store = RecordStore(paths)
        # A record write and the removal of its folder never overlap: a save that ran while a
        # delete removed the folder would recreate it, and the image would be back at restart.
        self._store_lock = anyio.Lock()
        self._max_unpacked_bytes = max_unpacked_bytes
        self._cache_seconds = cache_seconds
        self._insecure = frozenset(insecure_registries)
        self._docker_config = docker_config if docker_config else _default_docker_config()
        self._resolve_timeout = resolve_timeout
        self._slots = anyio.Semaphore(max_concurrent_builds)
        self._chain_locks: dict[str, anyio.Lock] = {}
        self._registry_threads = RegistryThreads()
        self._scratch = Scratch(scratch_dir, paths.root, paths.tmp)
        self._entries: dict[str, _Entry] = {}
        self._tags: dict[str, str] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._lock = anyio.Lock()
        self._adding = 0  # requests/imports putting blobs in the layout before their record exists
        self._opaque_noted: frozenset[Path] = frozenset()  # opaque records already logged
        # Told ("image.ready", the image) after a change happened; the edge makes events of these.
        self._on_change = on_change
        self._observer = observer

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> ImageManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Recover after a crash: drop temporaries, resume interrupted builds, then serve.

        ``start`` and ``close`` must be awaited from the same task (they hold a task group).
        """
        records, tags = await anyio.to_thread.run_sync(self._recover_from_disk)
        for record in records:
            self._entries[record.image.digest] = _Entry(record)
        self._tags = {n: d for n, d in tags.items() if d in self._entries}
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for entry in list(self._entries.values()):
            image = entry.image
            if image.status == ImageStatus.READY and not (
                image.disk_path and image.disk_path.is_file()
            ):
                await self._set(entry, status=ImageStatus.FAILED, error="disk file missing")
            elif not image.status.terminal:
                await self._set(entry, status=ImageStatus.PENDING, progress=Progress())
                self._schedule(entry)
        if self._cache_seconds is not None:
            self._tg.start_soon(self._sweeper)

    def _recover_from_disk(self) -> tuple[list[Record], dict[str, str]]:
        self._paths.ensure()
        for entry in self._paths.tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self._layout.ensure()
        self._scratch.remove_leftovers()
        return self._store.load_all(), self._store.load_tags()

    async def close(self) -> None:
        """Cancel running builds; their records stay non-terminal, so the next start resumes."""
        if self._tg is None:
            return
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            self._tg = None
            self._scratch.close()

    # -- queries ---------------------------------------------------------------
    def _named(self, name_or_digest: str) -> tuple[_Entry, str]:
        """The entry a name or digest denotes, and the name to show it under: the name as
        asked (normalised), or for a bare digest the first of its names."""
        entry = self._lookup(name_or_digest)
        if is_digest(name_or_digest):
            return entry, self._names(entry)[0]
        return entry, parse_reference(name_or_digest).name

    def _view(self, entry: _Entry, name: str) -> Image:
        """The entry's image as seen under ``name``: every name of a digest is the same image,
        one disk."""
        return entry.image if name == entry.image.name else replace(entry.image, name=name)

    def _names(self, entry: _Entry) -> builtins.list[str]:
        """Every name of an image: the names that point at its digest, else (its name moved on
        to another digest, or it was pulled by digest) ``repository@digest``."""
        digest = entry.image.digest
        names = sorted(name for name, d in self._tags.items() if d == digest)
        if names or is_digest(entry.image.name):  # an imported image is named by its digest
            return names or [entry.image.name]
        ref = parse_reference(entry.image.name)
        return [Reference(ref.registry, ref.repository, None, digest).name]

    def _lookup(self, name_or_digest: str) -> _Entry:
        if is_digest(name_or_digest):
            entry = self._entries.get(name_or_digest)
        else:
            try:
                name = parse_reference(name_or_digest).name
            except ImageError as exc:
                raise ImageNotFound(f"no image named {name_or_digest!r}") from exc
            digest = self._tags.get(name)
            if digest is None and "@" in name:
                digest = name.rsplit("@", 1)[1]
            entry = self._entries.get(digest) if digest else None
        if entry is None:
            raise ImageNotFound(f"no image {name_or_digest!r}")
        return entry

    async def get(self, name_or_digest: str) -> Image:
        """The image a name or digest denotes, under that name; :class:`ImageNotFound` when
        there is none."""
        return self._view(*self._named(name_or_digest))

    async def list(self) -> builtins.list[Image]:
        """Every image this node knows under each of its names, oldest first (by
        ``created_at``, then name)."""
        views = [self._view(e, name) for e in self._entries.values() for name in self._names(e)]
        return sorted(views, key=lambda i: (i.created_at, i.name))

    async def subscribe(self, name_or_digest: str) -> AsyncIterator[Image]:
        """Snapshots of one image, first the current one, until it is ready or failed.

        Raises :class:`ImageNotFound` at the first iteration for an unknown image. Snapshots are
        coalesced: a slow reader sees the latest state, never a backlog.
        """
        entry, name = self._named(name_or_digest)
        while True:
            changed = entry.changed
            image = self._view(entry, name)
            yield image
            if image.status.terminal:
                return
            await changed.wait()

    # -- use by instances ------------------------------------------------------
    def acquire(self, name_or_digest: str) -> Image:
        """Mark a ready image in use (never evicted nor deleted until released); it is
        returned under the name asked for."""
        entry, name = self._named(name_or_digest)
        if entry.image.status != ImageStatus.READY:
            raise ImageNotReady(f"image {name} is {entry.image.status}")
        entry.refs += 1
        entry.record = replace(entry.record, last_used=time.time())
        return self._view(entry, name)

    def release(self, digest: str) -> None:
        """Undo one :meth:`acquire` of ``digest``; an unknown or unheld digest is ignored."""
        entry = self._entries.get(digest)
        if entry is None or entry.refs == 0:
            return
        entry.refs -= 1
        entry.record = replace(entry.record, last_used=time.time())
        if entry.refs == 0 and self._tg is not None:
            self._tg.start_soon(self._save, entry.record)

    async def unpack(self, name_or_digest: str, tree: Path) -> builtins.list[DeviceNode]:
        """Unpack a ready image's layers into the empty folder ``tree``; its device nodes as
        placeholders (``devices.py``). The caller holds the image (:meth:`acquire`)."""
        entry = self._lookup(name_or_digest)
        if entry.image.status != ImageStatus.READY:
            raise ImageNotReady(f"image {entry.image.name} is {entry.image.status}")
        layers = self._layer_files(await self._platform_manifest(entry.record))

        def work(stop: threading.Event) -> builtins.list[DeviceNode]:
            unpacker = Unpacker(tree, stop, max_bytes=self._max_unpacked_bytes)
            for path, compression in layers:
                unpacker.apply(path, compression, lambda _n: None)
            return unpacker.finish()

        return await _run_stoppable(work)

    @contextlib.asynccontextmanager
    async def use(self, name_or_digest: str) -> AsyncIterator[Image]:
        """Hold a ready image (:meth:`acquire`) for the duration of the ``async with`` block."""
        image = self.acquire(name_or_digest)
        try:
            yield image
        finally:
            self.release(image.digest)

    # -- requests --------------------------------------------------------------
    async def request(self, name: str, fmt: DiskFormat = "erofs") -> Image:
        """Resolve ``name`` to a digest (short timeout) and queue its build; return at once."""
        _check_format(fmt)
        ref = parse_reference(name)
        known = self._entries.get(ref.digest) if ref.digest else None
        if known is not None and known.image.status != ImageStatus.FAILED:
            return await self._reuse(known, ref.name, fmt)
        try:
            resolved = await self._registry_threads.run(ref.api_host, partial(self._resolve, ref))
        except RegistryUnreachable:
            # Offline node, image already here: serve what we have rather than fail.
            digest = self._tags.get(ref.name)
            cached = self._entries.get(digest) if digest else None
            if cached is not None and cached.image.status == ImageStatus.READY:
                return await self._reuse(cached, ref.name, fmt)
            raise
        async with self._lock, self._adding_blobs():
            entry = self._entries.get(resolved.digest)
            if entry is not None and entry.image.status != ImageStatus.FAILED:
                return await self._reuse(entry, ref.name, fmt)
            await anyio.to_thread.run_sync(self._store_manifests, resolved)
            return await self._queue(
                ref.name, resolved.digest, resolved.platform_digest, fmt, "registry"
            )

    async def import_archive(
        self, stream: AsyncIterator[bytes], fmt: DiskFormat = "erofs"
    ) -> Image:
        """Receive an OCI image archive, validate it fully, then queue its build."""
        _check_format(fmt)
        work = self._paths.tmp / f"import-{uuid.uuid4().hex}"
        await anyio.to_thread.run_sync(lambda: work.mkdir(parents=True))
        async with self._adding_blobs():
            return await self._import(stream, fmt, work)

    @contextlib.asynccontextmanager
    async def _adding_blobs(self) -> AsyncIterator[None]:
        """Blobs go into the layout before a record references them: no collection meanwhile."""
        self._adding += 1
        try:
            yield
        finally:
            self._adding -= 1

    async def _import(self, stream: AsyncIterator[bytes], fmt: DiskFormat, work: Path) -> Image:
        try:
            archive = work / "archive.tar"
            received = 0
            try:
                async with await anyio.open_file(archive, "wb") as out:
                    async for chunk in stream:
                        received += len(chunk)
                        if received > _MAX_ARCHIVE_BYTES:
                            raise InvalidArchive("archive larger than 64 GiB")
                        await out.write(chunk)
                if received == 0:
                    raise InvalidArchive("empty archive")
                imported = await anyio.to_thread.run_sync(
                    ingest_archive, archive, self._layout, work / "staging"
                )
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise StorageFull(
                        f"no room left under {self._paths.root} for the archive "
                        f"({received} bytes received)",
                        {"received_bytes": received},
                    ) from error
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
        name = imported.name or imported.digest
        async with self._lock:
            entry = self._entries.get(imported.digest)
            if entry is not None and entry.image.status != ImageStatus.FAILED:
                return await self._reuse(entry, name, fmt)
            return await self._queue(
                name, imported.digest, imported.platform_manifest, fmt, "archive"
            )

    async def _reuse(self, entry: _Entry, name: str, fmt: DiskFormat) -> Image:
        if entry.image.format != fmt:
            raise FormatConflict(
                f"image {entry.image.digest} is already built as {entry.image.format}; "
                f"delete it to rebuild as {fmt}"
            )
        await self._tag(name, entry.image.digest)
        entry.record = replace(entry.record, last_used=time.time())
        return self._view(entry, name)

    async def _tag(self, name: str, digest: str) -> None:
        if name == digest or self._tags.get(name) == digest:
            return
        self._tags[name] = digest
        await anyio.to_thread.run_sync(self._store.set_tag, name, digest)

    async def _queue(
        self, name: str, digest: str, platform_digest: str, fmt: DiskFormat, source: str
    ) -> Image:
        now = now_iso()
        previous = self._entries.get(digest)
        if previous is not None and previous.scope is not None:
            await previous.idle.wait()  # the failed build is still unwinding
        created = previous.image.created_at if previous else now
        image = Image(
            name=name,
            digest=digest,
            status=ImageStatus.PENDING,
            format=fmt,
            created_at=created,
            updated_at=now,
        )
        record = Record(
            image=image, source=source, platform_manifest=platform_digest, last_used=time.time()
        )
        await self._save(record)
        if previous is not None:
            previous.record = record
            entry = previous
            self._notify(entry)
        else:
            entry = self._entries[digest] = _Entry(record)
        await self._tag(name, digest)
        self._schedule(entry)
        return entry.image

    # -- registry --------------------------------------------------------------
    def _client(self, ref: Reference, read_timeout: float) -> RegistryClient:
        return RegistryClient(
            ref,
            insecure=ref.registry in self._insecure,
            docker_config=self._docker_config,
            connect_timeout=self._resolve_timeout,
            read_timeout=read_timeout,
        )

    def _resolve(self, ref: Reference) -> _Resolved:
        """Manifest (and, for an index, the host platform's manifest), verified; in a thread."""
        client = self._client(ref, self._resolve_timeout)
        top = client.fetch_manifest(ref.target)
        document = load_json(top.data, "manifest")
        kind = media_type_of(document, top.media_type)
        if kind in INDEX_TYPES:
            chosen = select_platform(document)
            platform = client.fetch_manifest(chosen.digest, chosen.digest)
            return _Resolved(top.digest, top.data, platform.digest, platform.data)
        if kind not in MANIFEST_TYPES:
            raise RegistryError(f"{ref.name}: unsupported manifest type {kind!r}")
        return _Resolved(top.digest, top.data, top.digest, top.data)

    def _store_manifests(self, resolved: _Resolved) -> None:
        self._layout.put_bytes(resolved.digest, resolved.top)
        self._layout.put_bytes(resolved.platform_digest, resolved.platform)

    # -- builds ------------------------------------------------------------------
    def _schedule(self, entry: _Entry) -> None:
        assert self._tg is not None, "ImageManager.start() was not awaited"
        scope, idle = anyio.CancelScope(), anyio.Event()
        entry.scope, entry.idle = scope, idle
        self._tg.start_soon(self._build_task, entry, scope, idle)

    async def _build_task(self, entry: _Entry, scope: anyio.CancelScope, idle: anyio.Event) -> None:
        try:
            with scope:
                async with self._slots:
                    await self._build(entry)
        except Exception as exc:
            # A bug must fail one image, never the manager's task group and every other build.
            _log.exception("image build crashed")
            await self._fail(
                entry, f"internal error: {type(exc).__name__}: {exc}", "internal_error"
            )
        finally:
            if entry.scope is scope:  # a retry may already have scheduled the next build
                entry.scope = None
            idle.set()

    async def _build(self, entry: _Entry) -> None:
        digest = entry.image.digest
        trees: builtins.list[Path] = []
        dest = self._paths.image_disk(digest, entry.image.format)
        reason: str | None = None
        code = "build_failed"
        started = time.monotonic()
        try:
            manifest, pulled = await self._fetch_content(entry)
            pull_seconds = time.monotonic() - started
            failpoint("image.pulled")
            layers = [layer.descriptor.digest for layer in manifest.layers]
            chain = disk.chain_id(layers, entry.image.format)
            # One build per chain at a time: a second image of the same layers waits, then
            # takes the first one's disk.
            async with self._chain_lock(chain):
                linked = await self._link_shared(chain, digest, dest)
                if linked is not None:
                    size = linked
                else:
                    tree, devices = await self._unpack(entry, manifest, trees)
                    failpoint("image.unpacked")
                    await self._set(
                        entry, status=ImageStatus.CONVERTING, progress=Progress("converting")
                    )
                    size = await disk.build_disk(tree, dest, entry.image.format, devices)
                # Inside the lock: the next build of this chain finds this disk, ready or not.
                entry.record = replace(entry.record, chain=chain)
            # The disk is complete under its final name; the record does not say ready yet.
            failpoint("image.disk_written")
        except ImageError as exc:
            reason, code = str(exc), exc.code
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            reason = f"{'disk full' if full else 'I/O error'}: {exc}"
            code = "disk_full" if full else "io_error"
        finally:
            # Before the final status: whoever sees ready/failed sees no temporaries either.
            with anyio.CancelScope(shield=True):
                for tree in trees:
                    await anyio.to_thread.run_sync(_remove_tree, tree)
        if reason is not None:
            await self._fail(entry, reason, code)
            return
        entry.record = replace(entry.record, last_used=time.time())
        await self._set(
            entry,
            status=ImageStatus.READY,
            progress=Progress("ready", size, size),
            disk_path=dest,
            size=size,
        )
        if self._observer is not None:
            self._observer.build_finished(pull_seconds, pulled, time.monotonic() - started)

    @contextlib.asynccontextmanager
    async def _chain_lock(self, chain: str) -> AsyncIterator[None]:
        lock = self._chain_locks.setdefault(chain, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._chain_locks.pop(chain, None)

    async def _link_shared(self, chain: str, digest: str, dest: Path) -> int | None:
        """Make ``dest`` a name of another image's disk of the same layer chain (and so
        format); its size, or None when there is none to share.

        A disk under its final name is complete, whether its image reads ready yet or not. A
        disk removed meanwhile (its image deleted or evicted, which do not take the chain's
        lock) is passed over."""
        candidates = [
            self._paths.image_disk(other.image.digest, other.image.format)
            for other in self._entries.values()
            if other.image.digest != digest
            and other.record.chain == chain
            and other.image.status != ImageStatus.FAILED
        ]
        for shared in candidates:
            try:
                return await anyio.to_thread.run_sync(disk.link_disk, shared, dest)
            except FileNotFoundError:
                continue
        return None

    async def _fail(self, entry: _Entry, reason: str, code: str) -> None:
        if self._observer is not None:
            self._observer.build_failed(code)
        with anyio.CancelScope(shield=True):
            dest = self._paths.image_disk(entry.image.digest, entry.image.format)
            if await anyio.to_thread.run_sync(dest.exists):
                # Normally this build's own output; but a disk an instance record names
                # (the image was ready once, then quarantined and rebuilt) stays.
                keep = self._still_needed(entry, await self._references(), automatic=True)
                if keep is None:
                    await anyio.to_thread.run_sync(lambda: dest.unlink(missing_ok=True))
                else:
                    _log.warning(
                        "failed build of %s keeps its disk %s: %s", entry.image.digest, dest, keep
                    )
            await self._set(entry, status=ImageStatus.FAILED, error=reason, disk_path=None)

    async def _platform_manifest(self, record: Record) -> ImageManifest:
        """The image's manifest for this host's platform, as OCI, from the layout."""
        digest = record.platform_manifest or record.image.digest
        if not self._layout.has_blob(digest):
            raise BuildFailed("the image manifest is missing from the layout; request it again")
        raw = await anyio.to_thread.run_sync(self._layout.read_blob, digest)
        return to_oci_manifest(raw, media_type_of(load_json(raw, "manifest"), None))

    def _layer_files(self, manifest: ImageManifest) -> builtins.list[tuple[Path, str]]:
        """Each layer's blob in the layout, and its compression, in order."""
        return [
            (self._layout.blob_path(m.descriptor.digest), m.compression) for m in manifest.layers
        ]

    async def _fetch_content(self, entry: _Entry) -> tuple[ImageManifest, int]:
        """Everything the image needs into the layout: manifest, config, missing layers; with
        the bytes of layers downloaded."""
        record = entry.record
        await self._set(entry, status=ImageStatus.PULLING, progress=Progress("pulling"), error=None)
        platform_digest = record.platform_manifest or record.image.digest
        manifest = await self._platform_manifest(record)
        client: RegistryClient | None = None
        if record.source == "registry":
            ref = parse_reference(record.image.name).with_digest(platform_digest)
            client = self._client(ref, _BLOB_READ_TIMEOUT)
        if not self._layout.has_blob(manifest.config.digest):
            if client is None:
                raise BuildFailed(f"config blob {manifest.config.digest} is missing")
            data = await _run_stoppable(
                lambda _stop: client.fetch_blob_bytes(manifest.config.digest),
                self._registry_runner(client),
            )
            await anyio.to_thread.run_sync(self._layout.put_bytes, manifest.config.digest, data)
        config_bytes = await anyio.to_thread.run_sync(
            self._layout.read_blob, manifest.config.digest
        )
        config = parse_config(config_bytes)
        missing = [
            layer for layer in manifest.layers if not self._layout.has_blob(layer.descriptor.digest)
        ]
        counter = _Counter()
        total = sum(layer.descriptor.size for layer in missing)
        if missing:
            if client is None:
                raise BuildFailed(f"{len(missing)} layer blobs are missing from the layout")
            limiter = anyio.Semaphore(_DOWNLOADS_PER_BUILD)
            async with _first_error(), anyio.create_task_group() as tg:
                tg.start_soon(self._ticker, entry, "pulling", counter, total)
                async with anyio.create_task_group() as downloads:
                    for layer in dict.fromkeys(m.descriptor.digest for m in missing):
                        downloads.start_soon(self._download, client, layer, counter, limiter)
                tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(
            self._layout.put_bytes, manifest.oci_digest, manifest.oci_bytes
        )
        await anyio.to_thread.run_sync(
            self._layout.set_ref,
            entry.image.digest.partition(":")[2],
            manifest.oci_digest,
            len(manifest.oci_bytes),
        )
        blobs = [entry.image.digest, platform_digest, manifest.oci_digest, manifest.config.digest]
        blobs += [layer.descriptor.digest for layer in manifest.layers]
        entry.record = replace(
            entry.record, oci_manifest=manifest.oci_digest, blobs=tuple(dict.fromkeys(blobs))
        )
        await self._set(entry, config=config, progress=Progress("pulling", total, total))
        return manifest, counter.value

    async def _download(
        self, client: RegistryClient, digest: str, counter: _Counter, limiter: anyio.Semaphore
    ) -> None:
        async with limiter:
            tmp = self._layout.tmp / f"{digest.partition(':')[2]}.{uuid.uuid4().hex}.part"

            def work(stop: threading.Event) -> None:
                try:
                    client.download_blob(digest, tmp, counter.add, stop)
                    self._layout.commit_file(tmp, digest)
                finally:
                    tmp.unlink(missing_ok=True)

            await _run_stoppable(work, self._registry_runner(client))

    def _registry_runner(
        self, client: RegistryClient
    ) -> Callable[[Callable[[], None], threading.Event], Awaitable[None]]:
        """How a stoppable registry call gets its thread: from the registry's own share."""

        async def run(fn: Callable[[], None], stop: threading.Event) -> None:
            await self._registry_threads.run(client.ref.api_host, fn, stop=stop)

        return run

    async def _unpack(
        self, entry: _Entry, manifest: ImageManifest, trees: builtins.list[Path]
    ) -> tuple[Path, builtins.list[DeviceNode]]:
        """Unpack into scratch (RAM when it fits); if RAM runs out after all, redo it on disk.
        The tree, and the device nodes it holds as placeholders."""
        total = sum(layer.descriptor.size for layer in manifest.layers)
        await self._set(
            entry, status=ImageStatus.UNPACKING, progress=Progress("unpacking", 0, total)
        )
        counter = _Counter()
        layers = self._layer_files(manifest)

        digest = entry.image.digest
        needed = await anyio.to_thread.run_sync(unpacked_estimate, layers)
        first = self._scratch.tree_for(digest, needed)
        trees.append(first)

        def work(stop: threading.Event) -> tuple[Path, builtins.list[DeviceNode]]:
            # RAM first when the estimate fits, else (or when RAM runs out after all) the disk;
            # the real bytes decide, counted as they are written, never the estimate.
            places = list(dict.fromkeys((first, self._scratch.on_disk(digest))))
            for tree in places:
                _remove_tree(tree)
                if tree not in trees:
                    trees.append(tree)
                counter.value = 0
                unpacker = Unpacker(
                    tree,
                    stop,
                    max_bytes=self._max_unpacked_bytes,
                    budget=self._scratch.budget(tree),
                )
                try:
                    for path, compression in layers:
                        unpacker.apply(path, compression, counter.add)
                except BuildFailed as exc:
                    cause = exc.__cause__
                    no_room = isinstance(exc, StorageFull) or (
                        isinstance(cause, OSError) and cause.errno == errno.ENOSPC
                    )
                    if not no_room:
                        raise
                    _remove_tree(tree)
                    if tree is places[-1]:
                        raise StorageFull(
                            f"no room to unpack the image: {exc.message}", exc.details
                        ) from exc
                    continue
                return tree, unpacker.finish()
            raise StorageFull("no room to unpack the image")

        async with _first_error(), anyio.create_task_group() as tg:
            tg.start_soon(self._ticker, entry, "unpacking", counter, total)
            unpacked = await _run_stoppable(work)
            tg.cancel_scope.cancel()
        return unpacked

    async def _ticker(self, entry: _Entry, phase: str, counter: _Counter, total: int) -> None:
        last = -1
        while True:
            if counter.value != last:
                last = counter.value
                self._publish(entry, progress=Progress(phase, min(last, total), total))
            await anyio.sleep(PROGRESS_INTERVAL)

    # -- state changes -----------------------------------------------------------
    def _notify(self, entry: _Entry) -> None:
        changed, entry.changed = entry.changed, anyio.Event()
        changed.set()

    def _publish(self, entry: _Entry, **changes: object) -> None:
        """In-memory change (progress ticks): subscribers see it, the disk does not."""
        entry.record = entry.record.with_image(updated_at=now_iso(), **changes)
        self._notify(entry)

    async def _set(self, entry: _Entry, **changes: object) -> None:
        """A status change: on disk first, so whoever sees it may rely on it after a crash."""
        before = entry.image.status
        entry.record = entry.record.with_image(updated_at=now_iso(), **changes)
        await self._save(entry.record)
        self._notify(entry)
        after = entry.image.status
        if after != before and after in (ImageStatus.READY, ImageStatus.FAILED):
            self._changed(f"image.{after}", entry.image)

    def _changed(self, kind: str, image: Image) -> None:
        if self._on_change is not None:
            self._on_change(kind, image)

    async def _save(self, record: Record) -> None:
        with anyio.CancelScope(shield=True):
            async with self._store_lock:
                # Checked under the lock: an image removed meanwhile has nothing to save.
                digest = record.image.digest
                if digest in self._entries or record.image.status == ImageStatus.PENDING:
                    await anyio.to_thread.run_sync(self._store.save, record)

    # -- deletion and the cache ----------------------------------------------------
    async def delete(self, name_or_digest: str) -> None:
        """Remove a name, or with its last name (or by digest) the image, its disk and its
        names; cancel its build.

        ImageInUse while an instance holds the image or any instance record on disk (readable
        or not, quarantined or not) mentions it.
        """
        entry = self._lookup(name_or_digest)
        if not is_digest(name_or_digest):
            name = parse_reference(name_or_digest).name
            if name in self._tags and len(self._names(entry)) > 1:
                # One of several names: the image stays under the others.
                del self._tags[name]
                async with self._store_lock:
                    await anyio.to_thread.run_sync(self._store.remove_tag, name)
                return
        found = await self._references()
        while (current := self._lookup(name_or_digest)) is not entry:
            entry = current  # deleted or rebuilt while the records were scanned: look again
            found = await self._references()
        self._check_unused(entry, found, automatic=False)
        if found.opaque:
            _log.warning(
                "deleting %s although unreadable instance records name no image: %s",
                entry.image.digest,
                ", ".join(map(str, found.opaque)),
            )
        await self._remove(entry)
        await self._collect_blobs()

    async def _references(self) -> References:
        """What the instance records on disk reference (scanned in a thread)."""
        digests = list(self._entries)
        return await anyio.to_thread.run_sync(references.scan, self._paths, digests)

    def _still_needed(self, entry: _Entry, found: References, *, automatic: bool) -> str | None:
        """Why the disk of ``entry`` must stay, or None when nothing references it."""
        if entry.refs > 0:
            return f"used by {entry.refs} instance(s)"
        holders = found.holders(entry.image.digest)
        if holders:
            return "named by instance record(s) " + ", ".join(map(str, holders))
        if automatic and found.opaque:
            return "unreadable instance record(s) naming no image: " + ", ".join(
                map(str, found.opaque)
            )
        return None

    def _relative(self, path: Path) -> str:
        """A record's path as the API may show it: relative to DATA_DIR."""
        try:
            return str(path.relative_to(self._paths.root))
        except ValueError:
            return str(path)

    def _check_unused(self, entry: _Entry, found: References, *, automatic: bool) -> None:
        reason = self._still_needed(entry, found, automatic=automatic)
        if reason is not None:
            holders = found.holders(entry.image.digest)
            raise ImageInUse(
                f"image {entry.image.name} is in use: {reason}",
                {"holders": entry.refs, "records": [self._relative(path) for path in holders]},
            )

    async def _remove(self, entry: _Entry) -> None:
        """Forget an image and remove its folder (callers checked that nothing references it)."""
        digest = entry.image.digest
        if entry.scope is not None:
            entry.scope.cancel()
            await entry.idle.wait()
        if entry.refs > 0:
            # Acquired while its build was unwinding: it stays.
            raise ImageInUse(f"image {entry.image.name} is used by {entry.refs} instance(s)")
        self._entries.pop(digest, None)
        names = [name for name, d in self._tags.items() if d == digest]
        for name in names:
            del self._tags[name]

        def forget() -> None:
            for name in names:
                self._store.remove_tag(name)
            self._layout.remove_ref(digest.partition(":")[2])
            self._store.remove(digest)

        async with self._store_lock:
            await anyio.to_thread.run_sync(forget)
        self._changed("image.deleted", entry.image)
        self._publish(entry, status=ImageStatus.FAILED, error="deleted", disk_path=None)

    async def _collect_blobs(self) -> int:
        """Remove layout blobs no image references; skipped while a build may be adding some."""
        if self._adding or any(e.building for e in self._entries.values()):
            return 0
        keep: set[str] = set()
        for entry in self._entries.values():
            keep.update(entry.record.blobs)
            keep.add(entry.image.digest)
            if entry.record.platform_manifest:
                keep.add(entry.record.platform_manifest)
        return await anyio.to_thread.run_sync(self._layout.remove_blobs_except, keep)

    async def evict_unused(self, now: float | None = None) -> builtins.list[str]:
        """Evict images not used for ``cache_seconds``; never one in use or building."""
        if self._cache_seconds is None:
            return []
        cutoff = (time.time() if now is None else now) - self._cache_seconds
        stale = [
            entry
            for entry in self._entries.values()
            if not (entry.refs or entry.building or entry.record.last_used > cutoff)
        ]
        if not stale:
            return []
        found = await self._references()
        if self._note_opaque(found.opaque):
            return []
        evicted: builtins.list[str] = []
        for entry in stale:
            if self._entries.get(entry.image.digest) is not entry:
                continue  # deleted or replaced while the records were scanned
            if entry.building or self._still_needed(entry, found, automatic=True) is not None:
                continue
            try:
                await self._remove(entry)
            except ImageInUse:
                continue
            evicted.append(entry.image.digest)
        if evicted:
            await self._collect_blobs()
        return evicted

    def _note_opaque(self, opaque: tuple[Path, ...]) -> bool:
        """Whether unreadable records block eviction; says why once per set of such records."""
        current = frozenset(opaque)
        if current != self._opaque_noted:
            if current:
                _log.warning(
                    "cache eviction paused: unreadable instance record(s) %s name no image, "
                    "so any image may be in use; repair or remove them",
                    ", ".join(sorted(map(str, current))),
                )
            else:
                _log.info("cache eviction resumed: no unreadable instance records left")
            self._opaque_noted = current
        return bool(current)

    async def _sweeper(self) -> None:
        assert self._cache_seconds is not None
        interval = min(max(self._cache_seconds / 4, 0.5), 60.0)
        while True:
            await anyio.sleep(interval)
            try:
                await self.evict_unused()
            except Exception:
                # A failed sweep must not end the manager's task group (and every build).
                _log.exception("cache eviction failed; retrying at the next sweep")


@contextlib.asynccontextmanager
async def _first_error() -> AsyncIterator[None]:
    """Task groups wrap failures in exception groups; callers expect the typed error itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        cancelled = anyio.get_cancelled_exc_class()
        for leaf in leaves:
            if not isinstance(leaf, cancelled):
                raise leaf from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _check_format(fmt: str) -> None:
    if fmt not in DISK_FORMATS:
        raise InvalidFormat(f"unknown disk format {fmt!r}; use one of {', '.join(DISK_FORMATS)}")


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
