"""The log pump: raw VMM output files -> bounded instance logs, and guest markers -> status.

The VMM writes three plain files it owns: the guest's output channel (``output.raw``, the
program's stdout and stderr), its serial port (``serial.raw``: the kernel's console and the
init's markers) and its own stdout/stderr. One pump per instance copies what is new into the
segmented logs, which rotate, keep global offsets and survive restore, so before and after a
standby are one stream:

- the output channel, byte for byte, into ``app``;
- the serial port into ``console``, except the init's markers (and the blank line each marker
  starts with), which become the guest status (when the program started, how it exited) and
  structured lines of the ``dataplane`` log;
- the VMM's own output into ``vmm``.

An instance made before guests had an output channel (its config disk names none) still
writes its program's output to the serial port: that output is then in ``console``.

Its position in each raw file is saved in ``pump.json`` so a restarted dataplane continues
where it stopped; a raw file that shrank or has another inode is read from its beginning, and
so are the new files of a new VMM (the old ones are removed first and the pump told so:
:meth:`LogPump.new_vmm`).

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
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from managers.atomic import write_json_atomic
from managers.clock import now_iso
from managers.guest import Marker, MarkerKind, parse_marker
from managers.guest.markers import PREFIX
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
# A serial line longer than this without its newline is passed on as it is.
MAX_PENDING = 4096
_PREFIX = PREFIX.encode()
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
    def __init__(self, raw: Path, target: SegmentedLog | None) -> None:
        self.raw = raw
        self.target = target
        self.inode = 0
        self.offset = 0
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
        self.punched = 0

    def read_new(self) -> bytes:
        """What the VMM wrote since the last call, at most :data:`CHUNK` bytes; copied into
        the target log when there is one."""
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
        if self.target is not None:
            self.target.append(data)
        if self.offset - self.punched >= PUNCH_BYTES:
            end = self.offset - self.offset % 4096
            with contextlib.suppress(OSError):
                if punch_hole(self.raw, self.punched, end):
                    self.punched = end
        return data


class _SerialScanner:
    """Splits the serial port's bytes into markers and the rest, line by line.

    A line without its newline yet waits (up to :data:`MAX_PENDING` bytes, beyond which it is
    passed on as it is); an empty line waits for the next one, since a marker begins with one.
    """

    def __init__(self) -> None:
        self.partial = b""
        self.blank = False

    def reset(self) -> None:
        self.partial = b""
        self.blank = False

    def feed(self, data: bytes) -> tuple[bytes, list[Marker]]:
        """(the bytes for the ``console`` log, the markers found) in ``data``."""
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        kept: list[bytes] = []
        markers: list[Marker] = []
        for raw in lines:
            marker = (
                parse_marker(raw.decode("utf-8", "replace")) if raw.startswith(_PREFIX) else None
            )
            if marker is not None:
                markers.append(marker)
                self.blank = False
                continue
            if self.blank:
                kept.append(b"")
            self.blank = raw == b""
            if not self.blank:
                kept.append(raw)
        out = b"".join(line + b"\n" for line in kept)
        if len(self.partial) > MAX_PENDING:
            if self.blank:  # the blank line came first
                out += b"\n"
                self.blank = False
            out += self.partial
            self.partial = b""
        return out, markers

    def pending(self) -> bytes:
        """What is held back: a blank line and a line without its newline yet."""
        return (b"\n" if self.blank else b"") + self.partial

    def restore(self, pending: bytes) -> None:
        """Hold back ``pending`` again (what :meth:`pending` said before a restart)."""
        self.blank = pending.startswith(b"\n")
        self.partial = pending[1:] if self.blank else pending


class LogPump:
    def __init__(
        self,
        *,
        instance_id: str,
        serial_raw: Path,
        output_raw: Path,
        vmm_raw: Path,
        logs: Mapping[str, SegmentedLog],
        state_file: Path,
        status_file: Path,
        on_status: Callable[[GuestStatus], None] | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._serial = _Source(serial_raw, None)
        self._scanner = _SerialScanner()
        self._console_log = logs["console"]
        self._output = _Source(output_raw, logs["app"])
        self._vmm = _Source(vmm_raw, logs["vmm"])
        self._state_file = state_file
        self._status_file = status_file
        self._on_status = on_status
        # The pump loop, a reader catching up before it answers, and the manager
        # between two boots all drain; one at a time, or bytes are copied twice.
        self._lock = threading.Lock()
        self.status = read_status(status_file)
        self._load()

    def _sources(self) -> dict[str, _Source]:
        return {"serial": self._serial, "output": self._output, "vmm": self._vmm}

    def _load(self) -> None:
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict):
            for name, source in self._sources().items():
                source.restore(data.get(name) or {})
            pending = data.get("serial_pending")
            if isinstance(pending, str):
                # What was read but held back is past the saved offset: keep it held.
                self._scanner.restore(pending.encode("latin-1", "replace"))

    def _save(self) -> None:
        state: dict[str, object] = {
            name: source.state() for name, source in self._sources().items()
        }
        state["serial_pending"] = self._scanner.pending().decode("latin-1")
        write_json_atomic(self._state_file, state)

    @property
    def booting(self) -> bool:
        """The program has neither started nor ended yet."""
        status = self.status
        return status.program_started_at is None and status.exited_at is None

    def new_vmm(self) -> None:
        """The VMM's files were removed and a new VMM will write new ones: read them from 0.

        Their inodes cannot tell them apart: a new file often gets the number the removed one
        had, and a new boot's output the same length as the old would then never be read.
        """
        with self._lock:
            # The old VMM's last serial line, if it never ended, is as complete as it will be.
            if self._scanner.partial:
                self._console_log.append(self._scanner.partial + b"\n")
            self._serial.reset()
            self._scanner.reset()
            self._output.reset()
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
            # The serial port first: once it shows that the program exited, everything the
            # program wrote is already in the output file (the init relays the last of it
            # before the marker, and the VMM has written what it was handed: under TCG before
            # the guest's write returned, under KVM from its own thread microseconds later).
            serial = self._serial.read_new()
            output = self._output.read_new()
            vmm = self._vmm.read_new()
            if serial:
                self._scan(serial)
            if not serial and not output and not vmm:
                break
            moved = True
            if not whole:
                break
        if moved:
            self._save()
        return moved

    def _scan(self, data: bytes) -> None:
        text, markers = self._scanner.feed(data)
        self._console_log.append(text)
        status = self.status
        for marker in markers:
            status = self._apply(status, marker)
        if status != self.status:
            self.status = status
            write_json_atomic(self._status_file, status.to_dict())
            if self._on_status is not None:
                self._on_status(status)

    def _apply(self, status: GuestStatus, marker: Marker) -> GuestStatus:
        """The status after ``marker``, which also becomes a line of the ``dataplane`` log."""
        extra: dict[str, object] = {"instance_id": self._instance_id, "guest": str(marker.kind)}
        if marker.kind is MarkerKind.PROGRAM_STARTED:
            log.info("guest: the program started", extra=extra)
            return replace(status, program_started_at=now_iso())
        if marker.kind is MarkerKind.PROGRAM_EXITED:
            extra["exit_code"] = marker.exit_code
            log.info("guest: the program exited with code %s", marker.exit_code, extra=extra)
            return replace(status, exited_at=now_iso(), exit_code=marker.exit_code)
        if marker.kind is MarkerKind.ERROR:
            extra |= {"reason": marker.reason, "detail": marker.detail}
            detail = f": {marker.detail}" if marker.detail else ""
            log.warning("guest: %s%s", marker.reason, detail, extra=extra)
            return replace(status, exited_at=now_iso(), error=f"{marker.reason}{detail}")
        log.info("guest: the init started", extra=extra)
        return status


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
        # key -> the event the next drain that copies something of that key sets.
        self._copied: dict[str, anyio.Event] = {}

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
        copied = self._copied.pop(key, None)
        if copied is not None:
            copied.set()  # a follower waiting for it looks again (and finds why it ended)
        while self._current == key:  # noqa: ASYNC110 - set by the worker thread
            await anyio.sleep(0.001)

    async def copied(self, key: str) -> None:
        """Wait until a drain of ``key`` copies something (a follower's cue to read)."""
        event = self._copied.get(key)
        if event is None:
            event = self._copied[key] = anyio.Event()
        await event.wait()

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
            for key in hot:
                copied = self._copied.pop(key, None)
                if copied is not None:
                    copied.set()
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
