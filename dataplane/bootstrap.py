"""Which managers the service runs on: the real ones by default, any others a caller passes.

``create_app(settings, managers=...)`` takes a :data:`ManagerFactory`: given the runtime (for
its settings, paths, backends and the guest-artifacts wait), it opens the managers as one
async context and closes them when the app stops. Tests pass a factory that builds the
instance manager on fake hypervisor, image and network ports; the edge cannot tell.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING

from managers.images import ImageManager
from managers.ingresses import IngressManager, Target
from managers.instances import InstanceManager, InstanceNotFound
from managers.instances.types import IntentKind
from managers.network import NetworkManager
from managers.resources import ResourceManager
from managers.volumes import VolumeManager

if TYPE_CHECKING:
    from dataplane.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Managers:
    """The domain the HTTP edge drives."""

    images: ImageManager
    instances: InstanceManager
    volumes: VolumeManager | None = None
    resources: ResourceManager | None = None
    ingresses: IngressManager | None = None


ManagerFactory = Callable[["Runtime"], AbstractAsyncContextManager[Managers]]


@asynccontextmanager
async def real_managers(runtime: Runtime) -> AsyncIterator[Managers]:
    """The production wiring: images first (instances pin their disks), then volumes (instances
    claim theirs), then resources (which admit what instances boot), then ingresses (which
    instances tell of a delete), then instances; the ingresses' table is published once the
    instances are known."""
    settings = runtime.settings
    images = ImageManager(
        runtime.paths,
        max_concurrent_builds=settings.max_concurrent_builds,
        cache_seconds=settings.cache_seconds,
        max_unpacked_bytes=settings.image_max_unpacked_bytes,
        insecure_registries=settings.insecure_registries,
        on_change=runtime.report_image,
        observer=runtime.metrics,
    )
    await images.start()
    network = NetworkManager(settings.network) if can_network() else None
    try:
        async with VolumeManager(
            runtime.paths, images=images, on_change=runtime.report_volume
        ) as volumes:

            async def disk_outside() -> tuple[int, int]:
                stored = sum(image.size or 0 for image in await images.list())
                provisioned = sum(volume.record.size_mb << 20 for volume in await volumes.list())
                return stored, provisioned

            async with ResourceManager(
                runtime.paths.root, settings.oversubscription, disk_outside=disk_outside
            ) as resources:

                async def target(key: str) -> Target | None:
                    try:
                        instance = await instances.get(key)
                    except InstanceNotFound:
                        return None
                    record = instance.record
                    # One being made or deleted is no target: a create that fails, like a
                    # delete, releases its address, and a forward must not reach the next
                    # holder.
                    if record is None or (
                        record.intent is not None
                        and record.intent.action in (IntentKind.CREATE, IntentKind.DELETE)
                    ):
                        return None
                    address = record.network.address if record.network.enabled else None
                    return Target(instance.id, IPv4Interface(address).ip if address else None)

                ingresses = IngressManager(
                    runtime.paths, network, lookup=target, on_change=runtime.report_ingress
                )
                instances = InstanceManager(
                    runtime.paths,
                    images=images,
                    backends=runtime.backends,
                    default_hypervisor=runtime.hypervisor.kind,
                    artifacts=runtime.guest_artifacts,
                    network=network,
                    on_change=runtime.report_instance,
                    volumes=volumes,
                    admission=resources,
                    log_tally=runtime.log_tally,
                    log_retention_bytes=settings.log_retention_bytes,
                    ingresses=ingresses,
                )
                async with ingresses, instances:
                    await ingresses.reconcile()
                    yield Managers(
                        images=images,
                        instances=instances,
                        volumes=volumes,
                        resources=resources,
                        ingresses=ingresses,
                    )
    finally:
        # The bridge, NAT and TAPs stay for the VMMs that outlive us; only our netlink
        # socket goes.
        if network is not None:
            await network.close()
        await images.close()


def can_network() -> bool:
    """Bridges and TAPs need root and the TUN device."""
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")
