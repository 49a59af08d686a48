"""Reading Cloud Hypervisor's ``--event-monitor`` file.

v53 writes each event as a pretty-printed JSON object followed by a blank line (not JSON Lines),
so the file is read as a stream of concatenated JSON values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChEvent:
    seconds: float
    source: str
    event: str
    properties: dict[str, str] | None


def parse_events(text: str) -> list[ChEvent]:
    """Every complete event in ``text``; a half-written last object is left for the next read."""
    decoder = json.JSONDecoder()
    events: list[ChEvent] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return events
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return events
        if not isinstance(value, dict):
            continue
        stamp = value.get("timestamp") or {}
        events.append(
            ChEvent(
                seconds=float(stamp.get("secs", 0)) + float(stamp.get("nanos", 0)) / 1e9,
                source=str(value.get("source", "")),
                event=str(value.get("event", "")),
                properties=value.get("properties"),
            )
        )
