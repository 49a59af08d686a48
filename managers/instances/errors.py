"""The instances error tree.

Each class's ``code`` (a :class:`~managers.errors.DomainError` attribute) is the error code the
API returns; a class without one of its own answers with its parent's::

    InstanceError              instance_error
    ├── InvalidInstanceSpec    invalid_instance      the request cannot describe a VM
    ├── InstanceNotFound       instance_not_found    no instance has that id or name
    ├── InstanceExists         instance_exists       the name is taken (as a name, or an id)
    ├── ImageUnusable          image_not_ready       the image is still building, or failed
    │   └── ImageMissing       image_not_found       the image is not known here
    ├── WrongInstanceState     wrong_state           not allowed in the current state
    ├── InstanceQuarantined    instance_quarantined  record unreadable; an operator must look
    ├── RecordInvalid                                a stored record does not parse
    ├── ActionFailed           action_failed         a step of an action failed; see ``step``
    └── VolumeNotAttached      volume_not_attached   the instance has no such volume

``details`` names what the message is about (the instance, the image, the current state and
the states that would allow the action, …). Recovery quarantines the folder of a record that
raises ``RecordInvalid``.
"""

from __future__ import annotations

from managers.errors import DomainError


class InstanceError(DomainError):
    """Base of every error raised by ``managers.instances``; built from a message and details."""

    code = "instance_error"


class InvalidInstanceSpec(InstanceError):
    code = "invalid_instance"


class InstanceNotFound(InstanceError):
    code = "instance_not_found"

    def __init__(self, key: str) -> None:
        super().__init__(f"no instance with id or name {key!r}", {"instance": key})


class InstanceExists(InstanceError):
    code = "instance_exists"

    def __init__(self, name: str, existing_id: str, *, is_id: bool = False) -> None:
        message = (
            f"{name!r} is the id of an existing instance, so it cannot be a name"
            if is_id
            else f"an instance named {name!r} already exists"
        )
        super().__init__(message, {"name": name, "id": existing_id})


class ImageUnusable(InstanceError):
    """The image exists but cannot back an instance yet: still building, or failed.

    Named apart from ``managers.images.errors.ImageNotReady``, which the image manager raises;
    this is what instances make of it.
    """

    code = "image_not_ready"


class ImageMissing(ImageUnusable):
    """The image is not known on this node at all."""

    code = "image_not_found"


class WrongInstanceState(InstanceError):
    code = "wrong_state"

    def __init__(self, instance_id: str, action: str, state: str, allowed: list[str]) -> None:
        super().__init__(
            f"cannot {action} instance {instance_id}: it is {state}",
            {"id": instance_id, "action": action, "state": state, "allowed_states": allowed},
        )
        self.state = state


class InstanceQuarantined(InstanceError):
    code = "instance_quarantined"

    def __init__(self, instance_id: str, path: str, reason: str) -> None:
        super().__init__(
            f"instance {instance_id} was quarantined because its record could not be read "
            f"({reason}); its folder, disks included, is at {path}: inspect it, and remove "
            "it by hand when nothing in it is needed",
            {"id": instance_id, "path": path, "reason": reason},
        )


class RecordInvalid(InstanceError):
    """A ``metadata.json`` that does not describe an instance."""


class ActionFailed(InstanceError):
    code = "action_failed"

    def __init__(self, instance_id: str, action: str, step: str, cause: Exception) -> None:
        super().__init__(
            f"{action} of instance {instance_id} failed at step {step!r}: {cause}",
            {"id": instance_id, "action": action, "step": step},
        )
        self.step = step


class VolumeNotAttached(InstanceError):
    code = "volume_not_attached"

    def __init__(self, instance_id: str, volume: str) -> None:
        super().__init__(
            f"volume {volume!r} is not attached to instance {instance_id}",
            {"id": instance_id, "volume": volume},
        )
