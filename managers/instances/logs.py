"""Bounded, resumable instance logs.

A log is a series of *segments*, files named by the global byte offset at which
they start (``app-000000004194304.log``). Appending past the segment size starts
a new segment and drops the oldest ones beyond the retention
(``LOG_RETENTION_BYTES``, :data:`DEFAULT_RETENTION_BYTES` by default), so a log
never holds much more than that, yet every byte keeps the global offset it was
written at. That offset is the SSE event id: a
client that reconnects with ``Last-Event-ID`` resumes exactly after the last line
it saw, across rotations and across dataplane restarts, with no index file to
keep consistent (the names are the index, and a rename-free rotation cannot be
half-done by a crash).

Readers only ever see complete lines; a line longer than :data:`MAX_LINE` is cut
into pieces so one runaway program cannot make a reader buffer without bound. A
resume from an offset that is not where a line (or a piece of a cut line) begins
moves on to the next one, and one from an offset rotated away says how many bytes
are gone (:meth:`SegmentedLog.resume`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio

SEGMENT_BYTES = 4 * 1024 * 1024
KEEP_SEGMENTS = 2
MAX_LINE = 64 * 1024
DEFAULT_RETENTION_BYTES = 64 * 1024 * 1024
MIN_RETENTION_BYTES = 1024 * 1024
_SEGMENT = re.compile(r"^(?P<source>[a-z]+)-(?P<start>\d{15})\.log$")


@dataclass(frozen=True, slots=True)
class LogLine:
    offset: int
    """Global offset just past this line: the id to resume after it."""
    text: bytes


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a resume from a client's offset starts, and how many bytes before it are gone."""

    offset: int
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class LogRead:
    """What a request reads first: lines, the offset after them, and for a resume whose
    offset was rotated away, how many bytes are gone and where it resumed."""

    lines: list[LogLine]
    position: int
    dropped: int = 0
    resumed_at: int | None = None


def layout(retention_bytes: int) -> tuple[int, int]:
    """(segment size, segments kept) holding about ``retention_bytes``: at most 4 MiB a
    segment, at least four segments, so rotation drops a small share at a time."""
    segment = max(2 * MAX_LINE, min(SEGMENT_BYTES, retention_bytes // 4))
    return segment, max(2, retention_bytes // segment)


@dataclass(frozen=True, slots=True)
class _Segment:
    start: int
    path: Path

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


class LogTally:
    """Bytes written to and dropped (by rotation) from every log, by source, since start-up.

    Appends run in worker threads, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._written: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def add(self, source: str, written: int, dropped: int) -> None:
        with self._lock:
            self._written[source] = self._written.get(source, 0) + written
            if dropped:
                self._dropped[source] = self._dropped.get(source, 0) + dropped

    def written(self) -> dict[str, int]:
        with self._lock:
            return dict(self._written)

    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)


class SegmentedLog:
    """One source's log (``app``, ``console``, ``vmm`` or ``dataplane``) in one folder."""

    def __init__(
        self,
        folder: Path,
        source: str,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        keep: int = KEEP_SEGMENTS,
        retention_bytes: int | None = None,
        tally: LogTally | None = None,
    ) -> None:
        self.folder = folder
        self.source = source
        self.segment_bytes = segment_bytes
        self.keep = keep
        if retention_bytes is not None:
            self.segment_bytes, self.keep = layout(retention_bytes)
        self.tally = tally

    def _segments(self) -> list[_Segment]:
        found: list[_Segment] = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = _SEGMENT.fullmatch(entry.name)
            if match and match["source"] == self.source:
                found.append(_Segment(int(match["start"]), Path(entry.path)))
        found.sort(key=lambda s: s.start)
        return found

    def end(self) -> int:
        segments = self._segments()
        if not segments:
            return 0
        return segments[-1].start + segments[-1].size()

    def start(self) -> int:
        segments = self._segments()
        return segments[0].start if segments else 0

    # -- writing --------------------------------------------------------------
    def append(self, data: bytes) -> None:
        """Append ``data``; a single writer per log is assumed (the pump or our logger)."""
        if not data:
            return
        original = data
        # Never its parents: a line about an instance being deleted must not bring its folder
        # back (the next start would find a folder without a record).
        self.folder.mkdir(exist_ok=True)
        segments = self._segments()
        if segments:
            current = segments[-1]
            size = current.size()
        else:
            current = _Segment(0, self._path(0))
            size = 0
        # A new segment starts only after a complete line, so no line is ever split
        # across two segments: a full segment takes the rest of its last line from ``data``
        # first. A line that never ends is cut at twice the size.
        if size > 0 and size + len(data) > self.segment_bytes:
            if not _ends_with_newline(current.path):
                newline = data.find(b"\n")
                if newline == -1 and size < 2 * self.segment_bytes:
                    _write(current.path, data)
                    self._count(len(data), 0)
                    return
                if newline != -1:
                    _write(current.path, data[: newline + 1])
                    size += newline + 1
                    data = data[newline + 1 :]
            if data:
                current = _Segment(current.start + size, self._path(current.start + size))
                segments.append(current)
        _write(current.path, data)
        dropped = 0
        for old in segments[: -self.keep]:
            dropped += old.size()
            old.path.unlink(missing_ok=True)
        self._count(len(original), dropped)

    def _count(self, written: int, dropped: int) -> None:
        if self.tally is not None:
            self.tally.add(self.source, written, dropped)

    def _path(self, start: int) -> Path:
        return self.folder / f"{self.source}-{start:015d}.log"

    # -- reading --------------------------------------------------------------
    def read_lines(self, offset: int, *, final: bool = False) -> tuple[list[LogLine], int]:
        """Complete lines from ``offset`` on, and the offset to continue from.

        An offset older than the oldest segment (rotated away) continues from the
        oldest byte still kept. With ``final``, a trailing partial line is returned too.
        """
        segments = self._segments()
        if not segments:
            return [], offset
        lines: list[LogLine] = []
        position = max(offset, segments[0].start)
        for index, segment in enumerate(segments):
            # A segment may be rotated away between listing and reading: skip it and
            # go on from where the next one starts.
            position = max(position, segment.start)
            size = segment.size()
            end = segment.start + size
            if position >= end:
                continue
            try:
                with segment.path.open("rb") as handle:
                    handle.seek(position - segment.start)
                    data = handle.read(end - position)
            except FileNotFoundError:
                continue
            last_segment = index == len(segments) - 1
            consumed = _split_lines(data, position, lines, final=final and last_segment)
            position += consumed
            if consumed < len(data):
                # A partial line at the end of a segment that is no longer written to
                # (a newer one exists) is complete as far as it will ever be.
                if not last_segment:
                    lines.append(LogLine(end, data[consumed:]))
                    position = end
                else:
                    break
        return lines, position

    def read_bytes(self, offset: int, limit: int) -> tuple[int, bytes]:
        """Up to ``limit`` bytes exactly as written, contiguous, and the global offset of the
        first: ``offset``, or later when the bytes there were rotated away (the caller sees
        the gap). Empty at the end."""
        out = bytearray()
        position = offset
        first: int | None = None
        for segment in self._segments():
            if len(out) >= limit:
                break
            end = segment.start + segment.size()
            if first is not None and segment.start != position:
                break  # a segment went between two reads: stop at the gap
            position = max(position, segment.start)
            if position >= end:
                continue
            try:
                with segment.path.open("rb") as handle:
                    handle.seek(position - segment.start)
                    data = handle.read(min(end - position, limit - len(out)))
            except FileNotFoundError:
                if first is not None:
                    break
                continue
            if first is None:
                first = position
            out += data
            position += len(data)
        return (offset if first is None else first), bytes(out)

    def resume(self, offset: int) -> Resume:
        """Where to continue for a client that saw everything before ``offset``.

        An offset rotated away continues from the oldest byte kept, saying how many bytes
        are gone; one past the end from the end; one inside a line from the next place a
        line (or a piece of a line cut at :data:`MAX_LINE`) begins, as if the client had seen
        the whole line.
        """
        segments = self._segments()
        if not segments:
            return Resume(0)
        oldest = segments[0].start
        if offset < oldest:
            return Resume(oldest, oldest - offset)
        for segment in reversed(segments):
            if offset >= segment.start:
                break
        if offset == segment.start:
            return Resume(offset)
        try:
            with segment.path.open("rb") as handle:
                return Resume(_next_boundary(handle, segment.start, offset))
        except FileNotFoundError:
            return Resume(self.start())

    def tail(self, count: int, *, final: bool = False) -> tuple[list[LogLine], int]:
        """The last ``count`` complete lines and the offset after them."""
        # Read backwards in growing windows until enough lines are found.
        end = self.end()
        window = 16 * 1024
        while True:
            start = max(self.start(), end - window)
            lines, position = self.read_lines(start, final=final)
            if start > self.start() and lines:
                lines = lines[1:]  # the first may be the tail of a cut line
            if len(lines) >= count or start <= self.start():
                return (lines[-count:] if count > 0 else []), position
            window *= 4

    async def follow(
        self,
        offset: int,
        *,
        poll_seconds: float = 0.1,
        written: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[list[LogLine]]:
        """Batches of new lines as they are written; an empty batch when a poll found none.

        Polling a file's size is cheap and works for every writer (our pump, our own
        logger) without inotify plumbing; the poll interval bounds the added latency.
        ``written``, when given, returns once the writer has written something, which ends
        the wait early (the pump's cue, so a line does not wait for the poll as well).
        """
        position = offset
        while True:
            lines, position = await anyio.to_thread.run_sync(self.read_lines, position)
            yield lines
            if lines:
                continue
            with anyio.move_on_after(poll_seconds):
                await (anyio.sleep_forever() if written is None else written())


def _split_lines(data: bytes, base: int, out: list[LogLine], *, final: bool) -> int:
    """Append the lines in ``data`` (starting at global ``base``) to ``out``; return bytes used."""
    used = 0
    length = len(data)
    while used < length:
        newline = data.find(b"\n", used, used + MAX_LINE)
        if newline == -1:
            if length - used >= MAX_LINE:
                cut = used + MAX_LINE
                out.append(LogLine(base + cut, data[used:cut]))
                used = cut
                continue
            if final:
                out.append(LogLine(base + length, data[used:]))
                used = length
            break
        out.append(LogLine(base + newline + 1, data[used:newline]))
        used = newline + 1
    return used


def _next_boundary(handle: IO[bytes], start: int, offset: int) -> int:
    """The first offset at or after ``offset`` where ``read_lines`` would begin a line, in
    the segment open as ``handle`` (which begins at global ``start`` with a line)."""
    size = os.fstat(handle.fileno()).st_size
    local = min(offset - start, size)
    # Find where the line holding ``offset`` began: the byte after the last newline before
    # it, or the segment's start. Lines are cut every MAX_LINE bytes from there.
    line_start = 0
    window = local
    while window > 0:
        low = max(0, window - MAX_LINE)
        handle.seek(low)
        newline = handle.read(window - low).rfind(b"\n")
        if newline != -1:
            line_start = low + newline + 1
            break
        window = low
    into = local - line_start
    if into % MAX_LINE == 0:
        return start + local
    cut = line_start + (into // MAX_LINE + 1) * MAX_LINE
    handle.seek(local)
    newline = handle.read(max(0, min(cut, size) - local)).find(b"\n")
    if newline != -1:
        return start + local + newline + 1
    return start + min(cut, size)


def _ends_with_newline(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except OSError:
        return True


def _write(path: Path, data: bytes) -> None:
    if data:
        with open(path, "ab", opener=_private) as handle:
            handle.write(data)


def _private(path: str, flags: int) -> int:
    """Open a new segment readable by root alone: the guest's output is guest data."""
    return os.open(path, flags, 0o600)
