"""The node's event log: append-only JSON-lines segments under ``DATA_DIR/events/log/``.

Each event is one line, written and fsynced before :meth:`EventLog.append` returns, so an event
anyone has seen (a webhook, a stream) is on disk. A crash mid-write leaves at most a torn last
line, which the next start cuts off: that event was never acknowledged to anyone. Segments roll
at ``SEGMENT_BYTES``; whole segments past the retention (bytes, age) are dropped, oldest first,
when a segment rolls and at start-up (the newest segment always stays).

``resources.json`` keeps, for every resource the log has spoken of, the type of its last event:
written when segments are dropped (before they go), it lets start-up know what was announced
even about resources whose events aged out, so reconciliation never repeats an old event.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio

from managers.atomic import fsync_dir, write_atomic, write_json_atomic
from managers.paths import Paths
from managers.quarantine import quarantine

from .types import Event

log = logging.getLogger("dataplane.events")

SEGMENT_BYTES = 4 << 20
_PREFIX = "events-"
_SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class Retention:
    max_bytes: int = 256 << 20
    max_age_seconds: float = 7 * 24 * 3600.0


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    size: int
    # (seq, byte offset) of every event in it, for resuming without a scan.
    offsets: list[tuple[int, int]] = field(default_factory=list)
    last_time: float = 0.0


class EventLog:
    """Append, read from a sequence number, and wait for what comes next."""

    def __init__(self, paths: Paths, retention: Retention | None = None) -> None:
        self.root = paths.root / "events"
        self.dir = self.root / "log"
        self.retention = retention or Retention()
        self._segments: list[_Segment] = []
        self._next_seq = 1
        self._tag = ""
        self._appended = anyio.Event()
        self._handle: int | None = None
        # The last event type per resource key ("instance:<id>", "image:<name>").
        self.last_types: dict[str, str] = {}
        self.dropped_events = 0

    # -- start-up ---------------------------------------------------------------------
    def open(self) -> None:
        """Load the segments (cutting a torn tail), the tag and the resource index. Blocking."""
        self.root.mkdir(exist_ok=True, mode=0o700)
        self.dir.mkdir(exist_ok=True, mode=0o700)
        tag_file = self.root / "tag"
        try:
            self._tag = tag_file.read_text().strip()
        except FileNotFoundError:
            self._tag = ""
        if len(self._tag) != 8:
            self._tag = secrets.token_hex(4)
            write_atomic(tag_file, self._tag.encode() + b"\n")
        index = self.root / "resources.json"
        index_seq = 0
        try:
            saved = json.loads(index.read_text())
            self.last_types = {str(k): str(v) for k, v in saved["last_types"].items()}
            index_seq = int(saved["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            self.last_types = {}
        names = sorted(p for p in self.dir.iterdir() if p.name.startswith(_PREFIX))
        for position, path in enumerate(names):
            segment = self._load(path, last=position == len(names) - 1)
            if segment is None:
                continue
            self._segments.append(segment)
        for event in self.read_from(index_seq + 1):
            self.last_types[self.key(event)] = str(event.type)
        if self._segments and self._segments[-1].offsets:
            self._next_seq = self._segments[-1].offsets[-1][0] + 1
        elif self._segments:
            self._next_seq = self._segments[-1].first_seq
        self._next_seq = max(self._next_seq, index_seq + 1)
        self._enforce_retention()

    def _load(self, path: Path, *, last: bool) -> _Segment | None:
        try:
            first = int(path.name[len(_PREFIX) : -len(_SUFFIX)])
        except ValueError:
            return None
        segment = _Segment(path, first, 0)
        good = 0
        with path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                    seq = int(record["seq"])
                    stamp = str(record["timestamp"])
                except (ValueError, KeyError, TypeError):
                    if last and not line.endswith(b"\n"):
                        break  # a torn last line: never acknowledged, cut below
                    self._quarantine(path, f"line at byte {good} is not an event")
                    return None
                segment.offsets.append((seq, good))
                segment.last_time = seconds_of(stamp)
                good += len(line)
        if good != path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())
        segment.size = good
        return segment

    def _quarantine(self, path: Path, reason: str) -> None:
        holder = self.dir / f".bad-{path.name}"
        holder.mkdir(exist_ok=True)
        path.rename(holder / path.name)
        moved = quarantine(Paths(self.root.parent), "events", holder, reason)
        log.error("event log segment %s quarantined at %s: %s", path.name, moved, reason)
        # Its events' numbers may be handed out again: a new tag keeps the new ids distinct.
        self._tag = secrets.token_hex(4)
        write_atomic(self.root / "tag", self._tag.encode() + b"\n")

    # -- writing ----------------------------------------------------------------------
    @staticmethod
    def key(event: Event) -> str:
        return f"{event.kind}:{event.resource_id}"

    def event_id(self, seq: int) -> str:
        return f"evt_{seq:016x}{self._tag}"

    @staticmethod
    def seq_of(event_id: str) -> int | None:
        """The sequence number an event id carries; None for anything else."""
        if not event_id.startswith("evt_") or len(event_id) != 28:
            return None
        try:
            return int(event_id[4:20], 16)
        except ValueError:
            return None

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still kept (``next_seq`` when the log is empty)."""
        for segment in self._segments:
            if segment.offsets:
                return segment.offsets[0][0]
        return self._next_seq

    def append(self, build: Callable[[int, str], Event]) -> Event:
        """Write the event ``build(seq, id)`` makes, durably, and return it. Blocking."""
        seq = self._next_seq
        event = build(seq, self.event_id(seq))
        line = json.dumps(event.to_record(), separators=(",", ":"), ensure_ascii=False) + "\n"
        data = line.encode()
        segment = self._current(len(data))
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        segment.offsets.append((seq, segment.size))
        segment.size += len(data)
        segment.last_time = time.time()
        self._next_seq = seq + 1
        self.last_types[self.key(event)] = str(event.type)
        return event

    def _current(self, size: int) -> _Segment:
        if self._segments and self._segments[-1].size + size <= SEGMENT_BYTES:
            return self._segments[-1]
        path = self.dir / f"{_PREFIX}{self._next_seq:020d}{_SUFFIX}"
        segment = _Segment(path, self._next_seq, 0)
        path.touch(mode=0o600)
        fsync_dir(self.dir)
        self._segments.append(segment)
        self._enforce_retention()
        return segment

    def _enforce_retention(self) -> None:
        now = time.time()
        while len(self._segments) > 1:
            oldest = self._segments[0]
            total = sum(s.size for s in self._segments)
            too_big = total > self.retention.max_bytes
            too_old = oldest.last_time and now - oldest.last_time > self.retention.max_age_seconds
            if not (too_big or too_old):
                return
            # The index first: what the dropped events announced must not be forgotten.
            write_json_atomic(
                self.root / "resources.json",
                {"seq": self._next_seq - 1, "last_types": self.last_types},
            )
            oldest.path.unlink(missing_ok=True)
            self._segments.pop(0)

    def notify(self) -> None:
        """Wake every reader waiting for an event (call on the event loop after appends)."""
        self._appended.set()
        self._appended = anyio.Event()

    async def wait_after(self, seq: int) -> None:
        """Return once an event after ``seq`` exists."""
        while self._next_seq <= seq + 1:
            await self._appended.wait()

    # -- reading ----------------------------------------------------------------------
    def read_from(self, seq: int, limit: int | None = None) -> Iterator[Event]:
        """Events from ``seq`` on (or from the oldest kept, if ``seq`` is older). Blocking."""
        count = 0
        for segment in list(self._segments):
            if not segment.offsets or segment.offsets[-1][0] < seq:
                continue
            start = next((offset for s, offset in segment.offsets if s >= seq), None)
            if start is None:
                continue
            try:
                with segment.path.open("rb") as handle:
                    handle.seek(start)
                    for line in handle:
                        if not line.endswith(b"\n"):
                            break
                        event = Event.from_record(json.loads(line))
                        if event.seq < seq:
                            continue
                        yield event
                        count += 1
                        if limit is not None and count >= limit:
                            return
            except FileNotFoundError:
                continue  # dropped by retention while we read


def seconds_of(stamp: str) -> float:
    """The POSIX time of an RFC 3339 timestamp (0 for one that does not parse)."""
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
