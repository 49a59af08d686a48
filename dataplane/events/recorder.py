"""From the managers' change reports to events in the log, and reconciliation at start-up.

The managers report a change (``"instance.paused"`` and the instance as it then reads) once it
has happened; the edge renders that as ``GET`` would show it, and the recorder appends the event.
Reports are queued and written in order by one task, so the log's fsync never holds the manager
that reported.

A crash between a change and its event loses nothing: at start-up :meth:`EventRecorder.reconcile`
compares what the log last said of every resource with what the records say now, and writes
the events that are missing (a resource the log never announced, one whose state moved on, one
that is gone). An event is never written for a change that then failed: managers report only
after success, and reconciliation only reports what the records show.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from managers.clock import now_iso
from managers.failpoints import failpoint

from .log import EventLog
from .types import Change, Event, EventType, ResourceKind

log = logging.getLogger("dataplane.events")

Render = Callable[[str], Awaitable[dict[str, Any] | None]]

# The event that announces each state an instance can rest in, and what each event implies.
_STATE_EVENT = {
    "Created": EventType.INSTANCE_CREATED,
    "Initializing": EventType.INSTANCE_STARTED,
    "Running": EventType.INSTANCE_STARTED,
    "Paused": EventType.INSTANCE_PAUSED,
    "Shutdown": EventType.INSTANCE_EXITED,
    "Stopped": EventType.INSTANCE_STOPPED,
    "Standby": EventType.INSTANCE_STANDBY,
}
_IMPLIED_STATES: dict[EventType, frozenset[str]] = {
    EventType.INSTANCE_CREATED: frozenset({"Created", "Initializing", "Running"}),
    EventType.INSTANCE_STARTED: frozenset({"Initializing", "Running"}),
    EventType.INSTANCE_REBOOTED: frozenset({"Initializing", "Running"}),
    EventType.INSTANCE_RESUMED: frozenset({"Initializing", "Running"}),
    EventType.INSTANCE_RESTORED: frozenset({"Initializing", "Running"}),
    EventType.INSTANCE_PAUSED: frozenset({"Paused"}),
    EventType.INSTANCE_STANDBY: frozenset({"Standby"}),
    EventType.INSTANCE_STOPPED: frozenset({"Stopped"}),
    EventType.INSTANCE_EXITED: frozenset({"Stopped", "Shutdown"}),
    # A failure leaves whatever state it left; the next change is announced as usual.
    EventType.INSTANCE_FAILED: frozenset(
        {"Created", "Initializing", "Running", "Paused", "Shutdown", "Stopped", "Standby"}
        | {"Unknown"}
    ),
}


@dataclass(frozen=True, slots=True)
class Renderers:
    """How the edge shows a resource (``GET``'s body), or None once it is gone."""

    instance: Render
    image: Render
    volume: Render | None = None
    ingress: Render | None = None

    def of(self, kind: ResourceKind) -> Render | None:
        return {
            ResourceKind.INSTANCE: self.instance,
            ResourceKind.IMAGE: self.image,
            ResourceKind.VOLUME: self.volume,
            ResourceKind.INGRESS: self.ingress,
        }[kind]


class EventRecorder:
    def __init__(self, events: EventLog, node_id: str, render: Renderers) -> None:
        self.events = events
        self.node_id = node_id
        self.render = render
        send, receive = anyio.create_memory_object_stream[Change](math.inf)
        self._send = send
        self._receive = receive
        # The last body seen per resource: a deleted resource's event carries it.
        self._last_data: dict[str, dict[str, Any]] = {}

    def report(self, kind: str, resource_id: str, data: dict[str, Any] | None = None) -> None:
        """Queue a change that happened (on the event loop; never blocks)."""
        try:
            change = Change(EventType(kind), resource_id, data)
        except ValueError:
            log.error("a manager reported an unknown change %r", kind)
            return
        self._send.send_nowait(change)

    async def run(self) -> None:
        """Record reported changes, in order, until cancelled."""
        async for change in self._receive:
            try:
                await self.record(change.type, change.resource_id, change.data)
            except Exception:
                # Reconciliation at the next start writes what this could not.
                log.exception("could not record %s of %s", change.type, change.resource_id)

    async def record(
        self, kind: EventType, resource_id: str, data: dict[str, Any] | None = None
    ) -> Event:
        key = f"{kind.kind}:{resource_id}"
        if data is None:
            render = self.render.of(kind.kind)
            data = await render(resource_id) if render is not None else None
        if data is None:
            data = self._last_data.get(key) or {"id": resource_id}
        self._last_data[key] = data
        stamp = now_iso()
        failpoint("events.reported")

        def build(seq: int, event_id: str) -> Event:
            return Event(seq, event_id, kind, self.node_id, resource_id, data, stamp)

        event = await anyio.to_thread.run_sync(self.events.append, build)
        self.events.notify()
        return event

    async def reconcile(
        self,
        instances: dict[str, str],
        images: dict[str, str],
        volumes: frozenset[str] | None = None,
        ingresses: frozenset[str] | None = None,
    ) -> int:
        """Write what the log misses: ``instances`` maps id -> state, ``images`` name -> status
        (``ready`` | ``failed`` | other), ``volumes`` and ``ingresses`` hold their ids (None:
        not reconciled). Returns how many events were written."""
        written = 0
        for instance_id, state in instances.items():
            last = self.events.last_types.get(f"instance:{instance_id}")
            for wanted in _instance_events(last, state):
                await self.record(wanted, instance_id)
                written += 1
        for name, status in images.items():
            last = self.events.last_types.get(f"image:{name}")
            wanted_image = {"ready": EventType.IMAGE_READY, "failed": EventType.IMAGE_FAILED}
            event = wanted_image.get(status)
            if event is not None and last != event:
                await self.record(event, name)
                written += 1
        created = ((volumes, EventType.VOLUME_CREATED), (ingresses, EventType.INGRESS_CREATED))
        for ids, creation in created:
            for resource_id in sorted(ids or ()):
                if f"{creation.kind}:{resource_id}" not in self.events.last_types:
                    await self.record(creation, resource_id)
                    written += 1
        removals = {
            "instance": (instances, EventType.INSTANCE_DELETED),
            "image": (images, EventType.IMAGE_DELETED),
            "volume": (volumes, EventType.VOLUME_DELETED),
            "ingress": (ingresses, EventType.INGRESS_DELETED),
        }
        for key, last in list(self.events.last_types.items()):
            kind, _, resource_id = key.partition(":")
            if EventType(last).removes or kind not in removals:
                continue
            present, removal = removals[kind]
            if present is not None and resource_id not in present:
                await self.record(removal, resource_id)
                written += 1
        if written:
            log.info("wrote %d events a restart found missing", written)
        return written


def _instance_events(last: str | None, state: str) -> list[EventType]:
    """What to write for an instance whose last event was ``last`` and which is now ``state``."""
    missing: list[EventType] = []
    if last is None:
        missing.append(EventType.INSTANCE_CREATED)
        last = EventType.INSTANCE_CREATED.value
    implied = _IMPLIED_STATES.get(EventType(last), frozenset())
    now = _STATE_EVENT.get(state)
    if state not in implied and state != "Unknown" and now is not None:
        missing.append(now)
    return missing
