"""The host side of the guest agent: the protocol, one channel per instance, and operations.

See README.md for the decisions and PROTOCOL.md for the wire format.
"""

from __future__ import annotations

from .channel import Channel
from .errors import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentUnavailable,
    ExecFailed,
    GuestOperationFailed,
    GuestPathNotFound,
    GuestPermissionDenied,
    InvalidGuestPath,
)
from .link import AgentLink
from .operations import InteractiveExec, interactive_exec, read_file, run_exec, stat, write_file
from .types import (
    EXEC_DEFAULT_TIMEOUT,
    EXEC_MAX_TIMEOUT,
    EXEC_OUTPUT_LIMIT,
    EXEC_STDIN_LIMIT,
    AgentInfo,
    ExecExit,
    ExecResult,
    ExecSpec,
    FileStat,
    FileType,
    TtySize,
)

__all__ = [
    "EXEC_DEFAULT_TIMEOUT",
    "EXEC_MAX_TIMEOUT",
    "EXEC_OUTPUT_LIMIT",
    "EXEC_STDIN_LIMIT",
    "AgentDisconnected",
    "AgentError",
    "AgentInfo",
    "AgentLink",
    "AgentProtocolError",
    "AgentUnavailable",
    "Channel",
    "ExecExit",
    "ExecFailed",
    "ExecResult",
    "ExecSpec",
    "FileStat",
    "FileType",
    "GuestOperationFailed",
    "GuestPathNotFound",
    "GuestPermissionDenied",
    "InteractiveExec",
    "InvalidGuestPath",
    "TtySize",
    "interactive_exec",
    "read_file",
    "run_exec",
    "stat",
    "write_file",
]
