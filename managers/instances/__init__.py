"""Instances: microVMs running an image's program (see README.md)."""

from managers.instances.errors import (
    ActionFailed,
    ImageMissing,
    ImageNotReady,
    InstanceError,
    InstanceExists,
    InstanceNotFound,
    InvalidInstanceSpec,
    WrongInstanceState,
)
from managers.instances.manager import ImageSource, InstanceManager
from managers.instances.types import CreateRequest, GuestStatus, Instance, InstanceState

__all__ = [
    "ActionFailed",
    "CreateRequest",
    "GuestStatus",
    "ImageMissing",
    "ImageNotReady",
    "ImageSource",
    "Instance",
    "InstanceError",
    "InstanceExists",
    "InstanceManager",
    "InstanceNotFound",
    "InstanceState",
    "InvalidInstanceSpec",
    "WrongInstanceState",
]
