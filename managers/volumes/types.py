"""Value types of the volumes subsystem: requests, the stored record, and what callers see."""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any

from managers.volumes.errors import InvalidVolumeSpec, VolumeRecordInvalid

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
ID_RE = re.compile(r"^[0-9a-f]{12}$")
MIN_SIZE_MB = 8
# 16 TiB: ext4 with 4 KiB blocks and 32-bit block numbers stops there.
MAX_SIZE_MB = 16 << 20
FORMAT = "ext4"
SCHEMA_VERSION = 1
# Paths a volume must never cover: the guest's kernel interfaces.
_SYSTEM_PATHS = ("/proc", "/sys", "/dev")
MAX_MOUNT_PATH = 4095


def disk_serial(volume_id: str) -> str:
    """The virtio serial (and VMM device id) of a volume's disk: what the guest finds it by."""
    return f"vol-{volume_id}"


def mount_path_problems(path: object) -> list[str]:
    """Why ``path`` cannot be where a volume is mounted in the guest (empty: it can)."""
    if not isinstance(path, str):
        return ["mount_path must be a string"]
    if not path.startswith("/"):
        return [f"mount_path {path!r} must be absolute"]
    if "\0" in path or len(path) > MAX_MOUNT_PATH:
        return ["mount_path must be at most 4095 bytes without NUL"]
    if ".." in path.split("/"):
        return [f"mount_path {path!r} must not contain '..'"]
    clean = posixpath.normpath(path)
    if clean == "/":
        return ["mount_path cannot be '/': the image is the root"]
    for system in _SYSTEM_PATHS:
        if clean == system or clean.startswith(system + "/"):
            return [f"mount_path {path!r} would shadow the guest's {system}"]
    return []


def normal_mount_path(path: str) -> str:
    """``/data//x/`` -> ``/data/x``: one spelling per place, so duplicates are seen."""
    return posixpath.normpath(path).replace("//", "/")


class SourceKind(enum.StrEnum):
    EMPTY = "empty"
    IMAGE = "image"
    ARCHIVE = "archive"


@dataclass(frozen=True, slots=True)
class VolumeSource:
    """Where a volume's first content came from (kept for the record; never read again)."""

    kind: SourceKind = SourceKind.EMPTY
    image: str | None = None
    digest: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.kind.value}
        if self.kind is SourceKind.IMAGE:
            data.update(image=self.image, digest=self.digest, path=self.path or "/")
        return data

    @classmethod
    def from_json(cls, data: object) -> VolumeSource:
        fields = _object(data, "source")
        kind = SourceKind(_text(fields, "type"))
        if kind is not SourceKind.IMAGE:
            return cls(kind)
        return cls(kind, _text(fields, "image"), _text(fields, "digest"), _text(fields, "path"))


@dataclass(frozen=True, slots=True)
class Attachment:
    """One instance's use of a volume (the instance's record is where it is stored)."""

    instance_id: str
    mount_path: str
    readonly: bool


class VolumeIntentKind(enum.StrEnum):
    RESIZE = "resize"


@dataclass(frozen=True, slots=True)
class VolumeIntent:
    """Written before a change to the data file, cleared after it (see recovery in manager.py)."""

    action: VolumeIntentKind
    at: str
    size_mb: int

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action.value, "at": self.at, "size_mb": self.size_mb}

    @classmethod
    def from_json(cls, data: object) -> VolumeIntent:
        fields = _object(data, "intent")
        return cls(
            VolumeIntentKind(_text(fields, "action")),
            _text(fields, "at"),
            _whole(fields, "size_mb"),
        )


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """What ``volumes/<id>/metadata.json`` holds."""

    id: str
    name: str
    size_mb: int
    created_at: str
    source: VolumeSource = field(default_factory=VolumeSource)
    format: str = FORMAT
    intent: VolumeIntent | None = None

    def evolve(self, **changes: Any) -> VolumeRecord:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "name": self.name,
            "size_mb": self.size_mb,
            "format": self.format,
            "created_at": self.created_at,
            "source": self.source.to_json(),
            "intent": self.intent.to_json() if self.intent is not None else None,
        }

    @classmethod
    def from_json(cls, data: object) -> VolumeRecord:
        """Parse a stored record; anything malformed is a :class:`VolumeRecordInvalid`."""
        try:
            fields = _object(data, "record")
            if fields.get("schema") != SCHEMA_VERSION:
                raise VolumeRecordInvalid(f"unknown volume record schema {fields.get('schema')!r}")
            intent = fields.get("intent")
            record = cls(
                id=_text(fields, "id"),
                name=_text(fields, "name"),
                size_mb=_whole(fields, "size_mb"),
                created_at=_text(fields, "created_at"),
                source=VolumeSource.from_json(fields.get("source", {"type": "empty"})),
                format=_text(fields, "format"),
                intent=VolumeIntent.from_json(intent) if intent is not None else None,
            )
        except VolumeRecordInvalid:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise VolumeRecordInvalid(f"malformed volume record: {error}") from error
        if not ID_RE.fullmatch(record.id) or record.format != FORMAT:
            raise VolumeRecordInvalid(f"volume record {record.id!r} has an unusable id or format")
        return record


@dataclass(frozen=True, slots=True)
class Volume:
    """A volume as callers see it: its record and who uses it now."""

    record: VolumeRecord
    attachments: tuple[Attachment, ...] = ()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True, slots=True)
class VolumeRef:
    """What an instance needs of a volume it attaches: who it is and where its disk lives."""

    id: str
    name: str
    readonly: bool


@dataclass(frozen=True, slots=True)
class CreateVolume:
    """``POST /volumes``'s body, parsed and checked on its own."""

    name: str
    size_mb: int
    source_image: str | None = None
    source_path: str = "/"

    @classmethod
    def from_json(cls, data: object) -> CreateVolume:
        if not isinstance(data, dict):
            raise InvalidVolumeSpec("the body must be a JSON object")
        unknown = sorted(set(data) - {"name", "size_mb", "source"})
        if unknown:
            raise InvalidVolumeSpec(f"unknown fields: {', '.join(unknown)}", {"fields": unknown})
        problems: list[str] = []
        name, size = data.get("name"), data.get("size_mb")
        if not isinstance(name, str):
            problems.append("name is required and must be a string")
        if type(size) is not int:
            problems.append("size_mb is required and must be a whole number")
        image, path = None, "/"
        source = data.get("source")
        if source is not None:
            if not isinstance(source, dict) or set(source) - {"image", "path"}:
                problems.append('source must be {"image": REF, "path"?: "/sub/dir"}')
            else:
                image, path = source.get("image"), source.get("path", "/")
                if not isinstance(image, str) or not image:
                    problems.append("source.image must name an image")
                if not isinstance(path, str):
                    problems.append("source.path must be a string")
        if problems:
            raise InvalidVolumeSpec("; ".join(problems), {"problems": problems})
        assert isinstance(name, str)
        assert isinstance(size, int)
        request = cls(name, size, image, path if isinstance(path, str) else "/")
        request.check()
        return request

    def check(self) -> None:
        problems = check_name_and_size(self.name, self.size_mb)
        if self.source_image is not None:
            path = self.source_path
            if not path.startswith("/") or "\0" in path or ".." in path.split("/"):
                problems.append("source.path must be an absolute path without '..'")
        if problems:
            raise InvalidVolumeSpec("; ".join(problems), {"problems": problems})


def check_name_and_size(name: str, size_mb: int) -> list[str]:
    problems = []
    if len(name) > 63 or not NAME_RE.fullmatch(name):
        problems.append(
            "name must be 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    problems.extend(size_problems(size_mb))
    return problems


def size_problems(size_mb: int) -> list[str]:
    if not MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB:
        return [f"size_mb must be from {MIN_SIZE_MB} to {MAX_SIZE_MB}"]
    return []


def _object(value: object, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VolumeRecordInvalid(f"{label} must be an object")
    return value


def _text(fields: dict[str, Any], key: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        raise VolumeRecordInvalid(f"{key} must be a string")
    return value


def _whole(fields: dict[str, Any], key: str) -> int:
    value = fields[key]
    if type(value) is not int:
        raise VolumeRecordInvalid(f"{key} must be a whole number")
    return value
