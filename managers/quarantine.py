"""Quarantine: what the dataplane cannot read it moves aside whole, and never deletes.

A folder whose record is unreadable or invalid may still hold what a user cares about
(an overlay disk, a snapshot). Recovery therefore renames the whole folder into
``DATA_DIR/quarantine/<kind>/<name>-<UTC time>/`` and writes ``QUARANTINE.json`` beside
its contents, saying where it came from and why. Only an operator removes it.

The rename comes first and the note second: a crash between the two leaves a quarantined
folder without its note, which :func:`quarantined` still lists.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from managers.atomic import write_json_atomic
from managers.clock import iso_from_seconds, now_iso
from managers.paths import QUARANTINE_NOTE, Paths


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One quarantined folder as recovery left it."""

    kind: str
    name: str
    path: Path
    reason: str
    quarantined_at: str


def quarantine(paths: Paths, kind: str, folder: Path, reason: str) -> Path:
    """Move ``folder`` into the quarantine of ``kind`` and note why; return its new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target_dir = paths.quarantine_kind(kind)
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = target_dir / f"{folder.name}-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target_dir / f"{folder.name}-{stamp}-{suffix}"
    os.rename(folder, target)
    write_json_atomic(
        target / QUARANTINE_NOTE,
        {
            "kind": kind,
            "name": folder.name,
            "original_path": str(folder),
            "reason": reason,
            "quarantined_at": now_iso(),
        },
    )
    return target


def quarantined(paths: Paths, kind: str) -> list[Quarantined]:
    """Every quarantined folder of ``kind``, sorted by folder name (``<name>-<UTC time>``)."""
    root = paths.quarantine_kind(kind)
    try:
        entries = sorted(entry for entry in root.iterdir() if entry.is_dir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name, reason, at = entry.name.rsplit("-", 1)[0], "unknown", ""
        try:
            note = json.loads((entry / QUARANTINE_NOTE).read_bytes())
            if isinstance(note, dict):
                name = str(note.get("name", name))
                reason = str(note.get("reason", reason))
                at = str(note.get("quarantined_at", at))
        except (OSError, ValueError):
            pass
        if not at:
            at = iso_from_seconds(entry.stat().st_mtime)
        found.append(
            Quarantined(kind=kind, name=name, path=entry, reason=reason, quarantined_at=at)
        )
    return found
