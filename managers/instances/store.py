"""Instance records on disk: one ``metadata.json`` per instance folder, written atomically.

:meth:`InstanceStore.scan` sorts every folder into readable records, folders that hold
nothing but what a crash inside the first record write leaves (removable), and folders
whose record cannot be read (recovery quarantines those; nothing here deletes them). All
methods touch the disk: call them in a worker thread.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from managers.atomic import fsync_dir, write_json_atomic
from managers.instances.errors import RecordInvalid
from managers.instances.types import InstanceRecord
from managers.paths import TOMBSTONE_PREFIX, Paths


@dataclass(slots=True)
class Scan:
    """What start-up found under ``instances/``."""

    records: list[InstanceRecord] = field(default_factory=list)
    # folder name -> why its record cannot be used
    unreadable: dict[str, str] = field(default_factory=dict)
    # folders with no record and nothing but temporaries: a create killed in its first write
    unborn: list[str] = field(default_factory=list)


class InstanceStore:
    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    def scan(self) -> Scan:
        """Read every instance folder once (start-up)."""
        found = Scan()
        for name in self._folders():
            try:
                found.records.append(self._read(name))
            except FileNotFoundError:
                if _only_temporaries(self._paths.instance_dir(name)):
                    found.unborn.append(name)
                else:
                    found.unreadable[name] = "metadata.json is missing"
            except (OSError, ValueError, RecordInvalid) as error:
                found.unreadable[name] = f"metadata.json is unreadable or invalid: {error}"
        return found

    def create_folder(self, instance_id: str) -> None:
        """The folder and its ``logs/``, private to root, made durable before the first record."""
        folder = self._paths.instance_dir(instance_id)
        folder.mkdir(mode=0o700)
        self._paths.instance_logs(instance_id).mkdir(mode=0o700)
        fsync_dir(folder.parent)

    def save(self, record: InstanceRecord) -> None:
        write_json_atomic(self._paths.instance_metadata(record.id), record.to_json())

    def remove(self, instance_id: str) -> None:
        """Remove an instance whose removal is decided (delete, or a create rolled back).

        The folder is first renamed, in one step, to a tombstone that no scan reads as an
        instance; a crash while its contents are removed leaves the tombstone, which the next
        start finishes removing (:meth:`sweep_tombstones`). So a delete cut short never comes
        back as a quarantined folder, and no half-removed instance is ever seen.
        """
        folder = self._paths.instance_dir(instance_id)
        tombstone = folder.with_name(f"{TOMBSTONE_PREFIX}{instance_id}-{secrets.token_hex(4)}")
        try:
            os.rename(folder, tombstone)
        except FileNotFoundError:
            return
        fsync_dir(folder.parent)
        shutil.rmtree(tombstone, ignore_errors=True)

    def sweep_tombstones(self) -> list[str]:
        """Finish removals a crash cut short; returns the tombstones removed."""
        try:
            entries = [
                e for e in os.scandir(self._paths.instances) if e.name.startswith(TOMBSTONE_PREFIX)
            ]
        except FileNotFoundError:
            return []
        for entry in entries:
            shutil.rmtree(entry.path, ignore_errors=True)
        return [entry.name for entry in entries]

    def remove_unborn(self, instance_id: str) -> None:
        shutil.rmtree(self._paths.instance_dir(instance_id), ignore_errors=True)

    def _read(self, name: str) -> InstanceRecord:
        data = json.loads(self._paths.instance_metadata(name).read_bytes())
        record = InstanceRecord.from_json(data)
        if record.id != name:
            raise RecordInvalid(f"the record names instance {record.id!r}")
        return record

    def _folders(self) -> list[str]:
        try:
            entries = list(os.scandir(self._paths.instances))
        except FileNotFoundError:
            return []
        return sorted(
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
        )


def _only_temporaries(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but an empty ``logs/`` and ``.*.tmp`` files."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    for entry in entries:
        if entry.name == "logs" and entry.is_dir() and not entry.is_symlink():
            if any(entry.iterdir()):
                return False
            continue
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file()):
            return False
    return True
