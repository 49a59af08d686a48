"""The node's events: a durable log, webhooks from it, and the stream ``/events`` serves.

See README.md for the decisions.
"""

from __future__ import annotations

from .log import EventLog, Retention
from .recorder import EventRecorder, Renderers
from .service import EventService, EventSettings
from .types import Event, EventType, ResourceKind
from .webhooks import Endpoint, EndpointStats

__all__ = [
    "Endpoint",
    "EndpointStats",
    "Event",
    "EventLog",
    "EventRecorder",
    "EventService",
    "EventSettings",
    "EventType",
    "Renderers",
    "ResourceKind",
    "Retention",
]
