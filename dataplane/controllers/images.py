"""``/images``: pull, import, inspect, delete, and follow builds over SSE."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import unquote

import anyio
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from dataplane import sse
from dataplane.runtime import Runtime
from managers.images import DiskFormat, Image, ImageManager, ImageNotFound

# How often a build's progress is sampled for its event stream.
PROGRESS_POLL_SECONDS = 0.25


def image_json(image: Image) -> dict[str, Any]:
    return {
        "name": image.name,
        "digest": image.digest,
        "status": str(image.status),
        "format": image.format,
        "progress": {
            "phase": image.progress.phase,
            "bytes_done": image.progress.bytes_done,
            "bytes_total": image.progress.bytes_total,
        },
        "error": image.error,
        "size": image.size,
        "config": image.config.to_dict() if image.config else None,
        "created_at": image.created_at,
        "updated_at": image.updated_at,
    }


def _images(runtime: Runtime) -> ImageManager:
    return runtime.require_images()


class ImagesController(Controller):
    path = "/images"

    @post("/", status_code=202)
    async def create(
        self, runtime: NamedDependency[Runtime], data: JSONBody[dict[str, Any]]
    ) -> dict[str, Any]:
        fmt: DiskFormat = data.get("format", "erofs")
        return image_json(await _images(runtime).request(data["name"], fmt))

    @post("/import", status_code=202)
    async def import_archive(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        fmt: Annotated[str, QueryParameter(name="format")] = "erofs",
    ) -> dict[str, Any]:
        disk_format: DiskFormat = "ext4" if fmt == "ext4" else "erofs"
        return image_json(await _images(runtime).import_archive(request.stream(), disk_format))

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
    async def events(self, runtime: NamedDependency[Runtime], name: FromPath[str]) -> Stream:
        images = _images(runtime)
        key = unquote(name)
        first = await images.get(key)  # an unknown image is a 404, not an empty stream
        keepalive = runtime.sse_keepalive_seconds

        async def stream() -> AsyncIterator[bytes]:
            image = first
            sent = None
            quiet_since = time.monotonic()
            while True:
                body = json.dumps(image_json(image))
                if body != sent:
                    sent = body
                    quiet_since = time.monotonic()
                    yield sse.event(body, name="image")
                    if image.status.terminal:
                        return
                elif time.monotonic() - quiet_since >= keepalive:
                    quiet_since = time.monotonic()
                    yield sse.KEEPALIVE
                await anyio.sleep(PROGRESS_POLL_SECONDS)
                try:
                    image = await images.get(image.digest)
                except ImageNotFound:
                    return  # deleted while building: the stream simply ends

        return Stream(stream(), media_type="text/event-stream", headers=sse.HEADERS)
