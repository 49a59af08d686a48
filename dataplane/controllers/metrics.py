"""``GET /metrics``: the Prometheus text exposition (see ``dataplane/metrics``)."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from dataplane.metrics import exposition
from dataplane.runtime import Runtime

# The classic text format, which every Prometheus reads (Litestar adds the charset).
CONTENT_TYPE = "text/plain; version=0.0.4"


class MetricsController(Controller):
    @get("/metrics")
    async def metrics(self, runtime: NamedDependency[Runtime]) -> Response[bytes]:
        return Response(await exposition(runtime), media_type=CONTENT_TYPE)
