"""Instance metadata on disk: one ``metadata.json`` per instance folder, written atomically.

A folder without a readable ``metadata.json`` is a create that crashed before it
finished; :meth:`InstanceStore.half_made` lists those for start-up to remove.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from managers.atomic import write_json_atomic
from managers.paths import Paths

_REQUIRED = ("id", "name", "image", "hypervisor", "network")


class InstanceStore:
    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    def load(self, instance_id: str) -> dict[str, Any] | None:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            return None
        try:
            data = json.loads(self._paths.instance_metadata(instance_id).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or any(key not in data for key in _REQUIRED):
            return None
        return data

    def load_all(self) -> list[dict[str, Any]]:
        records = []
        for instance_id in self._ids():
            record = self.load(instance_id)
            if record is not None:
                records.append(record)
        return records

    def half_made(self) -> list[str]:
        return [i for i in self._ids() if self.load(i) is None]

    def save(self, record: dict[str, Any]) -> None:
        write_json_atomic(self._paths.instance_metadata(record["id"]), record)

    def remove(self, instance_id: str) -> None:
        # The metadata goes first: a crash mid-removal then leaves a half-made
        # folder that the next start-up finishes removing.
        self._paths.instance_metadata(instance_id).unlink(missing_ok=True)
        shutil.rmtree(self._paths.instance_dir(instance_id), ignore_errors=True)

    def _ids(self) -> list[str]:
        try:
            return sorted(
                entry.name
                for entry in self._paths.instances.iterdir()
                if entry.is_dir() and not entry.name.startswith(".")
            )
        except FileNotFoundError:
            return []
