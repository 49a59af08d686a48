"""``ingresses/<id>/metadata.json``: one folder per ingress.

A record is written in ``ingresses/.creating-<id>/`` and renamed into place in one step, the
commit point of a create; a delete renames the folder to ``ingresses/.deleting-<id>-<hex>/``
before removing it, the commit point of a delete. Start-up removes both kinds of leftover,
and moves a folder whose record it cannot read to quarantine. Every method touches the disk:
call them in a worker thread.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from managers.atomic import fsync_dir, remove_stale_temporaries, write_json_atomic
from managers.ingresses.errors import IngressRecordInvalid
from managers.ingresses.types import IngressRecord
from managers.paths import Paths
from managers.quarantine import quarantine

CREATING_PREFIX = ".creating-"
DELETING_PREFIX = ".deleting-"
QUARANTINE_KIND = "ingresses"


@dataclass(slots=True)
class Scan:
    records: list[IngressRecord] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)  # folder name -> why
    leftovers: list[str] = field(default_factory=list)


class IngressStore:
    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    @property
    def root(self) -> Path:
        return self._paths.ingresses

    def scan(self) -> Scan:
        """Read every record once; remove half-made and half-gone folders, quarantine the
        unreadable ones."""
        found = Scan()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.startswith((CREATING_PREFIX, DELETING_PREFIX)):
                shutil.rmtree(entry.path, ignore_errors=True)
                found.leftovers.append(entry.name)
                continue
            if entry.name.startswith("."):
                continue
            folder = Path(entry.path)
            remove_stale_temporaries(folder)
            try:
                record = IngressRecord.from_json(
                    json.loads((folder / "metadata.json").read_bytes())
                )
                if record.id != entry.name:
                    raise IngressRecordInvalid(f"the record names ingress {record.id!r}")
            except (OSError, ValueError, IngressRecordInvalid) as error:
                reason = f"metadata.json is missing, unreadable or invalid: {error}"
                quarantine(self._paths, QUARANTINE_KIND, folder, reason)
                found.quarantined[entry.name] = reason
                continue
            found.records.append(record)
        fsync_dir(self.root)
        return found

    def commit(self, record: IngressRecord) -> None:
        """Write the record beside its final place, then rename it there in one step."""
        staging = self.root / f"{CREATING_PREFIX}{record.id}"
        staging.mkdir(mode=0o700, parents=True)
        write_json_atomic(staging / "metadata.json", record.to_json())
        os.rename(staging, self._paths.ingress_dir(record.id))
        fsync_dir(self.root)

    def save(self, record: IngressRecord) -> None:
        write_json_atomic(self._paths.ingress_metadata(record.id), record.to_json())

    def remove(self, ingress_id: str) -> None:
        """Rename the folder to a tombstone in one step (the commit of a delete), then remove it."""
        tombstone = self.root / f"{DELETING_PREFIX}{ingress_id}-{secrets.token_hex(4)}"
        os.rename(self._paths.ingress_dir(ingress_id), tombstone)
        fsync_dir(self.root)
        shutil.rmtree(tombstone, ignore_errors=True)
