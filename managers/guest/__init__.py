"""The guest: kernel, initrd and init that run an OCI image's program inside a microVM.

No other module knows the artifact paths, the kernel command line, the config-disk format or
the serial markers; they ask here.
"""

from .artifacts import ensure_artifacts
from .cmdline import host_tsc_khz, kernel_cmdline, qemu_extra, tsc_early_khz_arg
from .config_disk import encode_config, write_config_disk
from .errors import (
    ArtifactError,
    GuestError,
    InvalidGuestConfig,
    OverlayDiskError,
    OverridePathError,
    TscUnavailableError,
)
from .markers import PREFIX as MARKER_PREFIX
from .markers import parse_marker, parse_markers, program_output
from .overlay_disk import create_overlay_disk
from .types import (
    GuestArtifacts,
    GuestConfig,
    Marker,
    MarkerKind,
    NetworkConfig,
    VolumeMount,
)

__all__ = [
    "MARKER_PREFIX",
    "ArtifactError",
    "GuestArtifacts",
    "GuestConfig",
    "GuestError",
    "InvalidGuestConfig",
    "Marker",
    "MarkerKind",
    "NetworkConfig",
    "OverlayDiskError",
    "OverridePathError",
    "TscUnavailableError",
    "VolumeMount",
    "create_overlay_disk",
    "encode_config",
    "ensure_artifacts",
    "host_tsc_khz",
    "kernel_cmdline",
    "parse_marker",
    "parse_markers",
    "program_output",
    "qemu_extra",
    "tsc_early_khz_arg",
    "write_config_disk",
]
