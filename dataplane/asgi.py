"""Small pieces shared by the ASGI middlewares that wrap the Litestar app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dataplane.errors import JSON, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header, decoded as latin-1 (as HTTP/1.1 bytes are)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    body = error_body(code, message, details)
    raw_headers = [
        (b"content-type", JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers.extend(
        (k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()
    )
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def refuse_websocket(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Refuse a WebSocket handshake with an HTTP answer in the error shape.

    Servers with ASGI's ``websocket.http.response`` extension (uvicorn's wsproto) send it as
    is; others can only close, which their clients see as 403."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = error_body(code, message)
    raw_headers = [
        (b"content-type", JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers.extend(
        (k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()
    )
    await send({"type": "websocket.http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


class BodyTooLarge(Exception):
    pass


async def drain(receive: Receive, limit: int) -> bytes:
    """Read a whole request body of at most ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
