"""The events subsystem as the runtime runs it: the log, the recorder and the webhooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup

from managers.paths import Paths

from .log import EventLog, Retention
from .recorder import EventRecorder, Renderers
from .webhooks import Endpoint, client, signer_for

log = logging.getLogger("dataplane.events")


@dataclass(frozen=True, slots=True)
class EventSettings:
    node_id: str
    endpoints: tuple[str, ...] = ()
    secret: str | None = None
    max_age_seconds: float = 24 * 3600.0
    retention: Retention = field(default_factory=Retention)


class EventService:
    """Open the log before the managers (they report into it), start delivery after them."""

    def __init__(self, paths: Paths, settings: EventSettings) -> None:
        self.paths = paths
        self.settings = settings
        self.log = EventLog(paths, settings.retention)
        self.recorder: EventRecorder | None = None
        self.endpoints: list[Endpoint] = []
        self._client: httpx.AsyncClient | None = None
        self._pending: list[tuple[str, str, dict[str, Any]]] = []

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self.log.open)

    def report(self, kind: str, resource_id: str, data: dict[str, Any]) -> None:
        """A change that happened, with the resource as it then read; reports made before
        :meth:`start` wait for it."""
        if self.recorder is None:
            self._pending.append((kind, resource_id, data))
        else:
            self.recorder.report(kind, resource_id, data)

    async def start(
        self,
        tasks: TaskGroup,
        render: Renderers,
        instances: dict[str, str],
        images: dict[str, str],
        volumes: frozenset[str] | None = None,
        ingresses: frozenset[str] | None = None,
    ) -> None:
        """Reconcile the log with the records, then record and deliver in ``tasks``."""
        recorder = EventRecorder(self.log, self.settings.node_id, render)
        await recorder.reconcile(instances, images, volumes, ingresses)
        self.recorder = recorder
        for kind, resource_id, data in self._pending:
            recorder.report(kind, resource_id, data)
        self._pending.clear()
        tasks.start_soon(recorder.run)
        if self.settings.endpoints and self.settings.secret:
            self._client = client()
            signer = signer_for(self.settings.secret)
            cursors = self.log.root / "cursors"
            await anyio.Path(cursors).mkdir(mode=0o700, exist_ok=True)
            for url in self.settings.endpoints:
                endpoint = Endpoint(
                    url, self.log, signer, self._client, self.settings.max_age_seconds, cursors
                )
                await anyio.to_thread.run_sync(endpoint.load_cursor)
                self.endpoints.append(endpoint)
                tasks.start_soon(endpoint.run)
                log.info("delivering events to %s from event %d", url, endpoint.stats.cursor + 1)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
