"""The node's events: what changed, to which resource, and the resource as it now reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ResourceKind(enum.StrEnum):
    INSTANCE = "instance"
    IMAGE = "image"
    VOLUME = "volume"
    INGRESS = "ingress"

    @property
    def id_field(self) -> str:
        """How the envelope names the resource (seed 000's ``instance_id``; images by name)."""
        return {
            "instance": "instance_id",
            "image": "image",
            "volume": "volume_id",
            "ingress": "ingress_id",
        }[self.value]


class EventType(enum.StrEnum):
    IMAGE_READY = "image.ready"
    IMAGE_FAILED = "image.failed"
    IMAGE_DELETED = "image.deleted"
    INSTANCE_CREATED = "instance.created"
    INSTANCE_STARTED = "instance.started"
    INSTANCE_EXITED = "instance.exited"
    INSTANCE_STOPPED = "instance.stopped"
    INSTANCE_REBOOTED = "instance.rebooted"
    INSTANCE_PAUSED = "instance.paused"
    INSTANCE_RESUMED = "instance.resumed"
    INSTANCE_STANDBY = "instance.standby"
    INSTANCE_RESTORED = "instance.restored"
    INSTANCE_DELETED = "instance.deleted"
    INSTANCE_FAILED = "instance.failed"
    VOLUME_CREATED = "volume.created"
    VOLUME_RESIZED = "volume.resized"
    VOLUME_ATTACHED = "volume.attached"
    VOLUME_DETACHED = "volume.detached"
    VOLUME_DELETED = "volume.deleted"
    INGRESS_CREATED = "ingress.created"
    INGRESS_DELETED = "ingress.deleted"

    @property
    def kind(self) -> ResourceKind:
        return ResourceKind(self.value.split(".", 1)[0])

    @property
    def removes(self) -> bool:
        return self in (
            EventType.IMAGE_DELETED,
            EventType.INSTANCE_DELETED,
            EventType.VOLUME_DELETED,
            EventType.INGRESS_DELETED,
        )


@dataclass(frozen=True, slots=True)
class Change:
    """What a manager reports after a change has happened (before it is rendered)."""

    type: EventType
    resource_id: str
    # The resource as its GET read at the change (rendered then, so a later change cannot
    # show through); None asks the recorder to render it when it records.
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded event. ``seq`` orders the node's events; ``id`` is ``evt_`` + seq + the
    log's own tag, so ids never repeat across nodes or a wiped ``DATA_DIR``."""

    seq: int
    id: str
    type: EventType
    node_id: str
    resource_id: str
    data: dict[str, Any]
    timestamp: str

    @property
    def kind(self) -> ResourceKind:
        return self.type.kind

    def envelope(self) -> dict[str, Any]:
        """Seed 000's payload: what webhooks send and ``/events`` streams."""
        return {
            "object": "event",
            "id": self.id,
            "node_id": self.node_id,
            "type": str(self.type),
            self.kind.id_field: self.resource_id,
            "data": self.data,
            "timestamp": self.timestamp,
        }

    def to_record(self) -> dict[str, Any]:
        return {"seq": self.seq, **self.envelope()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Event:
        kind = EventType(record["type"])
        return cls(
            seq=int(record["seq"]),
            id=str(record["id"]),
            type=kind,
            node_id=str(record["node_id"]),
            resource_id=str(record[kind.kind.id_field]),
            data=dict(record["data"]),
            timestamp=str(record["timestamp"]),
        )
