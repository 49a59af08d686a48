"""A small async QMP client (QEMU Machine Protocol) over a Unix socket.

QMP is one JSON object per line. Commands are answered in order; asynchronous events may arrive
between them, so every event read is kept (the most recent few hundred) for
:meth:`QmpClient.wait_event`. One command is in flight at a time (QEMU serialises them anyway).
"""

from __future__ import annotations

import itertools
import json
import select
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from .errors import OperationTimeout, VmmProtocolError, VmmRequestFailed

_MAX_LINE = 16 * 1024 * 1024
# Events nobody waits for (RTC changes, a pause and resume long past) are dropped beyond this.
_KEPT_EVENTS = 256


class QmpConnectionLost(VmmProtocolError):
    """The socket closed or failed; the caller decides whether the VMM died."""


class QmpClient:
    def __init__(self, instance_id: str, stream: SocketStream, greeting: dict[str, Any]) -> None:
        self.instance_id = instance_id
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._lock = anyio.Lock()
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        self.greeting = greeting
        self._poller = select.poll()
        self._poller.register(stream.extra(SocketAttribute.raw_socket).fileno(), select.POLLIN)

    @classmethod
    async def connect(cls, instance_id: str, path: Path, seconds: float) -> QmpClient:
        try:
            with anyio.fail_after(seconds):
                stream = await anyio.connect_unix(str(path))
                reader = BufferedByteReceiveStream(stream)
                greeting = _parse(instance_id, await reader.receive_until(b"\n", _MAX_LINE))
                if "QMP" not in greeting:
                    await stream.aclose()
                    raise VmmProtocolError(instance_id, f"not a QMP greeting: {greeting!r:.200}")
                client = cls(instance_id, stream, greeting)
                client._reader = reader
                await client.execute("qmp_capabilities")
                return client
        except TimeoutError as exc:
            raise VmmProtocolError(
                instance_id, f"QMP on {str(path)!r} did not greet within {seconds:g} s"
            ) from exc
        except (OSError, anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound) as exc:
            raise QmpConnectionLost(instance_id, f"QMP connection failed: {exc!r}") from exc

    @property
    def version(self) -> str:
        qemu = self.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        return f"{qemu.get('major', '?')}.{qemu.get('minor', '?')}.{qemu.get('micro', '?')}"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command, "id": next(self._ids)}
        if arguments:
            message["arguments"] = arguments
        async with self._lock:
            try:
                await self._stream.send(json.dumps(message).encode() + b"\n")
                while True:
                    reply = await self._read()
                    if "event" in reply:
                        self._keep(reply)
                        continue
                    if reply.get("id") != message["id"]:
                        raise VmmProtocolError(
                            self.instance_id, f"QMP answered out of order: {reply!r:.200}"
                        )
                    break
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise QmpConnectionLost(self.instance_id, f"QMP connection lost: {exc!r}") from exc
        if "error" in reply:
            error = reply["error"]
            desc = str(error.get("desc", error)) if isinstance(error, dict) else str(error)
            klass = error.get("class", "") if isinstance(error, dict) else ""
            raise VmmRequestFailed(
                self.instance_id, f"QEMU refused {command}", [f"{klass}: {desc}"]
            )
        if "return" not in reply:
            raise VmmProtocolError(self.instance_id, f"QMP reply without return: {reply!r:.200}")
        return reply["return"]

    async def wait_event(
        self, name: str, match: Callable[[dict[str, Any]], bool], seconds: float
    ) -> dict[str, Any]:
        """Return (and consume) the first event ``name`` whose ``data`` satisfies ``match``."""
        async with self._lock:
            try:
                with anyio.fail_after(seconds):
                    while True:
                        for event in self._events:
                            if event.get("event") == name and match(event.get("data", {})):
                                self._events.remove(event)
                                return event
                        reply = await self._read()
                        if "event" in reply:
                            self._keep(reply)
            except TimeoutError as exc:
                raise OperationTimeout(
                    self.instance_id, f"QEMU sent no {name} event within {seconds:g} s"
                ) from exc
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise QmpConnectionLost(self.instance_id, f"QMP connection lost: {exc!r}") from exc

    def quiet(self) -> bool:
        """True when QEMU has said nothing since the last exchange: no command in flight and
        no event waiting, buffered or on the socket. QEMU announces every change of run state
        with an event, so a quiet connection means the last answer still holds."""
        return not (self._lock.locked() or self._reader.buffer or self._poller.poll(0))

    def _keep(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        if len(self._events) > _KEPT_EVENTS:
            del self._events[0]

    def forget_events(self, name: str) -> None:
        self._events = [event for event in self._events if event.get("event") != name]

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.receive_until(b"\n", _MAX_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead) as exc:
            raise QmpConnectionLost(self.instance_id, "QMP connection closed by QEMU") from exc
        except anyio.DelimiterNotFound as exc:
            raise VmmProtocolError(self.instance_id, "QMP sent an over-long line") from exc
        return _parse(self.instance_id, line)

    async def aclose(self) -> None:
        await self._stream.aclose()


def _parse(instance_id: str, line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise VmmProtocolError(instance_id, f"QMP sent something not JSON: {line[:120]!r}") from exc
    if not isinstance(value, dict):
        raise VmmProtocolError(instance_id, f"QMP sent a non-object: {line[:120]!r}")
    return value
