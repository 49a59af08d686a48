"""Volumes: persistent ext4 disks that outlive instances. See README.md for the decisions."""

from __future__ import annotations

from .errors import (
    InsufficientStorage,
    InvalidVolumeArchive,
    InvalidVolumeSpec,
    SourceImageMissing,
    SourceImageNotReady,
    VolumeBuildFailed,
    VolumeBusy,
    VolumeError,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
    VolumeQuarantined,
    VolumeTooSmall,
)
from .manager import ChangeCallback, ImageDisks, VolumeManager
from .types import (
    Attachment,
    CreateVolume,
    Volume,
    VolumeRecord,
    VolumeRef,
    disk_serial,
    mount_path_problems,
    normal_mount_path,
)

__all__ = [
    "Attachment",
    "ChangeCallback",
    "CreateVolume",
    "ImageDisks",
    "InsufficientStorage",
    "InvalidVolumeArchive",
    "InvalidVolumeSpec",
    "SourceImageMissing",
    "SourceImageNotReady",
    "Volume",
    "VolumeBuildFailed",
    "VolumeBusy",
    "VolumeError",
    "VolumeExists",
    "VolumeInUse",
    "VolumeManager",
    "VolumeNotFound",
    "VolumeQuarantined",
    "VolumeRecord",
    "VolumeRef",
    "VolumeTooSmall",
    "disk_serial",
    "mount_path_problems",
    "normal_mount_path",
]
