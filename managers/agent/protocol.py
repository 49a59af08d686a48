"""The host side of the guest agent's protocol: frames, records and message types.

``PROTOCOL.md`` beside this file is the contract; this module is the only place on the host
that encodes or decodes it (``managers/guest/init/agent_proto.h`` is the guest's).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import AgentProtocolError

MAGIC = b"DPGA"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 65536
WINDOW = 262144
MAX_SESSIONS = 64
# The longest HELLO_OK the host looks at while resynchronising: a nonce, a version and a short
# build name fit many times over, and a flood of plausible headers costs little to reject.
MAX_HELLO_OK = 256


class ProtocolError(AgentProtocolError):
    """The other side broke the framing or the flow control; the connection is unusable."""


class Msg(enum.IntEnum):
    HELLO = 0x01
    EXEC = 0x02
    DATA_IN = 0x03
    SIGNAL = 0x04
    RESIZE = 0x05
    CREDIT = 0x06
    WRITE_FILE = 0x07
    READ_FILE = 0x08
    STAT = 0x09
    SET_TIME = 0x0A
    CLOSE = 0x0B
    PING = 0x0C
    MOUNT = 0x0D
    UMOUNT = 0x0E
    HELLO_OK = 0x81
    STARTED = 0x82
    DATA_OUT = 0x83
    STDERR = 0x84
    EXIT = 0x85
    ERROR = 0x86
    DONE = 0x87
    STAT_RESULT = 0x88
    GUEST_CREDIT = 0x89
    PONG = 0x8A


class Tag(enum.IntEnum):
    NONCE = 1
    VERSION = 2
    AGENT = 3
    ARG = 4
    ENV = 5
    WORKDIR = 6
    USER = 7
    TTY = 8
    PATH = 9
    MODE = 10
    SIGNAL = 11
    EXIT_CODE = 12
    EXIT_SIGNAL = 13
    PID = 14
    TIME = 15
    STAT = 16
    LINK = 17
    CREDIT = 18
    ERRNO = 19
    MESSAGE = 20
    DEVICE = 21
    READONLY = 22


# Frames whose payload is raw bytes rather than records.
RAW = frozenset({Msg.DATA_IN, Msg.DATA_OUT, Msg.STDERR, Msg.PING, Msg.PONG})
# What the guest may send; anything else from it is a protocol error.
FROM_GUEST = frozenset(m for m in Msg if m >= 0x80)
# Guest messages that end a session.
FINAL = frozenset({Msg.EXIT, Msg.ERROR, Msg.DONE})


@dataclass(frozen=True, slots=True)
class Frame:
    type: Msg
    stream: int
    payload: bytes


def encode(kind: Msg, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame holds at most {MAX_PAYLOAD} bytes, not {len(payload)}")
    return HEADER.pack(MAGIC, kind, 0, 0, stream, len(payload)) + payload


def record(tag: Tag, value: bytes) -> bytes:
    return struct.pack("<BI", tag, len(value)) + value


def u32(tag: Tag, value: int) -> bytes:
    return record(tag, struct.pack("<I", value))


def text(tag: Tag, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if b"\0" in data:
        raise ValueError(f"{tag.name.lower()} must not contain a NUL byte")
    return record(tag, data)


def records(items: Iterable[bytes]) -> bytes:
    return b"".join(items)


def parse_records(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """Every ``(tag, value)`` in order; a truncated record is a protocol error."""
    offset = 0
    while offset < len(payload):
        if offset + 5 > len(payload):
            raise ProtocolError("a record header is cut short")
        tag, length = struct.unpack_from("<BI", payload, offset)
        offset += 5
        if offset + length > len(payload):
            raise ProtocolError(f"record {tag} claims {length} bytes past the frame's end")
        yield tag, payload[offset : offset + length]
        offset += length


@dataclass(slots=True)
class Fields:
    """A message's records by tag (the last of a repeated tag wins; ``all`` keeps order)."""

    values: dict[int, bytes]

    @classmethod
    def parse(cls, payload: bytes) -> Fields:
        return cls(dict(parse_records(payload)))

    def raw(self, tag: Tag) -> bytes | None:
        return self.values.get(tag)

    def text(self, tag: Tag) -> str | None:
        value = self.values.get(tag)
        return None if value is None else value.decode(errors="replace")

    def u32(self, tag: Tag) -> int | None:
        value = self.values.get(tag)
        if value is None:
            return None
        if len(value) != 4:
            raise ProtocolError(f"record {tag.name} must hold 4 bytes, not {len(value)}")
        result: int = struct.unpack("<I", value)[0]
        return result


class Decoder:
    """Turns bytes into frames, with the resynchronisation the handshake needs.

    Until :meth:`expect_hello` has matched the HELLO_OK carrying our nonce, every byte is
    discarded: after a restore or over a virtio port that outlived a connection, the guest may
    still deliver the tail of a frame written before. After that any malformed header is fatal.
    """

    def __init__(self, nonce: bytes) -> None:
        self._buffer = bytearray()
        self._nonce = nonce
        self.synced = False

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        if not self.synced:
            return self._scan_for_hello()
        if len(self._buffer) < HEADER_SIZE:
            return None
        magic, kind, flags, reserved, stream, length = HEADER.unpack_from(self._buffer)
        if magic != MAGIC or flags or reserved or length > MAX_PAYLOAD:
            raise ProtocolError("the agent sent a malformed frame header")
        if kind not in FROM_GUEST:
            raise ProtocolError(f"the agent sent message type {kind:#x}, which it may not")
        if len(self._buffer) < HEADER_SIZE + length:
            return None
        payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        return Frame(Msg(kind), stream, payload)

    def _scan_for_hello(self) -> Frame | None:
        while True:
            start = self._buffer.find(MAGIC)
            if start < 0:
                # Keep a possible start of the magic for the next read.
                del self._buffer[: max(len(self._buffer) - len(MAGIC) + 1, 0)]
                return None
            del self._buffer[:start]
            if len(self._buffer) < HEADER_SIZE:
                return None
            _, kind, flags, reserved, stream, length = HEADER.unpack_from(self._buffer)
            plausible = (
                kind == Msg.HELLO_OK and not flags and not reserved and stream == 0
            ) and length <= MAX_HELLO_OK
            if not plausible:
                # The magic cannot overlap itself, so the next candidate starts after it.
                del self._buffer[: len(MAGIC)]
                continue
            if len(self._buffer) < HEADER_SIZE + length:
                return None
            payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
            try:
                nonce = Fields.parse(payload).raw(Tag.NONCE)
            except ProtocolError:
                nonce = None
            if nonce != self._nonce:
                del self._buffer[: len(MAGIC)]
                continue
            del self._buffer[: HEADER_SIZE + length]
            self.synced = True
            return Frame(Msg.HELLO_OK, 0, payload)
