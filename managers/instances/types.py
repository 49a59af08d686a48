"""Value types of the instances subsystem."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from managers.instances.errors import InvalidInstanceSpec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOG_SOURCES = ("app", "vmm", "dataplane")


class InstanceState(enum.StrEnum):
    """Derived on every read, never stored (see the package README)."""

    CREATED = "Created"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    STOPPED = "Stopped"
    STANDBY = "Standby"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class CreateRequest:
    name: str
    image: str
    vcpus: int = 1
    memory_mb: int = 256
    memory_max_mb: int | None = None
    overlay_size_mb: int = 1024
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str | None = None
    network: bool = False
    hypervisor: str | None = None
    start: bool = True

    def check(self) -> None:
        """Reject what no VM could be made of, before anything is touched."""
        problems: list[str] = []
        if len(self.name) > 63 or not NAME_RE.fullmatch(self.name):
            problems.append(
                "name must be 1-63 lower-case letters, digits or '-', "
                "starting and ending with a letter or digit"
            )
        if not 1 <= self.vcpus <= 64:
            problems.append("vcpus must be from 1 to 64")
        if not 64 <= self.memory_mb <= 262144:
            problems.append("memory_mb must be from 64 to 262144")
        if self.memory_max_mb is not None and not (self.memory_mb <= self.memory_max_mb <= 262144):
            problems.append("memory_max_mb must be at least memory_mb and at most 262144")
        if not 16 <= self.overlay_size_mb <= 1048576:
            problems.append("overlay_size_mb must be from 16 to 1048576")
        for key, value in self.env.items():
            if not _ENV_KEY.fullmatch(key):
                problems.append(f"env name {key!r} is not a valid variable name")
            if "\0" in value:
                problems.append(f"env {key} contains a NUL byte")
        for label, argv in (("entrypoint", self.entrypoint), ("cmd", self.cmd)):
            if argv is not None and any("\0" in arg for arg in argv):
                problems.append(f"{label} contains a NUL byte")
        if self.workdir is not None and not self.workdir.startswith("/"):
            problems.append("workdir must be an absolute path")
        if problems:
            raise InvalidInstanceSpec("; ".join(problems), {"problems": problems})


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """What the guest's serial markers told us about the current boot."""

    boot: int = 0
    program_started_at: str | None = None
    exited_at: str | None = None
    exit_code: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "boot": self.boot,
            "program_started_at": self.program_started_at,
            "exited_at": self.exited_at,
            "exit_code": self.exit_code,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuestStatus:
        return cls(
            boot=int(data.get("boot", 0)),
            program_started_at=data.get("program_started_at"),
            exited_at=data.get("exited_at"),
            exit_code=data.get("exit_code"),
            error=data.get("error"),
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance as callers see it: its stored record plus the derived state."""

    record: dict[str, Any]
    state: InstanceState
    guest: GuestStatus
    pid: int | None = None

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def name(self) -> str:
        return str(self.record["name"])
