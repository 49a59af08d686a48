"""The agent package's errors: one tree rooted in :class:`AgentError`::

AgentError                  agent_error
├── AgentUnavailable        agent_unavailable: no channel to the agent (not up yet, VMM gone)
├── AgentDisconnected       agent_disconnected: the channel went away during the operation
│                           (standby, stop, an agent restart); the message says which
├── AgentProtocolError      agent_protocol_error: the guest broke the protocol
└── GuestOperationFailed    the agent refused or failed an operation; ``errno`` says why
    ├── GuestPathNotFound   guest_path_not_found (ENOENT)
    ├── GuestPermissionDenied  guest_permission_denied (EACCES, EPERM)
    ├── InvalidGuestPath    invalid_guest_path (not absolute, wrong kind of file)
    └── ExecFailed          exec_failed: the program could not be started
"""

from __future__ import annotations

import errno as errnos

from managers.errors import DomainError


class AgentError(DomainError):
    """Base of every error raised by ``managers.agent``."""

    code = "agent_error"


class AgentUnavailable(AgentError):
    """There is no channel to the instance's agent."""

    code = "agent_unavailable"


class AgentDisconnected(AgentError):
    """The channel went away while an operation used it."""

    code = "agent_disconnected"


class AgentProtocolError(AgentError):
    """The guest sent something the protocol does not allow."""

    code = "agent_protocol_error"


class GuestOperationFailed(AgentError):
    """The agent answered ERROR."""

    code = "guest_operation_failed"

    def __init__(self, message: str, errno: int, path: str | None = None) -> None:
        name = errnos.errorcode.get(errno, str(errno))
        details: dict[str, object] = {"errno": name}
        if path is not None:
            details["path"] = path
        super().__init__(message, details)
        self.errno = errno


class GuestPathNotFound(GuestOperationFailed):
    code = "guest_path_not_found"


class GuestPermissionDenied(GuestOperationFailed):
    code = "guest_permission_denied"


class InvalidGuestPath(GuestOperationFailed):
    code = "invalid_guest_path"


class GuestStorageFull(GuestOperationFailed):
    code = "insufficient_storage"


class ExecFailed(GuestOperationFailed):
    code = "exec_failed"


_BY_ERRNO: dict[int, type[GuestOperationFailed]] = {
    errnos.ENOENT: GuestPathNotFound,
    errnos.ENOTDIR: GuestPathNotFound,
    errnos.EACCES: GuestPermissionDenied,
    errnos.EPERM: GuestPermissionDenied,
    errnos.EROFS: GuestPermissionDenied,
    errnos.EINVAL: InvalidGuestPath,
    errnos.EISDIR: InvalidGuestPath,
    errnos.ELOOP: InvalidGuestPath,
    errnos.ENAMETOOLONG: InvalidGuestPath,
    errnos.ENOSPC: GuestStorageFull,
    errnos.EDQUOT: GuestStorageFull,
}


def guest_error(message: str, errno: int, path: str | None = None) -> GuestOperationFailed:
    """The error for an agent's ERROR answer to a file operation."""
    return _BY_ERRNO.get(errno, GuestOperationFailed)(message, errno, path)
