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
from typing import TYPE_CHECKING

from managers.images import ImageManager
from managers.instances import InstanceManager
from managers.network import NetworkManager

if TYPE_CHECKING:
    from dataplane.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Managers:
    """The domain the HTTP edge drives."""

    images: ImageManager
    instances: InstanceManager


ManagerFactory = Callable[["Runtime"], AbstractAsyncContextManager[Managers]]


@asynccontextmanager
async def real_managers(runtime: Runtime) -> AsyncIterator[Managers]:
    """The production wiring: images first (instances pin their disks), then instances."""
    settings = runtime.settings
    images = ImageManager(
        runtime.paths,
        max_concurrent_builds=settings.max_concurrent_builds,
        cache_seconds=settings.cache_seconds,
        insecure_registries=settings.insecure_registries,
        on_change=runtime.report_image,
    )
    await images.start()
    network = NetworkManager(settings.network) if can_network() else None
    try:
        instances = InstanceManager(
            runtime.paths,
            images=images,
            backends=runtime.backends,
            default_hypervisor=runtime.hypervisor.kind,
            artifacts=runtime.guest_artifacts,
            network=network,
            on_change=runtime.report_instance,
        )
        async with instances:
            yield Managers(images=images, instances=instances)
    finally:
        # The bridge, NAT and TAPs stay for the VMMs that outlive us; only our netlink
        # socket goes.
        if network is not None:
            await network.close()
        await images.close()


def can_network() -> bool:
    """Bridges and TAPs need root and the TUN device."""
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")
