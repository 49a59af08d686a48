"""Instances: microVMs running an image's program (see README.md)."""

from managers.instances.context import AdmissionPort, ImageSource, NetworkPort, VolumePort
from managers.instances.errors import (
    ActionFailed,
    ImageMissing,
    ImageUnusable,
    InstanceError,
    InstanceExists,
    InstanceNotFound,
    InstanceQuarantined,
    InvalidInstanceSpec,
    VolumeNotAttached,
    WrongInstanceState,
)
from managers.instances.manager import InstanceManager
from managers.instances.types import (
    CreateRequest,
    GuestStatus,
    Instance,
    InstanceRecord,
    InstanceState,
    VolumeRequest,
)

__all__ = [
    "ActionFailed",
    "AdmissionPort",
    "CreateRequest",
    "GuestStatus",
    "ImageMissing",
    "ImageSource",
    "ImageUnusable",
    "Instance",
    "InstanceError",
    "InstanceExists",
    "InstanceManager",
    "InstanceNotFound",
    "InstanceQuarantined",
    "InstanceRecord",
    "InstanceState",
    "InvalidInstanceSpec",
    "NetworkPort",
    "VolumeNotAttached",
    "VolumePort",
    "VolumeRequest",
    "WrongInstanceState",
]
