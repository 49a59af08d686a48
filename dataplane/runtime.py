"""The long-lived state of one server process, owned by the app's lifespan.

Everything a handler needs beyond the request comes from here: settings, the
spec, the readiness phase, and the managers. Start-up order: the on-disk layout
(``DATA_DIR`` made private), then the managers the app was given (by default
``bootstrap.real_managers``: the image manager, which recovers interrupted builds,
the volume manager, which removes half-made volumes and finishes a cut-short resize,
the resource manager, which reads the host's capacity and admits what instances boot,
then the instance manager, which settles what a crash left, re-adopts running VMMs
and claims its volumes again). Slow facts (the guest kernel and initrd when they must be built, the
hypervisor's version and acceleration) are gathered in the background so the API
answers at once: ``/health`` shows null for them until they are known, and a
request that boots a guest (create, unless ``start`` is false, and start) waits for
them, up to ``GUEST_WAIT_SECONDS``, then answers 503 ``guest_unavailable`` with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
from litestar import Litestar

from dataplane import __version__
from dataplane.bootstrap import ManagerFactory, real_managers
from dataplane.errors import ApiError
from dataplane.events import EventLog, EventService, EventSettings, Renderers, Retention
from dataplane.logsetup import InstanceLogHandler
from dataplane.logsetup import attach as attach_log_handler
from dataplane.logsetup import detach as detach_log_handler
from dataplane.metrics import Metrics
from dataplane.representations import image_json, ingress_json, instance_json, volume_json
from dataplane.settings import Settings
from dataplane.spec import Spec
from managers.guest import GuestArtifacts, GuestError, ensure_artifacts
from managers.hypervisors import BackendKind, BackendSettings, HypervisorBackend, open_backend
from managers.images import Image, ImageManager, ImageNotFound
from managers.ingresses import IngressManager, IngressNotFound, IngressRecord
from managers.instances import Instance, InstanceManager, InstanceNotFound
from managers.instances.logs import LogTally
from managers.paths import Paths
from managers.resources import ResourceManager
from managers.volumes import Volume, VolumeManager, VolumeNotFound

log = logging.getLogger("dataplane.runtime")

Phase = Literal["starting", "ok", "stopping"]

# How long a request that needs the guest waits for start-up to finish preparing it
# (a first start downloads the kernel package).
GUEST_WAIT_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class HypervisorInfo:
    kind: Literal["cloud-hypervisor", "qemu"]
    version: str | None = None
    acceleration: Literal["kvm", "tcg"] | None = None


class Runtime:
    # A plain class, not a dataclass: Litestar's DI would otherwise try to
    # convert it field by field when injecting it into handlers.
    def __init__(
        self, settings: Settings, spec: Spec, managers: ManagerFactory = real_managers
    ) -> None:
        self.settings = settings
        self._managers = managers
        self.spec = spec
        self.version = __version__
        self.phase: Phase = "starting"
        self.started_monotonic = time.monotonic()
        self.paths = Paths(settings.data_dir)
        self.sse_keepalive_seconds = float(settings.sse_keepalive_seconds)
        self.backends = self._backends()
        self.hypervisor = HypervisorInfo(kind=self._default_kind())
        self.images: ImageManager | None = None
        self.instances: InstanceManager | None = None
        self.volumes: VolumeManager | None = None
        self.resources: ResourceManager | None = None
        self.ingresses: IngressManager | None = None
        self.metrics = Metrics()
        self.log_tally = LogTally()
        self.events: EventService | None = None
        self.artifacts: GuestArtifacts | None = None
        self.artifacts_error: str | None = None
        self._artifacts_settled = anyio.Event()

    def _backends(self) -> dict[str, HypervisorBackend]:
        settings = BackendSettings(
            cloud_hypervisor_bin=self.settings.cloud_hypervisor_bin,
            qemu_bin=self.settings.qemu_bin,
            memory_restore_mode=self.settings.memory_restore_mode,
            probe_cache=self.paths.acceleration_cache,
        )
        found: dict[str, HypervisorBackend] = {}
        binaries = {
            BackendKind.CLOUD_HYPERVISOR: self.settings.cloud_hypervisor_bin or "cloud-hypervisor",
            BackendKind.QEMU: self.settings.qemu_bin or "qemu-system-x86_64",
        }
        for kind, binary in binaries.items():
            if shutil.which(binary) or os.access(binary, os.X_OK):
                found[kind.value] = open_backend(kind, settings)
        return found

    def _default_kind(self) -> Literal["cloud-hypervisor", "qemu"]:
        choice = self.settings.hypervisor
        if choice != "auto":
            return choice
        return "cloud-hypervisor" if BackendKind.CLOUD_HYPERVISOR.value in self.backends else "qemu"

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_monotonic

    def require_images(self) -> ImageManager:
        if self.images is None:
            raise ApiError(503, "unavailable", f"the image manager is not running ({self.phase})")
        return self.images

    def require_events(self) -> EventLog:
        if self.events is None:
            raise ApiError(503, "unavailable", f"the event log is not open ({self.phase})")
        return self.events.log

    def report_instance(self, kind: str, instance: Instance) -> None:
        """The instance manager's change callback: an event, with the instance as it read."""
        if self.events is not None:
            self.events.report(kind, instance.id, instance_json(instance))

    def report_image(self, kind: str, image: Image) -> None:
        """The image manager's change callback."""
        if self.events is not None:
            self.events.report(kind, image.name, image_json(image))

    def report_volume(self, kind: str, volume: Volume) -> None:
        """The volume manager's change callback."""
        if self.events is not None:
            self.events.report(kind, volume.id, volume_json(volume))

    def report_ingress(self, kind: str, ingress: IngressRecord) -> None:
        """The ingress manager's change callback."""
        if self.events is not None:
            self.events.report(kind, ingress.id, ingress_json(ingress))

    def require_ingresses(self) -> IngressManager:
        if self.ingresses is None:
            raise ApiError(503, "unavailable", f"the ingress manager is not running ({self.phase})")
        return self.ingresses

    def require_volumes(self) -> VolumeManager:
        if self.volumes is None:
            raise ApiError(503, "unavailable", f"the volume manager is not running ({self.phase})")
        return self.volumes

    def require_resources(self) -> ResourceManager:
        if self.resources is None:
            raise ApiError(
                503, "unavailable", f"the resource manager is not running ({self.phase})"
            )
        return self.resources

    def require_instances(self) -> InstanceManager:
        if self.instances is None:
            raise ApiError(
                503, "unavailable", f"the instance manager is not running ({self.phase})"
            )
        return self.instances

    @property
    def guest_status(self) -> str:
        """``preparing`` while start-up readies the kernel and initrd, then the outcome."""
        if self.artifacts is not None:
            return "ready"
        return "unavailable" if self._artifacts_settled.is_set() else "preparing"

    async def guest_artifacts(self) -> GuestArtifacts:
        """The kernel and initrd; waits while start-up is still preparing them."""
        with anyio.move_on_after(GUEST_WAIT_SECONDS):
            await self._artifacts_settled.wait()
        if self.artifacts is None:
            reason = self.artifacts_error or "the guest kernel and initrd are still being prepared"
            raise ApiError(503, "guest_unavailable", reason)
        return self.artifacts

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        settings = self.settings
        await anyio.to_thread.run_sync(self.paths.ensure)
        async with contextlib.AsyncExitStack() as stack:
            instance_logs = InstanceLogHandler(
                self.paths, settings.log_format, self.log_tally, settings.log_retention_bytes
            )
            attach_log_handler(instance_logs)
            stack.callback(detach_log_handler, instance_logs)
            events = EventService(self.paths, self._event_settings())
            await events.open()
            stack.push_async_callback(events.close)
            self.events = events
            managers = await stack.enter_async_context(self._managers(self))
            self.images, self.instances = managers.images, managers.instances
            self.volumes = managers.volumes
            self.resources = managers.resources
            self.ingresses = managers.ingresses
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)
            await events.start(group, self._renderers(), *await self._current_states())
            group.start_soon(self._prepare_guest)
            self.phase = "ok"
            log.info(
                "dataplane %s ready",
                self.version,
                extra={"data_dir": str(settings.data_dir), "node_id": settings.node_id},
            )
            try:
                yield
            finally:
                self.phase = "stopping"
                log.info("dataplane stopping")

    def _event_settings(self) -> EventSettings:
        settings = self.settings
        return EventSettings(
            node_id=settings.node_id,
            endpoints=settings.webhook_endpoints,
            secret=settings.webhook_secret,
            max_age_seconds=float(settings.webhook_max_age_seconds),
            retention=Retention(
                max_bytes=settings.event_retention_bytes,
                max_age_seconds=float(settings.event_retention_seconds),
            ),
        )

    def _renderers(self) -> Renderers:
        async def instance(instance_id: str) -> dict[str, Any] | None:
            try:
                return instance_json(await self.require_instances().get(instance_id))
            except InstanceNotFound:
                return None

        async def image(name: str) -> dict[str, Any] | None:
            try:
                return image_json(await self.require_images().get(name))
            except ImageNotFound:
                return None

        async def volume(volume_id: str) -> dict[str, Any] | None:
            try:
                return volume_json(await self.require_volumes().get(volume_id))
            except VolumeNotFound:
                return None

        async def ingress(ingress_id: str) -> dict[str, Any] | None:
            try:
                return ingress_json(await self.require_ingresses().get(ingress_id))
            except IngressNotFound:
                return None

        return Renderers(instance=instance, image=image, volume=volume, ingress=ingress)

    async def _current_states(
        self,
    ) -> tuple[dict[str, str], dict[str, str], frozenset[str] | None, frozenset[str] | None]:
        """Every instance's state, every image's status, every volume's and ingress's id, for
        the events' reconciliation (None for a manager the node runs without)."""
        instances = {i.id: str(i.state) for i in await self.require_instances().list() if i.record}
        images = {i.name: str(i.status) for i in await self.require_images().list()}
        volumes = (
            frozenset(v.id for v in await self.volumes.list()) if self.volumes is not None else None
        )
        ingresses = (
            frozenset(i.id for i in await self.ingresses.list())
            if self.ingresses is not None
            else None
        )
        return instances, images, volumes, ingresses

    async def _prepare_guest(self) -> None:
        try:
            self.artifacts = await ensure_artifacts(
                self.paths.system,
                kernel_path=self.settings.kernel_path,
                initrd_path=self.settings.initrd_path,
            )
        except (GuestError, OSError) as error:
            # A full disk, say: instances cannot boot until it is fixed and the service
            # restarted, but everything else keeps serving.
            self.artifacts_error = f"the guest kernel and initrd are not available: {error}"
            log.error("%s", self.artifacts_error)
            return
        finally:
            self._artifacts_settled.set()
        await self._probe_hypervisor()

    async def _probe_hypervisor(self) -> None:
        backend = self.backends.get(self.hypervisor.kind)
        if backend is None:
            log.error("no %s binary found: instances cannot start", self.hypervisor.kind)
            return
        try:
            version = await backend.version()
        except OSError as error:
            log.error("%s does not run: %s", self.hypervisor.kind, error)
            return
        assert self.artifacts is not None
        acceleration = await backend.acceleration(self.artifacts.bzimage)
        self.hypervisor = replace(self.hypervisor, version=version, acceleration=acceleration.value)
        log.info("hypervisor %s %s with %s", self.hypervisor.kind, version, acceleration.value)
