"""Health, probes and the contract document."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from dataplane.errors import ApiError
from dataplane.runtime import Runtime


class MetaController(Controller):
    @get("/health", sync_to_thread=False)
    def health(self, runtime: NamedDependency[Runtime]) -> dict[str, Any]:
        hypervisor = runtime.hypervisor
        return {
            "status": runtime.phase,
            "version": runtime.version,
            "node_id": runtime.settings.node_id,
            "uptime_seconds": round(runtime.uptime_seconds, 3),
            "hypervisor": {
                "kind": hypervisor.kind,
                "version": hypervisor.version,
                "acceleration": hypervisor.acceleration,
            },
            "guest": {"status": runtime.guest_status, "error": runtime.artifacts_error},
        }

    @get(["/livez", "/healthz"], sync_to_thread=False)
    def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", sync_to_thread=False)
    def ready(self, runtime: NamedDependency[Runtime]) -> dict[str, str]:
        if runtime.phase != "ok":
            raise ApiError(503, "unavailable", f"not ready: {runtime.phase}")
        return {"status": "ok"}

    @get("/spec.yaml", sync_to_thread=False)
    def spec_yaml(self, runtime: NamedDependency[Runtime]) -> Response[bytes]:
        return Response(runtime.spec.raw_yaml, media_type="application/yaml")

    @get("/spec.json", sync_to_thread=False)
    def spec_json(self, runtime: NamedDependency[Runtime]) -> Response[bytes]:
        return Response(runtime.spec.raw_json, media_type="application/json")
