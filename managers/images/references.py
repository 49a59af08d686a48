"""Which image disks instance records on disk still reference, read or not.

The instance manager's ``acquire``/``release`` counts cover the instances it has loaded. This
covers the rest: records it has not loaded yet (the image manager starts first), records it
could not read, and quarantined ones. A record that cannot be parsed may still name its image,
so every record file is scanned as raw bytes for the hex of each known image digest (which
appears both in ``image.digest`` and in the disk's path ``images/<hex>/rootfs.<fmt>``).

An unreadable record that names no image digest at all (a file truncated to zero bytes, cut
before its ``image`` field, or that cannot even be opened) could reference any image: it is
*opaque*. Automatic removal (cache eviction, a failed build's cleanup) then keeps every disk;
an explicit delete may still remove an image no record mentions.

:func:`scan` reads files: call it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import Paths

# A digest as a record spells one; a truncated record that still holds one names its image.
_ANY_DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")
_RECORD = "metadata.json"


@dataclass(frozen=True, slots=True)
class References:
    """What the instance records on disk said when they were scanned."""

    # known image digest -> the record files that mention it
    by_digest: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    # unreadable records that name no digest: they may reference any image
    opaque: tuple[Path, ...] = ()

    def holders(self, digest: str) -> tuple[Path, ...]:
        """The record files that mention ``digest``."""
        return self.by_digest.get(digest, ())


def record_files(paths: Paths) -> Iterator[Path]:
    """Every instance record, live or quarantined, whether it parses or not.

    A folder that cannot be listed is yielded itself: reading it fails, so it counts as an
    opaque record, and nothing is removed on the strength of records that could not be seen.
    """
    for folder in (paths.instances, paths.quarantine_kind("instances")):
        try:
            entries = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            yield folder
            continue
        for entry in entries:
            record = entry / _RECORD
            try:
                # A dangling symlink or an unreadable file is still a record we cannot read.
                if entry.is_dir() and (record.exists() or record.is_symlink()):
                    yield record
            except OSError:
                yield record


def scan(paths: Paths, digests: Iterable[str]) -> References:
    """Scan every instance record for the hex of each of ``digests``; in a thread."""
    needles = {digest: digest.partition(":")[2].encode() for digest in dict.fromkeys(digests)}
    needles = {digest: hexpart for digest, hexpart in needles.items() if hexpart}
    mentioned: dict[str, list[Path]] = {}
    opaque: list[Path] = []
    for record in record_files(paths):
        try:
            data = record.read_bytes()
        except OSError:
            opaque.append(record)
            continue
        found = [digest for digest, hexpart in needles.items() if hexpart in data]
        for digest in found:
            mentioned.setdefault(digest, []).append(record)
        if not found and not _names_a_digest(data):
            opaque.append(record)
    return References(
        by_digest={digest: tuple(files) for digest, files in mentioned.items()},
        opaque=tuple(opaque),
    )


def _names_a_digest(data: bytes) -> bool:
    """Whether a record says which image it uses (possibly one this node no longer has)."""
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if isinstance(record, dict):
        image = record.get("image")
        if isinstance(image, dict) and isinstance(image.get("digest"), str):
            return True
    return _ANY_DIGEST.search(data) is not None
