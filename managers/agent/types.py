"""Value types of the guest agent's host side."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# What one exec keeps of each output stream; the rest is read and dropped, and the result says
# it was truncated. Documented in the spec (ExecResult).
EXEC_OUTPUT_LIMIT = 1 << 20
# What one exec may send as stdin (it is held in the request body).
EXEC_STDIN_LIMIT = 1 << 20
EXEC_DEFAULT_TIMEOUT = 60.0
EXEC_MAX_TIMEOUT = 3600.0


class FileType(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    CHAR_DEVICE = "char_device"
    BLOCK_DEVICE = "block_device"
    FIFO = "fifo"
    SOCKET = "socket"


# STAT's type byte, in the protocol's numbering.
FILE_TYPES = {
    1: FileType.FILE,
    2: FileType.DIRECTORY,
    3: FileType.SYMLINK,
    4: FileType.CHAR_DEVICE,
    5: FileType.BLOCK_DEVICE,
    6: FileType.FIFO,
    7: FileType.SOCKET,
}


@dataclass(frozen=True, slots=True)
class TtySize:
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class ExecSpec:
    """What to run: argv, and how. ``None`` fields take the image's own setting."""

    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    tty: TtySize | None = None


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_ms: float


@dataclass(frozen=True, slots=True)
class ExecExit:
    """How an interactive session's process ended: a code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None


@dataclass(frozen=True, slots=True)
class FileStat:
    path: str
    type: FileType
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    link_target: str | None = None


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What the dataplane knows of an instance's agent."""

    ready: bool
    version: str | None = None
