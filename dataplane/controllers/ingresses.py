"""``/ingresses``: host ports forwarded into instances (create, list, get, delete)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from dataplane.representations import ingress_json
from dataplane.runtime import Runtime
from managers.ingresses import CreateIngress


class IngressesController(Controller):
    path = "/ingresses"

    @post("/", status_code=201)
    async def create(
        self, runtime: NamedDependency[Runtime], data: JSONBody[Any]
    ) -> dict[str, Any]:
        request = CreateIngress.from_json(data)
        return ingress_json(await runtime.require_ingresses().create(request))

    @get("/")
    async def list_ingresses(self, runtime: NamedDependency[Runtime]) -> list[dict[str, Any]]:
        return [ingress_json(i) for i in await runtime.require_ingresses().list()]

    @get("/{ingress_id:str}")
    async def get_ingress(
        self, runtime: NamedDependency[Runtime], ingress_id: FromPath[str]
    ) -> dict[str, Any]:
        return ingress_json(await runtime.require_ingresses().get(ingress_id))

    @delete("/{ingress_id:str}", status_code=204)
    async def delete_ingress(
        self, runtime: NamedDependency[Runtime], ingress_id: FromPath[str]
    ) -> None:
        await runtime.require_ingresses().delete(ingress_id)
