"""The event log on its own: durable appends, torn tails, retention, quarantine, reconciliation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dataplane.events import Event, EventLog, EventRecorder, EventType, Renderers, Retention
from dataplane.events import log as event_log
from managers.paths import Paths

pytestmark = pytest.mark.anyio


def add(events: EventLog, kind: EventType, resource: str, **data: Any) -> Event:
    return events.append(
        lambda seq, event_id: Event(
            seq, event_id, kind, "NODE_1", resource, {"id": resource, **data},
            "2026-12-06T05:00:00.000Z",
        )
    )  # fmt: skip


def opened(root: Path, retention: Retention | None = None) -> EventLog:
    paths = Paths(root)
    paths.ensure()
    events = EventLog(paths, retention)
    events.open()
    return events


def test_events_survive_a_restart_with_their_order_and_ids(tmp_path: Path) -> None:
    events = opened(tmp_path)
    first = add(events, EventType.INSTANCE_CREATED, "a")
    add(events, EventType.INSTANCE_PAUSED, "a")
    again = opened(tmp_path)
    assert [e.id for e in again.read_from(1)] == [first.id, events.event_id(2)]
    assert EventLog.seq_of(first.id) == 1
    assert EventLog.seq_of("evt_nonsense") is None
    assert again.next_seq == 3
    assert again.last_types == {"instance:a": "instance.paused"}


def test_a_torn_last_line_is_cut_and_its_number_reused(tmp_path: Path) -> None:
    events = opened(tmp_path)
    add(events, EventType.IMAGE_READY, "alpine")
    (segment,) = (tmp_path / "events" / "log").glob("events-*.jsonl")
    with segment.open("ab") as handle:
        handle.write(b'{"seq": 2, "type": "instance.cre')
    again = opened(tmp_path)
    assert [e.seq for e in again.read_from(1)] == [1]
    assert again.next_seq == 2
    assert segment.read_bytes().endswith(b"}\n")


def test_a_damaged_segment_is_quarantined_not_deleted(tmp_path: Path) -> None:
    events = opened(tmp_path)
    old = add(events, EventType.IMAGE_READY, "alpine")
    add(events, EventType.IMAGE_DELETED, "alpine")
    (segment,) = (tmp_path / "events" / "log").glob("events-*.jsonl")
    lines = segment.read_bytes().splitlines(keepends=True)
    segment.write_bytes(b"not json\n" + lines[1])
    again = opened(tmp_path)
    assert list(again.read_from(1)) == []
    moved = list((tmp_path / "quarantine" / "events").iterdir())
    assert len(moved) == 1
    assert (moved[0] / segment.name).read_bytes().startswith(b"not json")
    assert add(again, EventType.IMAGE_READY, "alpine").id != old.id, "an id was reused"


def test_retention_drops_whole_segments_and_remembers_what_they_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_log, "SEGMENT_BYTES", 1024)
    events = opened(tmp_path, Retention(max_bytes=3000, max_age_seconds=1e9))
    add(events, EventType.INSTANCE_CREATED, "old")
    for index in range(40):
        add(events, EventType.INSTANCE_PAUSED, f"busy{index % 3}", pad="x" * 60)
    assert events.first_seq > 1
    again = opened(tmp_path, Retention(max_bytes=3000, max_age_seconds=1e9))
    assert again.first_seq == events.first_seq
    # The creation of "old" was dropped, but what it announced is still known.
    assert again.last_types["instance:old"] == "instance.created"


async def test_reconciliation_writes_only_what_is_missing(tmp_path: Path) -> None:
    events = opened(tmp_path)
    add(events, EventType.INSTANCE_CREATED, "kept")
    add(events, EventType.INSTANCE_STARTED, "kept")
    add(events, EventType.INSTANCE_CREATED, "moved-on")
    add(events, EventType.INSTANCE_CREATED, "gone")
    add(events, EventType.IMAGE_READY, "alpine")

    async def render(resource: str) -> dict[str, Any] | None:
        return {"id": resource}

    recorder = EventRecorder(events, "NODE_1", Renderers(render, render))
    states = {"kept": "Running", "moved-on": "Paused", "new": "Stopped"}
    written = await recorder.reconcile(states, {"alpine": "ready"})
    tail = [(e.type.value, e.resource_id) for e in events.read_from(6)]
    assert written == len(tail)
    assert sorted(tail) == sorted(
        [
            ("instance.paused", "moved-on"),
            ("instance.created", "new"),
            ("instance.stopped", "new"),
            ("instance.deleted", "gone"),
        ]
    )
    assert await recorder.reconcile(states, {"alpine": "ready"}) == 0


async def test_reconciliation_announces_volumes_made_or_removed_meanwhile(tmp_path: Path) -> None:
    events = opened(tmp_path)
    add(events, EventType.VOLUME_CREATED, "aaaaaaaaaaaa")
    add(events, EventType.VOLUME_ATTACHED, "aaaaaaaaaaaa")
    add(events, EventType.VOLUME_CREATED, "bbbbbbbbbbbb")

    async def render(resource: str) -> dict[str, Any] | None:
        return {"id": resource}

    recorder = EventRecorder(events, "NODE_1", Renderers(render, render, render))
    volumes = frozenset({"aaaaaaaaaaaa", "cccccccccccc"})
    assert await recorder.reconcile({}, {}, volumes) == 2
    tail = [
        (e.type.value, e.resource_id, e.envelope().get("volume_id")) for e in events.read_from(4)
    ]
    assert sorted(tail) == [
        ("volume.created", "cccccccccccc", "cccccccccccc"),
        ("volume.deleted", "bbbbbbbbbbbb", "bbbbbbbbbbbb"),
    ]
    assert await recorder.reconcile({}, {}, volumes) == 0
    # A node reconciled without volumes (None) leaves their events alone.
    assert await recorder.reconcile({}, {}) == 0
