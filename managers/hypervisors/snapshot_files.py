"""Checks on snapshot directories, shared by both backends (bad input changes nothing)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import InvalidRequest


def check_destination(instance_id: str, destination: Path) -> None:
    """A snapshot goes into an existing, empty directory given by an absolute path."""
    if not destination.is_absolute():
        raise InvalidRequest(instance_id, f"snapshot path {str(destination)!r} must be absolute")
    if not destination.is_dir():
        raise InvalidRequest(instance_id, f"snapshot directory {str(destination)!r} does not exist")
    if any(destination.iterdir()):
        raise InvalidRequest(instance_id, f"snapshot directory {str(destination)!r} is not empty")


def check_snapshot_dir(instance_id: str, source: Path, required: Iterable[str]) -> None:
    if not source.is_absolute():
        raise InvalidRequest(instance_id, f"snapshot path {str(source)!r} must be absolute")
    missing = [name for name in required if not (source / name).is_file()]
    if missing:
        raise InvalidRequest(
            instance_id,
            f"{str(source)!r} is not a snapshot of this backend (missing {', '.join(missing)})",
        )
