"""Instances: microVMs running an image's program (see README.md)."""

from managers.instances.context import ImageSource, NetworkPort
from managers.instances.errors import (
    ActionFailed,
    ImageMissing,
    ImageUnusable,
    InstanceError,
    InstanceExists,
    InstanceNotFound,
    InstanceQuarantined,
    InvalidInstanceSpec,
    WrongInstanceState,
)
from managers.instances.manager import InstanceManager
from managers.instances.types import (
    CreateRequest,
    GuestStatus,
    Instance,
    InstanceRecord,
    InstanceState,
)

__all__ = [
    "ActionFailed",
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
    "WrongInstanceState",
]
