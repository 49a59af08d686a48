"""Image records on disk: ``images/<hex>/metadata.json`` and ``images/tags/<name>``.

The metadata file holds the public :class:`Image` plus what a rebuild or the blob collector needs
(where the image came from, the blobs it references, when it was last used). Progress is kept in
memory only; the file changes on status changes.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temporaries, write_atomic, write_json_atomic
from ..paths import Paths
from ..quarantine import quarantine
from .types import Image

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    image: Image
    source: str  # "registry" | "archive"
    platform_manifest: str | None = None  # the host platform's manifest as the source served it
    oci_manifest: str | None = None  # the same manifest rewritten to OCI, as stored in the layout
    blobs: tuple[str, ...] = ()
    last_used: float = 0.0
    chain: str | None = None  # the layer chain the disk was built from (disk.chain_id)

    def with_image(self, **changes: Any) -> Record:
        return replace(self, image=replace(self.image, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image.to_dict(),
            "source": self.source,
            "platform_manifest": self.platform_manifest,
            "oci_manifest": self.oci_manifest,
            "blobs": list(self.blobs),
            "last_used": self.last_used,
            "chain": self.chain,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(
            image=Image.from_dict(data["image"]),
            source=str(data.get("source", "registry")),
            platform_manifest=data.get("platform_manifest"),
            oci_manifest=data.get("oci_manifest"),
            blobs=tuple(data.get("blobs", ())),
            last_used=float(data.get("last_used", 0.0)),
            # Absent from records written before disks were shared: such a disk is not shared.
            chain=data.get("chain"),
        )


class RecordStore:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def save(self, record: Record) -> None:
        write_json_atomic(self.paths.image_metadata(record.image.digest), record.to_dict())

    def load_all(self) -> list[Record]:
        """Every readable record; a folder that cannot be read is quarantined, never deleted."""
        records: list[Record] = []
        if not self.paths.images.is_dir():
            return records
        for entry in sorted(self.paths.images.iterdir()):
            if entry == self.paths.image_tags or not entry.is_dir() or entry.is_symlink():
                continue
            meta = entry / "metadata.json"
            try:
                record = Record.from_dict(json.loads(meta.read_bytes()))
                if self.paths.image_dir(record.image.digest) != entry:
                    raise ValueError(f"the record names {record.image.digest}")
            except FileNotFoundError:
                if _only_temporaries(entry):
                    # A build that crashed before its first record was renamed into place
                    # (``_queue`` writes the record before anything else): the folder holds
                    # nothing or only ``.*.tmp`` temporaries, nothing worth keeping.
                    shutil.rmtree(entry, ignore_errors=True)
                    continue
                self._quarantine(entry, "metadata.json is missing")
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self._quarantine(entry, f"metadata.json is unreadable or invalid: {exc}")
                continue
            remove_stale_temporaries(entry)
            records.append(record)
        return records

    def _quarantine(self, folder: Path, reason: str) -> None:
        try:
            moved = quarantine(self.paths, "images", folder, reason)
        except OSError as exc:
            # Left where it is (and not loaded): the next start tries again.
            _log.error("could not quarantine image folder %s (%s): %s", folder, reason, exc)
            return
        _log.warning("quarantined image folder %s to %s: %s", folder, moved, reason)

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.paths.image_dir(digest), ignore_errors=True)

    # -- tags ------------------------------------------------------------------
    def _tag_file(self, name: str) -> Path:
        return self.paths.image_tags / urllib.parse.quote(name, safe="")

    def set_tag(self, name: str, digest: str) -> None:
        write_atomic(self._tag_file(name), digest.encode() + b"\n")

    def remove_tag(self, name: str) -> None:
        self._tag_file(name).unlink(missing_ok=True)

    def load_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        if not self.paths.image_tags.is_dir():
            return tags
        remove_stale_temporaries(self.paths.image_tags)
        for entry in self.paths.image_tags.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                tags[urllib.parse.unquote(entry.name)] = entry.read_text().strip()
            except OSError:
                continue
        return tags


def _only_temporaries(folder: Path) -> bool:
    """Whether ``folder`` is empty or holds only regular ``.*.tmp`` files."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    return all(
        entry.name.startswith(".")
        and entry.name.endswith(".tmp")
        and entry.is_file()
        and not entry.is_symlink()
        for entry in entries
    )
