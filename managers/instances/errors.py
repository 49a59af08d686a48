"""The instances error tree.

::

    InstanceError
    ├── InvalidInstanceSpec   the request cannot describe a VM (bad name, sizes, overrides)
    ├── InstanceNotFound      no instance has that id or name
    ├── InstanceExists        the name is taken
    ├── ImageNotReady         the image is still building, or failed
    │   └── ImageMissing      the image is not known here
    ├── WrongInstanceState    the action is not allowed in the instance's current state
    └── ActionFailed          a step of an action failed; ``step`` says which, and what was undone
"""

from __future__ import annotations

from typing import Any


class InstanceError(Exception):
    """Base of every error raised by ``managers.instances``."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidInstanceSpec(InstanceError):
    pass


class InstanceNotFound(InstanceError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no instance with id or name {key!r}", {"instance": key})


class InstanceExists(InstanceError):
    def __init__(self, name: str, existing_id: str) -> None:
        super().__init__(
            f"an instance named {name!r} already exists", {"name": name, "id": existing_id}
        )


class ImageNotReady(InstanceError):
    pass


class ImageMissing(ImageNotReady):
    """The image is not known on this node at all."""


class WrongInstanceState(InstanceError):
    def __init__(self, instance_id: str, action: str, state: str, allowed: list[str]) -> None:
        super().__init__(
            f"cannot {action} instance {instance_id}: it is {state}",
            {"id": instance_id, "action": action, "state": state, "allowed_states": allowed},
        )
        self.state = state


class ActionFailed(InstanceError):
    def __init__(self, instance_id: str, action: str, step: str, cause: Exception) -> None:
        super().__init__(
            f"{action} of instance {instance_id} failed at step {step!r}: {cause}",
            {"id": instance_id, "action": action, "step": step},
        )
        self.step = step
