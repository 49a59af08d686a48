"""The log pump: raw VMM output files -> bounded instance logs, and guest markers -> status.

The VMM writes the guest's serial console and its own stdout/stderr to plain
files it owns. One pump per instance copies what is new into the segmented
``app`` and ``vmm`` logs (which rotate, keep global offsets and survive
restore, so before and after a standby are one stream), and reads the init's
markers on the way to tell when the program started and how it exited.

Its position in each raw file is saved in ``pump.json`` so a restarted
dataplane continues where it stopped; a raw file that shrank or has another
inode is read from its beginning, and so is the new serial file of a new VMM
(the old one is removed first and the pump told so: :meth:`LogPump.new_serial`).

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
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from managers.atomic import write_json_atomic
from managers.clock import now_iso
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

    def reset(self, inode: int = -1) -> None:
        """Read the file from its start; -1 matches no file, so the next one is new."""
        self.inode = inode
        self.offset = 0
        self.partial = b""
        self.punched = 0

    def read_new(self) -> bytes:
        try:
            stat = os.stat(self.raw)
        except FileNotFoundError:
            return b""
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.reset(stat.st_ino)
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
        # The pump loop, a reader catching up before it answers, and the manager
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

    def new_serial(self) -> None:
        """The serial file was removed and a new VMM will write a new one: read it from 0.

        Its inode cannot tell them apart: a new file often gets the number the removed one had,
        and a new boot's output the same length as the old would then never be read.
        """
        with self._lock:
            self._serial.reset()
            self._save()

    def new_boot(self) -> GuestStatus:
        """The guest is about to boot again (a new VMM, or a reboot): forget the old boot."""
        with self._lock:
            self.status = GuestStatus(boot=self.status.boot + 1)
            write_json_atomic(self._status_file, self.status.to_dict())
            return self.status

    def drain(self, *, whole: bool = True) -> bool:
        """Copy what is new; True when anything was copied. Thread-safe.

        ``whole=False`` copies at most one chunk per file, so a guest that writes as
        fast as it is copied cannot hold the caller (the next pass continues)."""
        with self._lock:
            return self._drain(whole)

    def _drain(self, whole: bool) -> bool:
        moved = False
        while True:
            serial = self._serial.read_new()
            vmm = self._vmm.read_new()
            if serial:
                self._scan(serial)
            if not serial and not vmm:
                break
            moved = True
            if not whole:
                break
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


class Drainable(Protocol):
    @property
    def booting(self) -> bool: ...

    def drain(self, *, whole: bool = True) -> bool: ...


class PumpSet:
    """The pumps of every running instance, drained together in one worker thread.

    Every pump is drained each ``poll_seconds`` (two ``stat`` calls when nothing is
    new); in between, only those that need it: a pump that just copied something is
    drained again at once (one chunk per pass, so a chatty guest holds no one up),
    and one whose program, added in the last ``BOOT_WATCH_SECONDS``, has yet to
    start every ``booting_poll_seconds``, since the moment its marker is read is the
    moment its instance reads Running.
    """

    def __init__(self, poll_seconds: float = 0.1, booting_poll_seconds: float = 0.02) -> None:
        self._poll = poll_seconds
        self._booting_poll = booting_poll_seconds
        # key -> (pump, until when its boot is watched closely); changed under _guard,
        # which the worker takes only to look a pump up, never while draining.
        self._pumps: dict[str, tuple[Drainable, float]] = {}
        self._guard = threading.Lock()
        self._current: str | None = None
        self._failing: set[str] = set()
        self._added = anyio.Event()

    def __contains__(self, key: str) -> bool:
        return key in self._pumps

    def add(self, key: str, pump: Drainable) -> None:
        with self._guard:
            if key in self._pumps:
                return
            self._pumps[key] = (pump, anyio.current_time() + BOOT_WATCH_SECONDS)
        self._added.set()

    async def remove(self, key: str) -> None:
        """Stop draining ``key``; once this returns, no drain of it runs or will run.

        Waits at most for that one pump's pass, never for the rest of a batch."""
        with self._guard:
            self._pumps.pop(key, None)
        while self._current == key:  # noqa: ASYNC110 - set by the worker thread
            await anyio.sleep(0.001)

    async def run(self) -> None:
        """Drain until cancelled (a pass under way finishes first)."""
        hot: set[str] = set()
        full_at = 0.0
        while True:
            if not self._pumps:
                await self._added.wait()
                self._added = anyio.Event()
            now = anyio.current_time()
            if now >= full_at:
                keys = list(self._pumps)
                full_at = now + self._poll
            else:
                keys = [k for k in self._pumps if k in hot or self._watched(k, now)]
            hot = await anyio.to_thread.run_sync(self._drain, keys) if keys else set()
            if hot:
                await anyio.lowlevel.checkpoint()
                continue
            wake = full_at
            if any(self._watched(k, now) for k in self._pumps):
                wake = min(wake, now + self._booting_poll)
            with anyio.move_on_after(max(0.0, wake - anyio.current_time())):
                await self._added.wait()
            self._added = anyio.Event()

    def _watched(self, key: str, now: float) -> bool:
        entry = self._pumps.get(key)
        return entry is not None and now < entry[1] and entry[0].booting

    def _drain(self, keys: list[str]) -> set[str]:
        """In the worker thread: one pass over ``keys``; the keys that copied something."""
        moved: set[str] = set()
        for key in keys:
            with self._guard:
                entry = self._pumps.get(key)
                self._current = key if entry is not None else None
            if entry is None:
                continue  # removed since the batch was chosen
            try:
                if entry[0].drain(whole=False):
                    moved.add(key)
                if key in self._failing:
                    self._failing.discard(key)
                    log.info("log pump works again", extra={"instance_id": key})
            except Exception:
                # One instance's trouble (its folder gone, a full disk) must not keep the
                # others' output from being copied, nor fill the log at every pass.
                if key not in self._failing:
                    self._failing.add(key)
                    log.exception("log pump failed", extra={"instance_id": key})
            finally:
                self._current = None
        return moved


def read_status(path: Path) -> GuestStatus:
    """The guest status of the current boot; a damaged file only forgets it (logs stay)."""
    try:
        data = json.loads(path.read_text())
        return GuestStatus.from_dict(data) if isinstance(data, dict) else GuestStatus()
    except (OSError, ValueError, TypeError):
        return GuestStatus()
