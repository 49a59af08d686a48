"""``volumes/<id>/``: one folder per volume, holding ``metadata.json`` and ``data.raw``.

A volume is built whole in ``volumes/.creating-<id>/`` and renamed into place in one step,
the commit point of a create; a delete renames the folder to ``volumes/.deleting-<id>-<hex>/``
before removing it. Start-up removes both kinds of leftover: a folder still being created was
never promised to anyone, and one being deleted was already gone for its caller. Every method
touches the disk: call them in a worker thread.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from managers.atomic import fsync_dir, remove_stale_temporaries, write_json_atomic
from managers.paths import Paths
from managers.volumes.errors import VolumeRecordInvalid
from managers.volumes.types import VolumeRecord

CREATING_PREFIX = ".creating-"
DELETING_PREFIX = ".deleting-"
STAGING_PREFIX = ".staging-"


@dataclass(slots=True)
class Scan:
    records: list[VolumeRecord] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # folder name -> why
    leftovers: list[str] = field(default_factory=list)  # creates and deletes a crash cut short


class VolumeStore:
    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    @property
    def root(self) -> Path:
        return self._paths.volumes

    def scan(self) -> Scan:
        """Read every volume folder once, and remove what a crash left half made or half gone."""
        found = Scan()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.startswith((CREATING_PREFIX, DELETING_PREFIX, STAGING_PREFIX)):
                shutil.rmtree(entry.path, ignore_errors=True)
                found.leftovers.append(entry.name)
                continue
            if entry.name.startswith("."):
                continue
            folder = Path(entry.path)
            remove_stale_temporaries(folder)
            try:
                record = VolumeRecord.from_json(json.loads((folder / "metadata.json").read_bytes()))
                if record.id != entry.name:
                    raise VolumeRecordInvalid(f"the record names volume {record.id!r}")
                if not (folder / "data.raw").is_file():
                    raise VolumeRecordInvalid("data.raw is missing")
            except FileNotFoundError:
                found.unreadable[entry.name] = "metadata.json is missing"
                continue
            except (OSError, ValueError, VolumeRecordInvalid) as error:
                found.unreadable[entry.name] = f"metadata.json is unreadable or invalid: {error}"
                continue
            os.chmod(folder, 0o700)
            found.records.append(record)
        return found

    def staging(self, volume_id: str) -> Path:
        """A private folder to build volume ``volume_id`` in."""
        folder = self.root / f"{CREATING_PREFIX}{volume_id}"
        folder.mkdir(mode=0o700)
        return folder

    def scratch(self, volume_id: str) -> Path:
        """A private folder for a tree being unpacked (removed by the caller, or at start-up)."""
        folder = self.root / f"{STAGING_PREFIX}{volume_id}-{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
        return folder

    def commit(self, staging: Path, record: VolumeRecord) -> None:
        """Write the record into ``staging``, make its data durable, and rename it into place."""
        write_json_atomic(staging / "metadata.json", record.to_json())
        _fsync_file(staging / "data.raw")
        os.rename(staging, self._paths.volume_dir(record.id))
        fsync_dir(self.root)

    def save(self, record: VolumeRecord) -> None:
        write_json_atomic(self._paths.volume_metadata(record.id), record.to_json())

    def remove(self, volume_id: str) -> None:
        """Rename the folder to a tombstone in one step (the commit of a delete), then remove it."""
        folder = self._paths.volume_dir(volume_id)
        tombstone = self.root / f"{DELETING_PREFIX}{volume_id}-{secrets.token_hex(4)}"
        os.rename(folder, tombstone)
        fsync_dir(self.root)
        shutil.rmtree(tombstone, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
