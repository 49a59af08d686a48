"""The log pump: raw VMM output files -> bounded instance logs, and guest markers -> status.

The VMM writes the guest's serial console and its own stdout/stderr to plain
files it owns. One pump per instance copies what is new into the segmented
``app`` and ``vmm`` logs (which rotate, keep global offsets and survive
restore, so before and after a standby are one stream), and reads the init's
markers on the way to tell when the program started and how it exited.

Its position in each raw file is saved in ``pump.json`` so a restarted
dataplane continues where it stopped; a raw file that shrank or was replaced
(a new VMM truncates it) is read from its beginning.

The pumps of all running instances are driven by one :class:`PumpSet`: a single
worker-thread hop per tick drains them all, where a task per instance cost a hop
per instance per tick (100 idle instances kept most of a core busy).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from managers.atomic import write_json_atomic
from managers.guest import MarkerKind, parse_marker
from managers.instances.logs import SegmentedLog
from managers.instances.types import GuestStatus

log = logging.getLogger("managers.instances.pump")

CHUNK = 256 * 1024
# How long after the pump starts it watches closely for the program to start.
BOOT_WATCH_SECONDS = 60.0
# Once this much of a raw file has been copied, its blocks are given back to the
# filesystem (a hole is punched): the file keeps its size and the VMM its write
# offset, so this is safe whatever mode the VMM opened the file in, and the disk
# space of a chatty guest stays bounded between two boots.
PUNCH_BYTES = 1024 * 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(path: Path, start: int, end: int) -> bool:
    """Free the blocks of ``[start, end)`` without changing the file's size."""
    fd = os.open(path, os.O_WRONLY)
    try:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        return bool(_libc.fallocate(fd, mode, start, end - start) == 0)
    finally:
        os.close(fd)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Source:
    def __init__(self, raw: Path, target: SegmentedLog) -> None:
        self.raw = raw
        self.target = target
        self.inode = 0
        self.offset = 0
        self.partial = b""
        self.punched = 0

    def state(self) -> dict[str, int]:
        return {"inode": self.inode, "offset": self.offset}

    def restore(self, data: dict[str, Any]) -> None:
        self.inode = int(data.get("inode", 0))
        self.offset = int(data.get("offset", 0))

    def read_new(self) -> bytes:
        try:
            stat = os.stat(self.raw)
        except FileNotFoundError:
            return b""
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.inode = stat.st_ino
            self.offset = 0
            self.partial = b""
            self.punched = 0
        if stat.st_size == self.offset:
            return b""
        with self.raw.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read(min(CHUNK, stat.st_size - self.offset))
        self.offset += len(data)
        self.target.append(data)
        if self.offset - self.punched >= PUNCH_BYTES:
            end = self.offset - self.offset % 4096
            with contextlib.suppress(OSError):
                if punch_hole(self.raw, self.punched, end):
                    self.punched = end
        return data


class LogPump:
    def __init__(
        self,
        *,
        serial_raw: Path,
        vmm_raw: Path,
        app_log: SegmentedLog,
        vmm_log: SegmentedLog,
        state_file: Path,
        status_file: Path,
        on_status: Callable[[GuestStatus], None] | None = None,
    ) -> None:
        self._serial = _Source(serial_raw, app_log)
        self._vmm = _Source(vmm_raw, vmm_log)
        self._state_file = state_file
        self._status_file = status_file
        self._on_status = on_status
        # The pump task, a reader catching up before it answers, and the manager
        # between two boots all drain; one at a time, or bytes are copied twice.
        self._lock = threading.Lock()
        self.status = read_status(status_file)
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict):
            self._serial.restore(data.get("serial") or {})
            self._vmm.restore(data.get("vmm") or {})

    def _save(self) -> None:
        write_json_atomic(
            self._state_file, {"serial": self._serial.state(), "vmm": self._vmm.state()}
        )

    @property
    def booting(self) -> bool:
        """The program has neither started nor ended yet."""
        status = self.status
        return status.program_started_at is None and status.exited_at is None

    def new_boot(self) -> GuestStatus:
        """A new VMM is about to write the serial file from its start: forget the old boot."""
        with self._lock:
            self.status = GuestStatus(boot=self.status.boot + 1)
            write_json_atomic(self._status_file, self.status.to_dict())
            return self.status

    def drain(self) -> bool:
        """Copy everything new once; True when anything was copied. Thread-safe."""
        with self._lock:
            return self._drain()

    def _drain(self) -> bool:
        moved = False
        while True:
            serial = self._serial.read_new()
            vmm = self._vmm.read_new()
            if serial:
                self._scan(serial)
            if not serial and not vmm:
                break
            moved = True
        if moved:
            self._save()
        return moved

    def _scan(self, data: bytes) -> None:
        text = self._serial.partial + data
        lines = text.split(b"\n")
        self._serial.partial = lines.pop()[-4096:]
        status = self.status
        for raw in lines:
            if b"@@dataplane-guest@@" not in raw:
                continue
            marker = parse_marker(raw.decode("utf-8", "replace"))
            if marker is None:
                continue
            if marker.kind is MarkerKind.PROGRAM_STARTED:
                status = replace(status, program_started_at=now_iso())
            elif marker.kind is MarkerKind.PROGRAM_EXITED:
                status = replace(status, exited_at=now_iso(), exit_code=marker.exit_code)
            elif marker.kind is MarkerKind.ERROR:
                detail = f": {marker.detail}" if marker.detail else ""
                status = replace(status, exited_at=now_iso(), error=f"{marker.reason}{detail}")
        if status != self.status:
            self.status = status
            write_json_atomic(self._status_file, status.to_dict())
            if self._on_status is not None:
                self._on_status(status)


class PumpSet:
    """The pumps of every running instance, drained together in one worker thread.

    A tick drains every pump (two ``stat`` calls each when nothing is new). Ticks
    come every ``poll_seconds``; every ``booting_poll_seconds`` while some program
    added in the last ``BOOT_WATCH_SECONDS`` has yet to start, since the moment its
    marker is read is the moment its instance reads Running; and at once again when
    a drain copied something, so a chatty guest is followed as fast as it writes.
    """

    def __init__(self, poll_seconds: float = 0.1, booting_poll_seconds: float = 0.02) -> None:
        self._poll = poll_seconds
        self._booting_poll = booting_poll_seconds
        # key -> (pump, until when its boot is watched closely)
        self._pumps: dict[str, tuple[LogPump, float]] = {}
        self._added = anyio.Event()
        self._tick: tuple[frozenset[str], anyio.Event] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self._pumps

    def add(self, key: str, pump: LogPump) -> None:
        if key not in self._pumps:
            self._pumps[key] = (pump, anyio.current_time() + BOOT_WATCH_SECONDS)
            self._added.set()

    async def remove(self, key: str) -> None:
        """Stop draining ``key``; once this returns, no drain of it runs or will run."""
        self._pumps.pop(key, None)
        while (tick := self._tick) is not None and key in tick[0]:
            await tick[1].wait()

    async def run(self) -> None:
        """Drain until cancelled (a drain under way finishes first)."""
        while True:
            if not self._pumps:
                await self._added.wait()
                self._added = anyio.Event()
            batch = dict(self._pumps)
            done = anyio.Event()
            self._tick = (frozenset(batch), done)
            try:
                moved = await anyio.to_thread.run_sync(_drain_all, batch)
            finally:
                self._tick = None
                done.set()
            if moved:
                await anyio.lowlevel.checkpoint()
                continue
            now = anyio.current_time()
            booting = any(pump.booting and now < until for pump, until in batch.values())
            with anyio.move_on_after(self._booting_poll if booting else self._poll):
                await self._added.wait()
            self._added = anyio.Event()


def _drain_all(batch: dict[str, tuple[LogPump, float]]) -> bool:
    moved = False
    for key, (pump, _) in batch.items():
        # One instance's trouble (its folder removed under it, a full disk) must not
        # keep the others' output from being copied.
        try:
            moved |= pump.drain()
        except Exception:
            log.exception("log pump failed", extra={"instance_id": key})
    return moved


def read_status(path: Path) -> GuestStatus:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return GuestStatus()
    return GuestStatus.from_dict(data) if isinstance(data, dict) else GuestStatus()
