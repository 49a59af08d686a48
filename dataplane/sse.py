"""Server-Sent Events framing.

Each event is ``id``/``event``/``data`` fields and a blank line. A data value
may not hold CR or LF, so a text with line breaks becomes several ``data``
fields, which clients join back with ``\\n``.
"""

from __future__ import annotations

import re

KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_SECONDS = 15.0
#: How long an EventSource waits before it reconnects, sent first on every stream.
RETRY_MS = 2000
RETRY = f"retry: {RETRY_MS}\n\n".encode()
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_BREAKS = re.compile(r"\r\n|\r|\n")


def event(data: str, *, name: str | None = None, event_id: int | str | None = None) -> bytes:
    parts: list[str] = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if name is not None:
        parts.append(f"event: {name}\n")
    parts.extend(f"data: {line}\n" for line in _BREAKS.split(data))
    parts.append("\n")
    return "".join(parts).encode()
