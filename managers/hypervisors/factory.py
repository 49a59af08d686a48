"""Choosing a backend from configuration."""

from __future__ import annotations

from .base import HypervisorBackend
from .cloud_hypervisor import CloudHypervisorBackend
from .qemu import QemuBackend
from .types import BackendKind, BackendSettings


def open_backend(
    kind: BackendKind | str, settings: BackendSettings | None = None
) -> HypervisorBackend:
    """The backend for ``kind`` (``cloud-hypervisor`` or ``qemu``). Cheap: starts nothing."""
    try:
        chosen = BackendKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in BackendKind)
        raise ValueError(f"unknown hypervisor {kind!r} (known: {known})") from None
    settings = settings or BackendSettings()
    if chosen is BackendKind.CLOUD_HYPERVISOR:
        return CloudHypervisorBackend(settings)
    return QemuBackend(settings)
