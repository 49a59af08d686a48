"""Counting and timing every HTTP request by its route template."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dataplane.asgi import ASGIApp, Message, Receive, Scope, Send
from dataplane.metrics.registry import METHODS, UNMATCHED, Metrics
from dataplane.spec import Spec


@dataclass
class MetricsMiddleware:
    """Labels come from the spec's path templates (``/instances/{id}``), never the raw path, so
    the number of series is bounded by the spec whatever clients send."""

    app: ASGIApp
    spec: Spec
    metrics: Metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = self.spec.template_of(scope["path"]) or UNMATCHED
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before it answers

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.requests.labels(method, route, str(status)).inc()
