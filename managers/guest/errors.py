"""The guest package's errors: one tree rooted in :class:`GuestError`.

Every error carries a message that says what failed and, where there is one, what to do. All
share one ``code``, ``guest_unavailable`` (a :class:`~managers.errors.DomainError` attribute)::

    GuestError
    ├── ArtifactError             the kernel or the initrd could not be prepared
    │   ├── ToolMissingError      a host tool the build needs is not installed
    │   ├── KernelFetchError      apt-get download of the kernel package failed
    │   ├── KernelUnpackError     the kernel package could not be unpacked or indexed
    │   ├── KernelModuleError     a module the guest needs is missing
    │   ├── InitCompileError      the guest init did not compile
    │   ├── InitrdBuildError      the initrd could not be assembled
    │   └── OverridePathError     KERNEL_PATH or INITRD_PATH names an unusable file
    ├── InvalidGuestConfig        a GuestConfig cannot be delivered as given
    ├── OverlayDiskError          the overlay disk could not be created or formatted
    └── TscUnavailableError       the host's TSC frequency could not be determined
"""

from __future__ import annotations

from managers.errors import DomainError


class GuestError(DomainError):
    """Base of every error raised by ``managers.guest``."""

    code = "guest_unavailable"


class ArtifactError(GuestError):
    """The kernel or the initrd could not be prepared."""


class ToolMissingError(ArtifactError):
    """A host tool the build needs (apt-get, dpkg-deb, depmod, lz4, gcc, …) is not installed."""


class KernelFetchError(ArtifactError):
    """``apt-get download`` of the kernel package failed."""


class KernelUnpackError(ArtifactError):
    """The kernel package could not be unpacked, indexed (depmod) or turned into a vmlinux."""


class KernelModuleError(ArtifactError):
    """A module the guest needs is neither in the kernel's modules.dep nor built in."""


class InitCompileError(ArtifactError):
    """The guest init (C, compiled static) did not compile."""


class InitrdBuildError(ArtifactError):
    """The initrd could not be assembled (for example busybox is missing or not static)."""


class OverridePathError(ArtifactError):
    """``KERNEL_PATH`` or ``INITRD_PATH`` names a file that is missing or of the wrong kind."""


class InvalidGuestConfig(GuestError):
    """A :class:`~managers.guest.types.GuestConfig` cannot be delivered to the guest as given."""


class OverlayDiskError(GuestError):
    """The per-instance overlay disk could not be created or formatted."""


class TscUnavailableError(GuestError):
    """The host's TSC frequency could not be determined."""
