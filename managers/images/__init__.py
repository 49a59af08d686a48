"""Images: from an OCI registry (or an uploaded OCI archive) to a bootable erofs/ext4 disk.

The public surface is :class:`ImageManager`, the value types in :mod:`.types` and the exception
tree in :mod:`.errors`; see README.md for the design.
"""

from .errors import (
    BuildFailed,
    DigestMismatch,
    FormatConflict,
    ImageError,
    ImageInUse,
    ImageNotFound,
    ImageNotReady,
    InvalidArchive,
    InvalidFormat,
    InvalidReference,
    NoMatchingPlatform,
    RegistryAuthFailed,
    RegistryError,
    RegistryUnreachable,
    UnsupportedImage,
)
from .manager import ImageManager
from .reference import Reference, parse_reference
from .types import (
    DISK_FORMATS,
    PROGRESS_INTERVAL,
    BuildObserver,
    DiskFormat,
    Image,
    ImageConfig,
    ImageStatus,
    Progress,
)

__all__ = [
    "DISK_FORMATS",
    "PROGRESS_INTERVAL",
    "BuildFailed",
    "BuildObserver",
    "DigestMismatch",
    "DiskFormat",
    "FormatConflict",
    "Image",
    "ImageConfig",
    "ImageError",
    "ImageInUse",
    "ImageManager",
    "ImageNotFound",
    "ImageNotReady",
    "ImageStatus",
    "InvalidArchive",
    "InvalidFormat",
    "InvalidReference",
    "NoMatchingPlatform",
    "Progress",
    "Reference",
    "RegistryAuthFailed",
    "RegistryError",
    "RegistryUnreachable",
    "UnsupportedImage",
    "parse_reference",
]
