"""Where a VMM's files live inside an instance's work directory.

The names are ``managers.paths``'s (the one owner of the on-disk layout), so
``Paths.instance_dir(id)`` can be passed as the workdir. ``vmm.json`` records the process (pid and
kernel start time, to tell a live VMM from a recycled pid) and backend-specific facts needed to
re-attach after a dataplane restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from managers.atomic import write_json_atomic
from managers.paths import VMM_AGENT_SOCKET, VMM_EVENTS, VMM_LOG, VMM_RECORD, VMM_SOCKET

from .errors import InvalidRequest

# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class VmmFiles:
    workdir: Path

    @property
    def socket(self) -> Path:
        return self.workdir / VMM_SOCKET

    @property
    def agent_socket(self) -> Path:
        """The host end of the guest agent's channel."""
        return self.workdir / VMM_AGENT_SOCKET

    @property
    def events(self) -> Path:
        return self.workdir / VMM_EVENTS

    @property
    def record(self) -> Path:
        return self.workdir / VMM_RECORD

    @property
    def log(self) -> Path:
        return self.workdir / VMM_LOG

    def check(self, instance_id: str) -> None:
        if not self.workdir.is_absolute():
            raise InvalidRequest(instance_id, f"workdir {str(self.workdir)!r} must be absolute")
        for socket in (self.socket, self.agent_socket):
            if len(str(socket).encode()) > _MAX_SOCKET_PATH:
                raise InvalidRequest(
                    instance_id,
                    f"socket path {str(socket)!r} is longer than a Unix socket allows",
                )

    def prepare(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # A socket left by a VMM that died makes the next one fail to bind.
        self.socket.unlink(missing_ok=True)
        self.agent_socket.unlink(missing_ok=True)

    def write_record(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record, record)

    def read_record(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remove_runtime(self) -> None:
        """Forget the process: socket and record. Logs and event history stay."""
        self.socket.unlink(missing_ok=True)
        self.agent_socket.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)

    def log_tail(self, limit: int = 400) -> str:
        """The last ``limit`` bytes of the VMM's log; only those are read, however long it is."""
        try:
            with self.log.open("rb") as handle:
                handle.seek(max(handle.seek(0, 2) - limit, 0))
                data = handle.read(limit)
        except OSError:
            return ""
        return data.decode(errors="replace").strip()
