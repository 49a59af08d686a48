"""The one way the managers write a moment: ISO 8601 UTC with milliseconds and a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    """Now, as every record and API field spells a time."""
    return iso(datetime.now(UTC))


def iso_from_seconds(seconds: float) -> str:
    """A Unix time, spelt as :func:`now_iso` spells now."""
    return iso(datetime.fromtimestamp(seconds, UTC))


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
