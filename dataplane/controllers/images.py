"""``/images``: pull, import, inspect, delete, and follow builds over SSE."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote

import anyio
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from dataplane import sse
from dataplane.errors import ApiError
from dataplane.representations import image_json
from dataplane.runtime import Runtime
from managers.images import (
    DISK_FORMATS,
    PROGRESS_INTERVAL,
    DiskFormat,
    ImageManager,
    ImageNotFound,
)


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """The body of ``POST /images``, parsed on its own: the contract check may be off."""

    name: str
    format: DiskFormat

    @classmethod
    def from_json(cls, data: object) -> ImageRequest:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ApiError(400, "invalid_request", 'the body must be {"name": "<reference>"}')
        unknown = sorted(set(data) - {"name", "format"})
        if unknown:
            raise ApiError(400, "invalid_request", f"unknown fields: {', '.join(unknown)}")
        return cls(data["name"], disk_format(data.get("format", "erofs")))


def disk_format(value: object) -> DiskFormat:
    """A disk format named by a client; anything else is a 400, never a silent default."""
    for known in DISK_FORMATS:
        if value == known:
            return known
    raise ApiError(
        400, "invalid_request", f"format must be one of {', '.join(DISK_FORMATS)}, not {value!r}"
    )


def _images(runtime: Runtime) -> ImageManager:
    return runtime.require_images()


class ImagesController(Controller):
    path = "/images"

    @post("/", status_code=202)
    async def create(
        self, runtime: NamedDependency[Runtime], data: JSONBody[Any]
    ) -> dict[str, Any]:
        body = ImageRequest.from_json(data)
        return image_json(await _images(runtime).request(body.name, body.format))

    # The archive streams to disk as it arrives; the image manager bounds it (its size, and
    # the room on the disk: 507 when there is none).
    @post("/import", status_code=202, request_max_body_size=None)
    async def import_archive(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        fmt: Annotated[str, QueryParameter(name="format")] = "erofs",
    ) -> dict[str, Any]:
        chosen = disk_format(fmt)
        return image_json(await _images(runtime).import_archive(request.stream(), chosen))

    @get("/")
    async def list_images(self, runtime: NamedDependency[Runtime]) -> list[dict[str, Any]]:
        return [image_json(image) for image in await _images(runtime).list()]

    @get("/{name:str}")
    async def get_image(
        self, runtime: NamedDependency[Runtime], name: FromPath[str]
    ) -> dict[str, Any]:
        return image_json(await _images(runtime).get(unquote(name)))

    @delete("/{name:str}", status_code=204)
    async def delete_image(self, runtime: NamedDependency[Runtime], name: FromPath[str]) -> None:
        await _images(runtime).delete(unquote(name))

    @get("/{name:str}/events")
    async def events(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        name: FromPath[str],
    ) -> Response[Any]:
        images = _images(runtime)
        key = unquote(name)
        first = await images.get(key)  # an unknown image is a 404, not an empty stream
        keepalive = runtime.sse_keepalive_seconds
        if first.status.terminal and request.headers.get("last-event-id") == str(first.status):
            # The client saw the end already: 204 is what makes an EventSource stop.
            return Response(content=b"", status_code=204)

        async def stream() -> AsyncIterator[bytes]:
            yield sse.RETRY
            image = first
            sent = None
            count = 0
            quiet_since = time.monotonic()
            while True:
                body = json.dumps(image_json(image))
                if body != sent:
                    sent = body
                    quiet_since = time.monotonic()
                    count += 1
                    # The last event's id is the final status, which a reconnect sends back.
                    status = str(image.status)
                    event_id = status if image.status.terminal else f"{status}.{count}"
                    yield sse.event(body, name="image", event_id=event_id)
                    if image.status.terminal:
                        return
                elif time.monotonic() - quiet_since >= keepalive:
                    quiet_since = time.monotonic()
                    yield sse.KEEPALIVE
                await anyio.sleep(PROGRESS_INTERVAL)
                try:
                    image = await images.get(image.digest)
                except ImageNotFound:
                    return  # deleted while building: the stream simply ends

        return Stream(stream(), media_type="text/event-stream", headers=sse.HEADERS)
