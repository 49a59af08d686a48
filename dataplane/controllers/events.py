"""``/events``: the node's events as Server-Sent Events, or a JSON page for scripts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any

import anyio
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import Stream

from dataplane import sse
from dataplane.errors import ApiError
from dataplane.events import Endpoint, Event, EventLog
from dataplane.runtime import Runtime

PAGE_DEFAULT = 100
PAGE_MAX = 1000
_BATCH = 256


def _filter(
    type_prefix: str | None, instance_id: str | None, since: float | None
) -> Callable[[Event], bool]:
    def keep(event: Event) -> bool:
        if type_prefix and not str(event.type).startswith(type_prefix):
            return False
        if instance_id and event.envelope().get("instance_id") != instance_id:
            return False
        if since is not None:
            stamp = datetime.fromisoformat(event.timestamp.replace("Z", "+00:00")).timestamp()
            if stamp < since:
                return False
        return True

    return keep


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "invalid_request", f"since {value!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise ApiError(400, "invalid_request", f"since {value!r} needs a time zone (e.g. Z)")
    return moment.timestamp()


def _start(events: EventLog, after_id: str | None) -> int:
    if after_id is None:
        return events.next_seq
    seq = EventLog.seq_of(after_id)
    if seq is None:
        raise ApiError(400, "invalid_request", f"{after_id!r} is not an event id")
    return seq + 1


def runtime_endpoints(runtime: Runtime) -> list[Endpoint]:
    return runtime.events.endpoints if runtime.events is not None else []


def _webhook_status(endpoint: Endpoint, events: EventLog) -> dict[str, Any]:
    stats = endpoint.stats
    return {
        "endpoint": endpoint.url,
        "delivered_id": events.event_id(stats.cursor) if stats.cursor > 0 else None,
        "delivered": stats.delivered,
        "failed_attempts": stats.failed_attempts,
        "dropped": stats.dropped,
        "last_error": stats.last_error,
    }


def _read(events: EventLog, position: int) -> list[Event]:
    return list(events.read_from(position, limit=_BATCH))


def _message(event: Event) -> bytes:
    # Unnamed, so a browser's EventSource.onmessage sees it; the type is in the data.
    return sse.event(json.dumps(event.envelope(), ensure_ascii=False), event_id=event.id)


class EventsController(Controller):
    path = "/events"

    @get("/")
    async def events(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        follow: Annotated[bool, QueryParameter(name="follow")] = True,
        type_prefix: Annotated[str | None, QueryParameter(name="type")] = None,
        instance_id: Annotated[str | None, QueryParameter(name="instance_id")] = None,
        since: Annotated[str | None, QueryParameter(name="since")] = None,
        after: Annotated[str | None, QueryParameter(name="after")] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=PAGE_MAX)] = PAGE_DEFAULT,
    ) -> Response[Any]:
        events = runtime.require_events()
        keep = _filter(type_prefix, instance_id, _since(since))
        if not follow:
            page = await _page(events, keep, after, limit)
            page["webhooks"] = [
                _webhook_status(endpoint, events) for endpoint in runtime_endpoints(runtime)
            ]
            return Response(page)
        resume = request.headers.get("last-event-id") or after
        # Without a position, a stream with ``since`` starts at the oldest event kept; one
        # without starts with what happens next.
        start = _start(events, resume) if resume or since is None else events.first_seq
        keepalive = runtime.sse_keepalive_seconds

        async def stream() -> AsyncIterator[bytes]:
            yield sse.RETRY
            position = start
            first = events.first_seq
            if position < first:
                gap = {"from_id": resume, "dropped": first - position}
                yield sse.event(json.dumps(gap), name="gap")
                position = first
            while True:
                batch = await anyio.to_thread.run_sync(_read, events, position)
                for event in batch:
                    if keep(event):
                        yield _message(event)
                    position = event.seq + 1
                if batch:
                    continue
                with anyio.move_on_after(keepalive) as idle:
                    await events.wait_after(position - 1)
                if idle.cancelled_caught:
                    yield sse.KEEPALIVE

        return Stream(stream(), media_type="text/event-stream", headers=sse.HEADERS)


async def _page(
    events: EventLog, keep: Callable[[Event], bool], after: str | None, limit: int
) -> dict[str, Any]:
    def collect() -> list[Event]:
        if after is not None:
            start = _start(events, after)
            found: list[Event] = []
            for event in events.read_from(start):
                if keep(event):
                    found.append(event)
                    if len(found) >= limit:
                        break
            return found
        # The most recent ``limit`` that pass the filter, oldest first.
        recent: list[Event] = []
        for event in events.read_from(events.first_seq):
            if keep(event):
                recent.append(event)
                if len(recent) > limit:
                    recent.pop(0)
        return recent

    found = await anyio.to_thread.run_sync(collect)
    return {
        "events": [event.envelope() for event in found],
        "last_id": found[-1].id if found else None,
        "oldest_kept_id": (
            events.event_id(events.first_seq) if events.first_seq < events.next_seq else None
        ),
    }
