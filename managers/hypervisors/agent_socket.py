"""The host end of the guest agent's channel, per backend.

QEMU listens on a ``chardev socket`` wired to a ``virtserialport``: a plain Unix connection
is the channel. Cloud Hypervisor exposes the guest's vsock as a Unix socket (its "hybrid vsock"):
the host connects, writes ``CONNECT <port>\\n`` and gets ``OK <host port>\\n`` once the guest has
accepted; a guest with no listener on that port makes it close the connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import anyio
from anyio.abc import ByteStream

from .qemu_argv import AGENT_PORT_NAME, OUTPUT_PORT_NAME
from .types import BackendKind

AGENT_VSOCK_PORT = 1024
# Any CID from 3 up works: each VM's vsock is private to its VMM's Unix socket.
AGENT_VSOCK_CID = 3
_HANDSHAKE_SECONDS = 5.0
_MAX_REPLY = 64


def agent_transport(kind: BackendKind) -> str:
    """How the guest reaches its channel, as the config disk tells the agent."""
    if kind is BackendKind.QEMU:
        return f"virtio-serial:{AGENT_PORT_NAME}"
    return f"vsock:{AGENT_VSOCK_PORT}"


def output_transport(kind: BackendKind) -> str:
    """The channel the guest's init relays the program's output to, as the config disk says
    (the VM has it when its spec sets ``output_file``)."""
    if kind is BackendKind.QEMU:
        return f"virtio-serial:{OUTPUT_PORT_NAME}"
    return "console"


class UnixStream(ByteStream):
    """A Unix socket connection as an anyio byte stream, on asyncio's own streams.

    Why not ``anyio.connect_unix``: in anyio 4.16 a receive cancelled while its socket turns
    readable resolves the same future twice (``InvalidStateError`` in a loop callback), and the
    agent's reader is cancelled whenever a link stops. asyncio's streams are cancellation-safe.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: Path) -> UnixStream:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        return cls(reader, writer)

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> UnixStream:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._writer.is_closing() and self._reader.at_eof():
            raise anyio.ClosedResourceError
        try:
            data = await self._reader.read(max_bytes)
        except ConnectionError as exc:
            raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        if self._writer.is_closing():
            raise anyio.ClosedResourceError
        try:
            self._writer.write(item)
            await self._writer.drain()
        except ConnectionError as exc:
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        self._writer.write_eof()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()


async def connect_unix(path: Path) -> ByteStream:
    return await UnixStream.connect(path)


async def connect_hybrid_vsock(path: Path, port: int = AGENT_VSOCK_PORT) -> ByteStream:
    """A stream to the guest's vsock ``port`` through Cloud Hypervisor's Unix socket."""
    stream = await UnixStream.connect(path)
    try:
        await stream.send(f"CONNECT {port}\n".encode())
        reply = bytearray()
        with anyio.fail_after(_HANDSHAKE_SECONDS):
            # One byte at a time: what follows the line is the guest's, not ours to read.
            while not reply.endswith(b"\n"):
                if len(reply) > _MAX_REPLY:
                    raise ConnectionRefusedError(f"vsock answered {bytes(reply)!r:.80}")
                reply += await stream.receive(1)
        if not reply.startswith(b"OK "):
            raise ConnectionRefusedError(f"vsock answered {bytes(reply)!r:.80}")
    except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError) as exc:
        await stream.aclose()
        raise ConnectionRefusedError(f"nothing listens on guest vsock port {port}") from exc
    except BaseException:
        await stream.aclose()
        raise
    return stream
