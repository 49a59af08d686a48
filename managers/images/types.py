"""Value types of the images subsystem. Everything here is immutable and JSON-friendly."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

DiskFormat = Literal["erofs", "ext4"]
DISK_FORMATS: tuple[DiskFormat, ...] = ("erofs", "ext4")
PROGRESS_INTERVAL = 0.25
"""Seconds between two progress updates of a build; a reader sampling faster sees nothing new."""


class ImageStatus(enum.StrEnum):
    PENDING = "pending"
    PULLING = "pulling"
    UNPACKING = "unpacking"
    CONVERTING = "converting"
    READY = "ready"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (ImageStatus.READY, ImageStatus.FAILED)


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of the current phase; bytes are compressed blob bytes while pulling/unpacking."""

    phase: str = "pending"
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of the OCI image config a VM needs to run the image's program."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "exposed_ports": list(self.exposed_ports),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(
            entrypoint=tuple(data.get("entrypoint", ())),
            cmd=tuple(data.get("cmd", ())),
            env=tuple(data.get("env", ())),
            workdir=str(data.get("workdir", "")),
            user=str(data.get("user", "")),
            exposed_ports=tuple(data.get("exposed_ports", ())),
        )


@dataclass(frozen=True, slots=True)
class Image:
    """A snapshot of one image (keyed by ``digest``) as the API shows it."""

    name: str
    digest: str
    status: ImageStatus
    format: DiskFormat
    created_at: str
    updated_at: str
    progress: Progress = field(default_factory=Progress)
    error: str | None = None
    disk_path: Path | None = None
    size: int | None = None
    config: ImageConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "status": str(self.status),
            "format": self.format,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "progress": asdict(self.progress),
            "error": self.error,
            "disk_path": str(self.disk_path) if self.disk_path else None,
            "size": self.size,
            "config": self.config.to_dict() if self.config else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        progress = data.get("progress") or {}
        config = data.get("config")
        disk = data.get("disk_path")
        return cls(
            name=str(data["name"]),
            digest=str(data["digest"]),
            status=ImageStatus(data["status"]),
            format=_disk_format(data.get("format", "erofs")),
            created_at=str(data["created_at"]),
            updated_at=str(data["updated_at"]),
            progress=Progress(
                phase=str(progress.get("phase", "pending")),
                bytes_done=int(progress.get("bytes_done", 0)),
                bytes_total=int(progress.get("bytes_total", 0)),
            ),
            error=data.get("error"),
            disk_path=Path(disk) if disk else None,
            size=data.get("size"),
            config=ImageConfig.from_dict(config) if config else None,
        )


class BuildObserver(Protocol):
    """Told how each build ended: the edge makes metrics of it, the manager knows not how."""

    def build_finished(self, pull_seconds: float, pulled_bytes: int, total_seconds: float) -> None:
        """A build is ready: how long its pull took, what it downloaded, how long in all."""

    def build_failed(self, reason: str) -> None:
        """A build failed; ``reason`` is an error code, one of a small fixed set."""


def _disk_format(value: object) -> DiskFormat:
    if value == "ext4":
        return "ext4"
    return "erofs"
