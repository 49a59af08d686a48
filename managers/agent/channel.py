"""One connection to one guest agent: the handshake, the reader, sessions and flow control.

A :class:`Channel` owns a byte stream. :meth:`Channel.run` reads frames and routes them to
sessions until the stream ends; every session still open then fails with the reason given to
:meth:`Channel.close` (or "the connection to the agent was lost"). Each session's inbound data is
bounded by the protocol's window, so a guest that floods the channel can hold at most
``MAX_SESSIONS * WINDOW`` bytes of the dataplane's memory before it is cut off.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import protocol as p
from .errors import AgentDisconnected, AgentProtocolError, AgentUnavailable
from .protocol import Fields, Frame, Msg, Tag

_READ_SIZE = 1 << 16
# Credit is returned once this much was consumed, so a stream of small reads does not answer
# every frame with a CREDIT frame.
_CREDIT_BATCH = p.WINDOW // 4
# A frame is written whole or the channel is given up: a send cut short by a cancellation would
# leave half a frame on the wire, and one the guest does not take within this long (it stopped
# reading) would hold every other session behind it.
SEND_DEADLINE = 10.0
# The most frames other than data a session may queue (STARTED, STAT_RESULT, EXIT, ...): a guest
# that sends more is flooding, since data is what the window bounds.
_MAX_CONTROL_FRAMES = 8


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    agent: str


class Session:
    """One stream: frames from the guest in order, and credit for what we send it."""

    def __init__(self, channel: Channel, stream: int) -> None:
        self.channel = channel
        self.stream = stream
        send, receive = anyio.create_memory_object_stream[Frame | BaseException](math.inf)
        self._inbox_send: MemoryObjectSendStream[Frame | BaseException] = send
        self._inbox: MemoryObjectReceiveStream[Frame | BaseException] = receive
        self._send_credit = p.WINDOW
        self._credit_changed = anyio.Event()
        self._outstanding = 0  # data received and not yet credited back
        self._unreturned = 0  # data consumed and not yet credited back
        self._control_frames = 0
        self.ended = False

    # -- from the reader ------------------------------------------------------------------
    def deliver(self, frame: Frame) -> None:
        if frame.type in (Msg.DATA_OUT, Msg.STDERR):
            self._outstanding += len(frame.payload)
            if self._outstanding > p.WINDOW:
                raise AgentProtocolError(
                    f"the agent sent more than its window on stream {self.stream}"
                )
        elif frame.type is Msg.GUEST_CREDIT:
            self._send_credit += Fields.parse(frame.payload).u32(Tag.CREDIT) or 0
            self._credit_changed.set()
            self._credit_changed = anyio.Event()
            return
        else:
            self._control_frames += 1
            if self._control_frames > _MAX_CONTROL_FRAMES:
                raise AgentProtocolError(
                    f"the agent sent {self._control_frames} control frames on stream {self.stream}"
                )
        if frame.type in p.FINAL:
            self.ended = True
        self._inbox_send.send_nowait(frame)

    def fail(self, error: BaseException) -> None:
        self.ended = True
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._inbox_send.send_nowait(error)
        self._credit_changed.set()

    # -- for the operation ----------------------------------------------------------------
    async def receive(self) -> Frame:
        item = await self._inbox.receive()
        if isinstance(item, BaseException):
            raise item
        return item

    async def frames(self) -> AsyncIterator[Frame]:
        """Frames until (and including) the one that ends the session."""
        while True:
            frame = await self.receive()
            yield frame
            if frame.type in p.FINAL:
                return

    async def send(self, kind: Msg, payload: bytes = b"") -> None:
        await self.channel.send(kind, self.stream, payload)

    async def send_data(self, data: bytes) -> None:
        """Send ``data`` as DATA_IN, waiting for credit as the guest consumes it."""
        view = memoryview(data)
        while view:
            while self._send_credit <= 0:
                if self.ended:
                    return
                await self._credit_changed.wait()
            size = min(len(view), self._send_credit, p.MAX_PAYLOAD)
            self._send_credit -= size
            await self.send(Msg.DATA_IN, bytes(view[:size]))
            view = view[size:]

    async def end_input(self) -> None:
        await self.send(Msg.DATA_IN, b"")

    async def consumed(self, size: int) -> None:
        """Return ``size`` bytes of credit (batched) for data this session has used."""
        self._unreturned += size
        self._outstanding -= size
        if self._unreturned >= _CREDIT_BATCH and not self.ended:
            amount = self._unreturned
            await self.send(Msg.CREDIT, p.u32(Tag.CREDIT, amount))
            # Only once sent: a send that failed leaves the credit to be returned next time.
            self._unreturned -= amount


class Channel:
    """A synchronised connection to an agent (see ``PROTOCOL.md``)."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._send_lock = anyio.Lock()
        self._sessions: dict[int, Session] = {}
        self._next_stream = 1
        self._nonce = os.urandom(8)
        self._decoder = p.Decoder(self._nonce)
        self._hello: Hello | None = None
        self._hello_event = anyio.Event()
        self._pongs: list[tuple[bytes, anyio.Event]] = []
        self._closed_reason: str | None = None
        self._reader: anyio.CancelScope | None = None
        self.hello_sent = anyio.Event()
        self.closed = anyio.Event()

    @property
    def hello(self) -> Hello | None:
        return self._hello

    async def run(self) -> None:
        """Say HELLO and route frames until the connection ends; never raises."""
        reason = "the connection to the agent was lost"
        hello = p.records([p.record(Tag.NONCE, self._nonce), p.u32(Tag.VERSION, p.VERSION)])
        try:
            with anyio.CancelScope() as self._reader:
                if self.closed.is_set():
                    return
                await self.send(Msg.HELLO, 0, hello)
                self.hello_sent.set()
                while True:
                    data = await self._stream.receive(_READ_SIZE)
                    for frame in self._decoder.feed(data):
                        self._route(frame)
        except (
            AgentDisconnected,
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            OSError,
        ):
            pass
        except (AgentProtocolError, p.ProtocolError) as exc:
            reason = f"the agent broke the protocol: {exc}"
        finally:
            self._finish(self._closed_reason or reason)
            self.hello_sent.set()  # whoever waits for it finds the channel closed
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._stream.aclose()

    def _route(self, frame: Frame) -> None:
        if frame.stream == 0:
            if frame.type is Msg.HELLO_OK and self._hello is None:
                fields = Fields.parse(frame.payload)
                version = fields.u32(Tag.VERSION) or 0
                if version != p.VERSION:
                    raise p.ProtocolError(f"the agent speaks version {version}, not {p.VERSION}")
                self._hello = Hello(version, fields.text(Tag.AGENT) or "unknown")
                self._hello_event.set()
            elif frame.type is Msg.HELLO_OK:
                # An unsolicited HELLO_OK: the agent restarted and lost every session.
                raise p.ProtocolError("the agent restarted")
            elif frame.type is Msg.PONG:
                for index, (payload, event) in enumerate(self._pongs):
                    if payload == frame.payload:
                        del self._pongs[index]
                        event.set()
                        break
            elif frame.type is Msg.ERROR:
                message = Fields.parse(frame.payload).text(Tag.MESSAGE)
                raise p.ProtocolError(f"the agent refused the channel: {message}")
            return
        session = self._sessions.get(frame.stream)
        if session is not None:
            session.deliver(frame)
            if session.ended:
                self._sessions.pop(frame.stream, None)

    def _finish(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self._closed_reason = reason
        error = AgentDisconnected(reason)
        for session in self._sessions.values():
            session.fail(error)
        self._sessions.clear()
        for _, event in self._pongs:
            event.set()
        self._hello_event.set()
        self.closed.set()

    async def wait_ready(self) -> Hello:
        await self._hello_event.wait()
        if self._hello is None:
            raise AgentUnavailable(self._closed_reason or "the agent did not answer")
        return self._hello

    async def send(self, kind: Msg, stream: int, payload: bytes = b"") -> None:
        if self.closed.is_set():
            raise AgentDisconnected(self._closed_reason or "the channel is closed")
        frame = p.encode(kind, stream, payload)
        async with self._send_lock:
            if self.closed.is_set():
                raise AgentDisconnected(self._closed_reason or "the channel is closed")
            with anyio.CancelScope(shield=True):
                failure: str | None = None
                with anyio.move_on_after(SEND_DEADLINE) as deadline:
                    try:
                        await self._stream.send(frame)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                        failure = f"the connection to the agent was lost: {exc}"
                if deadline.cancelled_caught:
                    failure = f"the agent took no data for {SEND_DEADLINE:g} s"
                if failure is not None:
                    self._finish(failure)
                    self._stop_reader()
                    raise AgentDisconnected(self._closed_reason or failure)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """A new stream; on leaving, one that did not end is CLOSEd (the agent kills and cleans)."""
        if self.closed.is_set():
            raise AgentDisconnected(self._closed_reason or "the channel is closed")
        if len(self._sessions) >= p.MAX_SESSIONS:
            raise AgentUnavailable(
                f"the agent already serves {p.MAX_SESSIONS} operations on this instance"
            )
        while self._next_stream in self._sessions or self._next_stream == 0:
            self._next_stream = (self._next_stream + 1) & 0xFFFFFFFF
        session = Session(self, self._next_stream)
        self._next_stream = (self._next_stream + 1) & 0xFFFFFFFF
        self._sessions[session.stream] = session
        try:
            yield session
        finally:
            if self._sessions.pop(session.stream, None) is not None and not session.ended:
                with anyio.CancelScope(shield=True), contextlib.suppress(AgentDisconnected):
                    await self.send(Msg.CLOSE, session.stream)

    async def ping(self, payload: bytes = b"") -> None:
        """One raw round trip (PING/PONG) on the channel itself."""
        event = anyio.Event()
        self._pongs.append((payload, event))
        await self.send(Msg.PING, 0, payload)
        await event.wait()
        if self.closed.is_set():
            raise AgentDisconnected(self._closed_reason or "the channel is closed")

    async def close(self, reason: str) -> None:
        """End the connection; open sessions fail with ``reason``."""
        self._finish(reason)
        self._stop_reader()

    def _stop_reader(self) -> None:
        # The reader closes the stream itself once it stops: closing a socket another task
        # is receiving on races asyncio's reader callback (anyio resolves the same future twice).
        if self._reader is not None:
            self._reader.cancel()


def time_record(ns: int) -> bytes:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return p.record(Tag.TIME, struct.pack("<QI", seconds, nanos))
