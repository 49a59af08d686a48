"""The outermost middleware: a request id for every request and one access-log line.

A caller's ``X-Request-ID`` is kept when it is a sane token, so ids can be
followed across services; otherwise one is generated. The id is echoed in the
response and set in :data:`dataplane.logsetup.request_id_var` for every log line
written while the request is served.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

from dataplane.asgi import ASGIApp, Message, Receive, Scope, Send, header
from dataplane.logsetup import request_id_var

log = logging.getLogger("dataplane.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class RequestContextMiddleware:
    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path")
        if raw_path:
            # Route on the path as sent: a parameter such as an image reference may
            # carry an encoded '/' (docker.io%2Flibrary%2Falpine) that must stay one
            # segment; handlers decode their parameters themselves.
            # Some servers (and Litestar's TestClient) leave the query string in raw_path.
            scope["path"] = raw_path.decode("latin-1").split("?", 1)[0]
        given = header(scope, b"x-request-id")
        request_id = given if given and _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1e3, 2),
                },
            )
            request_id_var.reset(token)
