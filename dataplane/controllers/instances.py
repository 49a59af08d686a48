"""``/instances``: lifecycle actions and logs over SSE."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

import anyio
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from dataplane import sse
from dataplane.errors import ApiError
from dataplane.representations import instance_json
from dataplane.runtime import Runtime
from managers.instances import (
    CreateRequest,
    Instance,
    InstanceManager,
    InstanceNotFound,
    InstanceState,
    InvalidInstanceSpec,
)
from managers.instances.logs import LogLine
from managers.network import Bandwidth, NetworkConfigError


def _manager(runtime: Runtime) -> InstanceManager:
    return runtime.require_instances()


class InstancesController(Controller):
    path = "/instances"

    @post("/", status_code=201)
    async def create(
        self, runtime: NamedDependency[Runtime], data: JSONBody[Any]
    ) -> dict[str, Any]:
        # Parsed on its own (not trusting the contract check, which can be off); absent
        # fields keep the defaults CreateRequest defines (the one place they are written).
        request = CreateRequest.from_json(data)
        with runtime.metrics.operation("create"):
            created = await _manager(runtime).create(request)
        return instance_json(created)

    @get("/")
    async def list_instances(
        self,
        runtime: NamedDependency[Runtime],
        state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    ) -> list[dict[str, Any]]:
        try:
            wanted = InstanceState(state_filter) if state_filter else None
        except ValueError:
            raise ApiError(
                400,
                "invalid_request",
                f"unknown state {state_filter!r}",
                {"states": list(InstanceState)},
            ) from None
        return [instance_json(i) for i in await _manager(runtime).list(wanted)]

    @get("/{instance_id:str}")
    async def get_instance(
        self, runtime: NamedDependency[Runtime], instance_id: FromPath[str]
    ) -> dict[str, Any]:
        return instance_json(await _manager(runtime).get(instance_id))

    @patch("/{instance_id:str}")
    async def update_instance(
        self, runtime: NamedDependency[Runtime], instance_id: FromPath[str], data: JSONBody[Any]
    ) -> dict[str, Any]:
        limits = _bandwidth_patch(data)
        return instance_json(await _manager(runtime).set_bandwidth(instance_id, limits))

    @delete("/{instance_id:str}", status_code=204)
    async def delete_instance(
        self, runtime: NamedDependency[Runtime], instance_id: FromPath[str]
    ) -> None:
        await _manager(runtime).delete(instance_id)

    @post("/{instance_id:str}/{action:str}", status_code=200)
    async def act(
        self, runtime: NamedDependency[Runtime], instance_id: FromPath[str], action: FromPath[str]
    ) -> dict[str, Any]:
        manager = _manager(runtime)
        actions = {
            "start": manager.start_instance,
            "stop": manager.stop,
            "reboot": manager.reboot,
            "pause": manager.pause,
            "resume": manager.resume,
            "standby": manager.standby,
            "restore": manager.restore,
        }
        handler = actions.get(action)
        if handler is None:
            raise ApiError(404, "not_found", f"no action {action!r}")
        with runtime.metrics.operation(action):
            done = await handler(instance_id)
        return instance_json(done)

    @get("/{instance_id:str}/logs")
    async def logs(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
        source: Annotated[str, QueryParameter(name="source")] = "app",
        tail: Annotated[int | None, QueryParameter(name="tail")] = None,
        follow: Annotated[bool, QueryParameter(name="follow")] = False,
        log_format: Annotated[str, QueryParameter(name="format")] = "sse",
    ) -> Response[Any]:
        if log_format not in ("sse", "text", "raw"):
            raise ApiError(400, "invalid_request", "format must be sse, text or raw")
        manager = _manager(runtime)
        last_event = request.headers.get("last-event-id")
        after = int(last_event) if last_event is not None and last_event.isdigit() else None
        if log_format == "raw":
            return await _raw_log(request, manager, instance_id, source, follow, after)
        # Resolve the instance and read the first lines now, so an unknown id is a
        # plain 404 rather than a stream that ends at once.
        first = await manager.read_log(instance_id, source, after=after, tail=tail)
        log_file = await manager.log_for(instance_id, source)
        keepalive = runtime.sse_keepalive_seconds
        text = log_format == "text"
        if (
            follow
            and after is not None
            and not first.lines
            and await manager.finished(instance_id) is not None
        ):
            # A reconnect after the end event: nothing more will come, and 204 is what makes
            # an EventSource stop reconnecting.
            return Response(content=b"", status_code=204)

        def render(lines: list[LogLine]) -> bytes:
            # One write for a batch: a send per line cost more than the line (the pump hands
            # over up to 256 KiB of a chatty guest at a time).
            if text:
                return b"".join(line.text.rstrip(b"\r") + b"\n" for line in lines)
            return b"".join(_log_event(line) for line in lines)

        async def stream() -> AsyncIterator[bytes]:
            if not text:
                yield sse.RETRY
                if first.dropped:
                    gap = {"dropped_bytes": first.dropped, "resumed_at": first.resumed_at}
                    yield sse.event(json.dumps(gap), name="gap")
            for start in range(0, len(first.lines), _BATCH_LINES):
                yield render(first.lines[start : start + _BATCH_LINES])
            if not follow:
                return
            sent = first.position
            idle_since = time.monotonic()
            written = None if source == "dataplane" else partial(manager.output_copied, instance_id)
            async for batch in log_file.follow(first.position, written=written):
                if batch:
                    idle_since = time.monotonic()
                    yield render(batch)
                    sent = batch[-1].offset
                    continue
                try:
                    done = await manager.finished(instance_id)
                except InstanceNotFound:
                    return  # deleted: nothing more will ever be written
                if done is not None:
                    # Whatever the pump copied last (a final line without its newline too).
                    rest = await manager.read_log(instance_id, source, after=sent, tail=None)
                    if rest.lines:
                        yield render(rest.lines)
                    if not text:
                        yield sse.event(json.dumps(_end(done)), name="end")
                    return
                if not text and time.monotonic() - idle_since >= keepalive:
                    idle_since = time.monotonic()
                    yield sse.KEEPALIVE

        if text:
            return Stream(stream(), media_type="text/plain", headers={"Cache-Control": "no-cache"})
        return Stream(stream(), media_type="text/event-stream", headers=sse.HEADERS)


# Lines of a backlog sent in one write.
_BATCH_LINES = 1000
# What one read of a raw download holds: the bytes go out as they are read.
RAW_CHUNK = 1024 * 1024
# How often a raw follow looks for new bytes when the pump gives no cue (as
# SegmentedLog.follow does for lines).
RAW_POLL_SECONDS = 0.1
_RANGE = re.compile(
    r"^bytes=(?:(?P<first>[0-9]{1,18})-(?P<last>[0-9]{1,18})?|-(?P<suffix>[0-9]{1,18}))$"
)


async def _raw_log(
    request: Request[Any, Any, Any],
    manager: InstanceManager,
    instance_id: str,
    source: str,
    follow: bool,
    after: int | None,
) -> Response[Any]:
    """``format=raw``: the log's bytes exactly as written, addressed by global offset (the
    SSE ids). A ``Range`` answers 206 with that range; without one, 200 with every byte kept
    from ``Last-Event-ID`` (or the oldest), and with ``follow`` the new bytes until the end."""
    kept, end = await manager.log_extent(instance_id, source)
    wanted = request.headers.get("range")
    # A Range that is not one range of bytes, or comes with a follow, is ignored (RFC 9110
    # lets a server answer any Range with the whole representation).
    match = _RANGE.fullmatch(wanted.strip()) if wanted is not None and not follow else None
    if match is not None and match["last"] is not None and int(match["last"]) < int(match["first"]):
        match = None
    if match is None:
        first = kept if after is None else max(kept, after)
        headers = {"Cache-Control": "no-cache", "Log-Offset": str(first)}
        stream = _raw_follow if follow else _raw_chunks
        chunks = stream(manager, instance_id, source, first, None if follow else end)
        return Stream(chunks, media_type="application/octet-stream", headers=headers)
    if match["suffix"] is not None:
        first, last = max(kept, end - int(match["suffix"])), end - 1
        empty = int(match["suffix"]) == 0
    else:
        first = int(match["first"])
        last = min(end - 1, int(match["last"])) if match["last"] is not None else end - 1
        empty = False
    if empty or first < kept or first >= end:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the {source} log holds bytes {kept} to {end} (end excluded); {wanted} is not "
            "among them",
            details={"kept_from": kept, "end": end},
            headers={"Content-Range": f"bytes */{end}"},
        )
    return Stream(
        _raw_chunks(manager, instance_id, source, first, last + 1),
        status_code=206,
        media_type="application/octet-stream",
        headers={
            "Content-Range": f"bytes {first}-{last}/{end}",
            "Content-Length": str(last + 1 - first),
            "Cache-Control": "no-cache",
        },
    )


async def _raw_chunks(
    manager: InstanceManager, instance_id: str, source: str, first: int, end: int | None
) -> AsyncIterator[bytes]:
    """The bytes from ``first`` to ``end`` (or the log's end), contiguous. Bytes rotated away
    meanwhile end the stream early: a range's answer is then short of its length (clients see
    a broken transfer, never wrong bytes), and a follow (``end`` None) moves on past them."""
    log_file = await manager.log_for(instance_id, source)
    position = first
    while end is None or position < end:
        size = RAW_CHUNK if end is None else min(RAW_CHUNK, end - position)
        start, data = await anyio.to_thread.run_sync(log_file.read_bytes, position, size)
        if not data or (start != position and end is not None):
            return
        position = start + len(data)
        yield data


async def _raw_follow(
    manager: InstanceManager, instance_id: str, source: str, first: int, _end: int | None
) -> AsyncIterator[bytes]:
    """The bytes from ``first`` on as they are written, until nothing more will be; past any
    bytes rotated away while the reader was behind."""
    log_file = await manager.log_for(instance_id, source)
    position = first
    finished = False
    while True:
        start, data = await anyio.to_thread.run_sync(log_file.read_bytes, position, RAW_CHUNK)
        if data:
            position = start + len(data)
            yield data
            continue
        if finished:
            return
        try:
            done = await manager.finished(instance_id)
        except InstanceNotFound:
            return
        if done is not None:
            finished = True  # one more pass for what the pump copied last
            continue
        with anyio.move_on_after(RAW_POLL_SECONDS):
            await (
                anyio.sleep_forever()
                if source == "dataplane"
                else manager.output_copied(instance_id)
            )


def _end(instance: Instance) -> dict[str, Any]:
    """The data of a follow's last event: how the instance stands now that it is quiet."""
    return {
        "state": str(instance.state),
        "exit_code": instance.guest.exit_code,
        "error": instance.guest.error,
    }


def _log_event(line: LogLine) -> bytes:
    text = line.text.decode("utf-8", "replace").rstrip("\r")
    return sse.event(text, name="log", event_id=line.offset)


def _bandwidth_patch(data: object) -> Bandwidth:
    """``{"network": {"bandwidth": {...}}}``, the one change ``PATCH`` makes, parsed on its own
    (the contract check may be off)."""
    network = data.get("network") if isinstance(data, dict) and set(data) == {"network"} else None
    if not isinstance(network, dict) or set(network) != {"bandwidth"}:
        raise InvalidInstanceSpec('the body must be {"network": {"bandwidth": {...}}}')
    try:
        return Bandwidth.from_json(network["bandwidth"])
    except NetworkConfigError as error:
        raise InvalidInstanceSpec(error.message) from error
