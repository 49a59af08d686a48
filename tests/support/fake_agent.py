"""A stand-in guest agent for tests on fake VMMs: the protocol's happy path, in a thread.

It answers HELLO, SET_TIME (DONE), PING, and EXEC by "running" nothing: it prints its argv
joined by spaces on stdout and exits 0, or exits with the code given as ``exit=N`` in argv[0].
STAT, READ_FILE and WRITE_FILE answer ENOENT. MOUNT answers DONE; UMOUNT answers EBUSY for a
path with ``busy`` in it (files held open there), else DONE. The real agent is tested on its own
(``tests/integration/test_agent_channel.py``) and in real guests; this one lets the HTTP
edge's tests reach a Running instance's agent in milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading

from anyio.abc import ByteStream

from managers.agent import protocol as p
from managers.hypervisors.agent_socket import UnixStream


async def open_fake_agent() -> ByteStream:
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=_serve, args=(guest,), daemon=True).start()
    return await UnixStream.from_socket(host)


def _serve(sock: socket.socket) -> None:
    buffer = bytearray()
    with sock, contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            buffer += chunk
            while len(buffer) >= p.HEADER_SIZE:
                _, kind, _, _, stream, length = p.HEADER.unpack_from(buffer)
                if len(buffer) < p.HEADER_SIZE + length:
                    break
                payload = bytes(buffer[p.HEADER_SIZE : p.HEADER_SIZE + length])
                del buffer[: p.HEADER_SIZE + length]
                for reply in _answer(kind, stream, payload):
                    sock.sendall(reply)


def _answer(kind: int, stream: int, payload: bytes) -> list[bytes]:
    if kind == p.Msg.HELLO:
        nonce = p.Fields.parse(payload).raw(p.Tag.NONCE) or b""
        body = p.records(
            [p.record(p.Tag.NONCE, nonce), p.u32(p.Tag.VERSION, p.VERSION),
             p.text(p.Tag.AGENT, "fake-agent 1")]
        )  # fmt: skip
        return [p.encode(p.Msg.HELLO_OK, 0, body)]
    if kind == p.Msg.PING:
        return [p.encode(p.Msg.PONG, 0, payload)]
    if kind == p.Msg.SET_TIME:
        return [p.encode(p.Msg.DONE, stream)]
    if kind == p.Msg.EXEC:
        argv = [v.decode() for t, v in p.parse_records(payload) if t == p.Tag.ARG]
        code = int(argv[0][5:]) if argv[0].startswith("exit=") else 0
        return [
            p.encode(p.Msg.STARTED, stream, p.u32(p.Tag.PID, 100)),
            p.encode(p.Msg.DATA_OUT, stream, " ".join(argv).encode() + b"\n"),
            p.encode(p.Msg.EXIT, stream, p.u32(p.Tag.EXIT_CODE, code)),
        ]
    if kind == p.Msg.MOUNT:
        return [p.encode(p.Msg.DONE, stream)]
    if kind == p.Msg.UMOUNT:
        path = p.Fields.parse(payload).text(p.Tag.PATH) or ""
        if "busy" in path:
            body = p.records([p.u32(p.Tag.ERRNO, errno.EBUSY), p.text(p.Tag.MESSAGE, "busy")])
            return [p.encode(p.Msg.ERROR, stream, body)]
        return [p.encode(p.Msg.DONE, stream)]
    if kind in (p.Msg.STAT, p.Msg.READ_FILE, p.Msg.WRITE_FILE):
        body = p.records([p.u32(p.Tag.ERRNO, errno.ENOENT), p.text(p.Tag.MESSAGE, "no such file")])
        return [p.encode(p.Msg.ERROR, stream, body)]
    return []
