"""``/volumes``: create (empty, from an image, from a tar), list, grow, delete; and the
attach and detach of a volume to an instance, under ``/instances/{id}/volumes``."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from dataplane.errors import ApiError
from dataplane.representations import instance_json, volume_json
from dataplane.runtime import Runtime
from managers.instances import VolumeRequest
from managers.volumes import CreateVolume, InvalidVolumeSpec


class VolumesController(Controller):
    path = "/volumes"

    @post("/", status_code=201)
    async def create(
        self, runtime: NamedDependency[Runtime], data: JSONBody[Any]
    ) -> dict[str, Any]:
        request = CreateVolume.from_json(data)
        return volume_json(await runtime.require_volumes().create(request))

    # The archive is streamed to disk as it arrives; the volume's size bounds it.
    @post("/import", status_code=201, request_max_body_size=None)
    async def import_archive(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        name: Annotated[str, QueryParameter(name="name")],
        size_mb: Annotated[str, QueryParameter(name="size_mb")],
    ) -> dict[str, Any]:
        if not size_mb.isdigit():
            raise InvalidVolumeSpec("size_mb must be a whole number", {"size_mb": size_mb})
        volumes = runtime.require_volumes()
        return volume_json(await volumes.import_archive(name, int(size_mb), request.stream()))

    @get("/")
    async def list_volumes(self, runtime: NamedDependency[Runtime]) -> list[dict[str, Any]]:
        return [volume_json(v) for v in await runtime.require_volumes().list()]

    @get("/{volume_id:str}")
    async def get_volume(
        self, runtime: NamedDependency[Runtime], volume_id: FromPath[str]
    ) -> dict[str, Any]:
        return volume_json(await runtime.require_volumes().get(volume_id))

    @patch("/{volume_id:str}")
    async def resize(
        self, runtime: NamedDependency[Runtime], volume_id: FromPath[str], data: JSONBody[Any]
    ) -> dict[str, Any]:
        if (
            not isinstance(data, dict)
            or set(data) != {"size_mb"}
            or type(data["size_mb"]) is not int
        ):
            raise InvalidVolumeSpec('the body must be {"size_mb": N}, a whole number')
        volume = await runtime.require_volumes().resize(volume_id, data["size_mb"])
        return volume_json(volume)

    @delete("/{volume_id:str}", status_code=204)
    async def delete_volume(
        self, runtime: NamedDependency[Runtime], volume_id: FromPath[str]
    ) -> None:
        await runtime.require_volumes().delete(volume_id)


class AttachmentsController(Controller):
    path = "/instances/{instance_id:str}/volumes"

    @post("/{volume_id:str}", status_code=200)
    async def attach(
        self,
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
        volume_id: FromPath[str],
        data: JSONBody[Any],
    ) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        request = VolumeRequest.from_json({**data, "volume_id": volume_id})
        instance = await runtime.require_instances().attach_volume(instance_id, request)
        return instance_json(instance)

    @delete("/{volume_id:str}", status_code=200)
    async def detach(
        self,
        runtime: NamedDependency[Runtime],
        instance_id: FromPath[str],
        volume_id: FromPath[str],
    ) -> dict[str, Any]:
        instance = await runtime.require_instances().detach_volume(instance_id, volume_id)
        return instance_json(instance)
