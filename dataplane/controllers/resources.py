"""``GET /resources``: the node's capacity, limits, allocations and live use."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get
from litestar.di import NamedDependency

from dataplane.runtime import Runtime


class ResourcesController(Controller):
    @get("/resources")
    async def resources(self, runtime: NamedDependency[Runtime]) -> dict[str, Any]:
        resources = runtime.require_resources()
        allocations = await runtime.require_instances().allocations()
        return (await resources.report(allocations)).to_json()
