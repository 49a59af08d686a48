"""The hypervisor error tree. Every error names the instance whose VMM it concerns.

The instance is in the message and in ``details["instance_id"]``. All share one ``code``,
``hypervisor_error`` (a :class:`~managers.errors.DomainError` attribute)::

    HypervisorError
    ├── InvalidRequest        bad input (spec, snapshot dir, resize): nothing was started or changed
    ├── VmmNotFound           attach found no live VMM for the instance
    ├── VmmStartTimeout       the VMM did not answer on its socket in time
    ├── VmmDied               the VMM process exited (crash, kill) while we needed it
    ├── VmmProtocolError      the VMM answered something we cannot understand
    ├── VmmRequestFailed      the VMM understood and refused (its own error text is kept)
    │   └── WrongState        the request is not allowed in the VM's current state
    ├── UnsupportedVersion    the VMM's major version is one we do not speak
    └── OperationTimeout      a started operation (migration, shutdown) did not finish in time
"""

from __future__ import annotations

from managers.errors import DomainError


class HypervisorError(DomainError):
    """Base of every error raised by ``managers.hypervisors``."""

    code = "hypervisor_error"

    def __init__(self, instance_id: str, message: str) -> None:
        super().__init__(f"instance {instance_id}: {message}", {"instance_id": instance_id})
        self.instance_id = instance_id


class InvalidRequest(HypervisorError):
    """The caller asked for something impossible; nothing was started or changed."""


class VmmNotFound(HypervisorError):
    """No live VMM belongs to the instance (nothing to attach to)."""


class VmmStartTimeout(HypervisorError):
    """The VMM process started but its API socket did not answer before the deadline."""


class VmmDied(HypervisorError):
    """The VMM process is gone: it crashed, was killed, or exited on its own."""

    def __init__(self, instance_id: str, message: str, exit_code: int | None = None) -> None:
        super().__init__(instance_id, message)
        self.exit_code = exit_code
        self.details["exit_code"] = exit_code


class VmmProtocolError(HypervisorError):
    """The VMM answered, but not in its protocol (garbage, wrong shape, wrong status)."""


class VmmRequestFailed(HypervisorError):
    """The VMM refused a request; ``vmm_errors`` (also in ``details``) is its own error chain."""

    def __init__(
        self, instance_id: str, message: str, details: list[str] | None = None, status: int = 0
    ) -> None:
        # The parameter keeps its name so callers are unchanged; ``details`` itself is now the
        # mapping every domain error carries, so the chain lives under its own name.
        chain = list(details or [])
        text = message if not chain else f"{message}: {'; '.join(chain)}"
        super().__init__(instance_id, text)
        self.vmm_errors = chain
        self.status = status
        self.details["vmm_errors"] = chain


class WrongState(VmmRequestFailed):
    """The request is not allowed in the VM's current state (e.g. resume while running)."""


class UnsupportedVersion(HypervisorError):
    """The VMM's version is one this code was not written for."""


class OperationTimeout(HypervisorError):
    """An operation the VMM accepted did not complete in time."""


def wrong_state(instance_id: str, action: str, state: str) -> WrongState:
    return WrongState(instance_id, f"cannot {action} a VM that is {state}")
