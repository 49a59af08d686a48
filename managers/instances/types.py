"""Value types of the instances subsystem: requests, the stored record, and what callers see."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from managers.agent import AgentInfo
from managers.instances.errors import InvalidInstanceSpec, RecordInvalid
from managers.network import Bandwidth, NetworkConfigError
from managers.volumes import mount_path_problems, normal_mount_path

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# app: the program's output (the guest's output channel); console: the guest's serial port (the
# kernel, the init) without the init's markers; vmm: the VMM process; dataplane: this service's
# lines about the instance, the guest's markers among them. The pump writes the first three.
PUMPED_SOURCES = ("app", "console", "vmm")
LOG_SOURCES = (*PUMPED_SOURCES, "dataplane")
# Volumes one instance may have: each is a PCI device, and QEMU's `pc` machine has 29 slots.
MAX_VOLUMES = 16


class InstanceState(enum.StrEnum):
    """Derived on every read, never stored (see the package README)."""

    CREATED = "Created"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    STOPPED = "Stopped"
    STANDBY = "Standby"
    UNKNOWN = "Unknown"


class RestartPolicy(enum.StrEnum):
    """What happens when the program exits: Docker's names and meanings."""

    NO = "no"
    ON_FAILURE = "on-failure"  # a non-zero exit, or the guest could not run the program
    ALWAYS = "always"


_WHOLE_FIELDS = frozenset({"vcpus", "memory_mb", "memory_max_mb", "overlay_size_mb"})
_CREATE_FIELDS = _WHOLE_FIELDS | {
    "name",
    "image",
    "env",
    "entrypoint",
    "cmd",
    "workdir",
    "network",
    "hypervisor",
    "start",
    "restart_policy",
    "keep_on_exit",
    "volumes",
}


@dataclass(frozen=True, slots=True)
class VolumeRequest:
    """One volume a request attaches: ``volume`` is an id or a name, resolved at attach."""

    volume: str
    mount_path: str
    readonly: bool = False

    def __post_init__(self) -> None:
        # One spelling per place (``/data/`` is ``/data``), so duplicates are seen.
        if self.mount_path.startswith("/"):
            object.__setattr__(self, "mount_path", normal_mount_path(self.mount_path))

    @classmethod
    def from_json(cls, data: object, *, with_volume: bool = True) -> VolumeRequest:
        """Parse ``{volume_id, mount_path, readonly?}`` (``volume_id`` only ``with_volume``)."""
        keys = {"mount_path", "readonly"} | ({"volume_id"} if with_volume else set())
        if not isinstance(data, dict) or set(data) - keys:
            shape = "volume_id, mount_path, readonly?" if with_volume else "mount_path, readonly?"
            raise InvalidInstanceSpec(f"a volume attachment is an object of {shape}")
        volume = data.get("volume_id", "")
        readonly = data.get("readonly", False)
        problems = mount_path_problems(data.get("mount_path"))
        if with_volume and (not isinstance(volume, str) or not volume):
            problems.append("volume_id must name a volume")
        if not isinstance(readonly, bool):
            problems.append("readonly must be true or false")
        if problems:
            raise InvalidInstanceSpec("; ".join(problems), {"problems": problems})
        return cls(str(volume), str(data["mount_path"]), readonly)


@dataclass(frozen=True, slots=True)
class AttachedVolume:
    """A volume in an instance's record: the one place attachments are stored."""

    volume_id: str
    mount_path: str
    readonly: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id,
            "mount_path": self.mount_path,
            "readonly": self.readonly,
        }

    @classmethod
    def from_json(cls, data: object) -> AttachedVolume:
        fields = _object(data, "volume")
        return cls(
            volume_id=_text(fields, "volume_id"),
            mount_path=_text(fields, "mount_path"),
            readonly=_flag(fields, "readonly", False),
        )


@dataclass(frozen=True, slots=True)
class CreateRequest:
    name: str
    image: str
    vcpus: int = 1
    memory_mb: int = 256
    memory_max_mb: int | None = None
    overlay_size_mb: int = 1024
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str | None = None
    network: bool = False
    bandwidth: Bandwidth = field(default_factory=Bandwidth)
    hypervisor: str | None = None
    start: bool = True
    restart_policy: RestartPolicy = RestartPolicy.NO
    keep_on_exit: bool = False
    volumes: tuple[VolumeRequest, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> CreateRequest:
        """Build a request from a decoded JSON body, refusing any field of the wrong type.

        The edge's contract check refuses the same bodies first when it is on; this keeps
        a bad body a 400 (``InvalidInstanceSpec``), never a 500, when it is off.
        """
        if not isinstance(data, dict):
            raise InvalidInstanceSpec("the body must be a JSON object")
        unknown = sorted(set(data) - _CREATE_FIELDS)
        if unknown:
            raise InvalidInstanceSpec(f"unknown fields: {', '.join(unknown)}", {"fields": unknown})
        problems: list[str] = []
        fields: dict[str, Any] = {}
        for key, value in data.items():
            if key == "network":
                enabled = value.get("enabled", False) if isinstance(value, dict) else None
                if not isinstance(enabled, bool) or set(value) - {"enabled", "bandwidth"}:
                    problems.append('network must be {"enabled": true|false, "bandwidth"?: {...}}')
                    continue
                fields[key] = enabled
                if "bandwidth" in value:
                    try:
                        fields["bandwidth"] = Bandwidth.from_json(value["bandwidth"])
                    except NetworkConfigError as error:
                        problems.append(error.message)
                    else:
                        if fields["bandwidth"].limited and not enabled:
                            problems.append("network.bandwidth needs network.enabled")
            elif key == "volumes":
                if not isinstance(value, list):
                    problems.append("volumes must be a list of attachments")
                else:
                    try:
                        fields[key] = tuple(VolumeRequest.from_json(item) for item in value)
                    except InvalidInstanceSpec as error:
                        problems.append(error.message)
            elif key in ("entrypoint", "cmd"):
                if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                    problems.append(f"{key} must be a list of strings")
                else:
                    fields[key] = tuple(value)
            elif key == "env":
                if not isinstance(value, dict) or not all(
                    isinstance(v, str) for v in value.values()
                ):
                    problems.append("env must map names to strings")
                else:
                    fields[key] = dict(value)
            elif key in _WHOLE_FIELDS:
                # JSON's 1.0 and true are no vCPU count; a VMM needs a true int.
                if type(value) is not int and not (key == "memory_max_mb" and value is None):
                    problems.append(f"{key} must be a whole number, not {value!r}")
                fields[key] = value
            elif key in ("start", "keep_on_exit"):
                if not isinstance(value, bool):
                    problems.append(f"{key} must be true or false")
                fields[key] = value
            elif key == "restart_policy":
                if value not in tuple(RestartPolicy):
                    problems.append(f"restart_policy must be one of {', '.join(RestartPolicy)}")
                else:
                    fields[key] = RestartPolicy(value)
            elif key in ("workdir", "hypervisor") and value is None:
                fields[key] = None
            elif not isinstance(value, str):
                problems.append(f"{key} must be a string")
            else:
                fields[key] = value
        for required in ("name", "image"):
            if required not in data:
                problems.append(f"{required} is required")
        if problems:
            raise InvalidInstanceSpec("; ".join(problems), {"problems": problems})
        return cls(**fields)

    def check(self) -> None:
        """Reject what no VM could be made of, before anything is touched."""
        problems: list[str] = []
        if len(self.name) > 63 or not NAME_RE.fullmatch(self.name):
            problems.append(
                "name must be 1-63 lower-case letters, digits or '-', "
                "starting and ending with a letter or digit"
            )
        if not 1 <= self.vcpus <= 64:
            problems.append("vcpus must be from 1 to 64")
        if not 64 <= self.memory_mb <= 262144:
            problems.append("memory_mb must be from 64 to 262144")
        if self.memory_max_mb is not None and not (self.memory_mb <= self.memory_max_mb <= 262144):
            problems.append("memory_max_mb must be at least memory_mb and at most 262144")
        if not 16 <= self.overlay_size_mb <= 1048576:
            problems.append("overlay_size_mb must be from 16 to 1048576")
        for key, value in self.env.items():
            if not _ENV_KEY.fullmatch(key):
                problems.append(f"env name {key!r} is not a valid variable name")
            if "\0" in value:
                problems.append(f"env {key} contains a NUL byte")
        for label, argv in (("entrypoint", self.entrypoint), ("cmd", self.cmd)):
            if argv is not None and any("\0" in arg for arg in argv):
                problems.append(f"{label} contains a NUL byte")
        if self.workdir is not None and not self.workdir.startswith("/"):
            problems.append("workdir must be an absolute path")
        if self.workdir is not None and "\0" in self.workdir:
            problems.append("workdir contains a NUL byte")
        problems.extend(volume_problems(self.volumes))
        if problems:
            raise InvalidInstanceSpec("; ".join(problems), {"problems": problems})


def volume_problems(volumes: Sequence[VolumeRequest | AttachedVolume]) -> list[str]:
    """What makes a set of attachments impossible on its own: too many, or two on one path."""
    problems = []
    if len(volumes) > MAX_VOLUMES:
        problems.append(f"an instance has at most {MAX_VOLUMES} volumes")
    paths = [v.mount_path for v in volumes]
    for path in sorted({p for p in paths if paths.count(p) > 1}):
        problems.append(f"two volumes are mounted on {path!r}")
    for path in paths:
        nested = [other for other in paths if other.startswith(path + "/")]
        if nested:
            problems.append(f"volume mount {nested[0]!r} is inside another volume's {path!r}")
    return problems


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """What the guest's serial markers told us about the current boot."""

    boot: int = 0
    program_started_at: str | None = None
    exited_at: str | None = None
    exit_code: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "boot": self.boot,
            "program_started_at": self.program_started_at,
            "exited_at": self.exited_at,
            "exit_code": self.exit_code,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuestStatus:
        return cls(
            boot=int(data.get("boot", 0)),
            program_started_at=data.get("program_started_at"),
            exited_at=data.get("exited_at"),
            exit_code=data.get("exit_code"),
            error=data.get("error"),
        )


SCHEMA_VERSION = 2


class IntentKind(enum.StrEnum):
    """An operation whose effects a crash may leave half made (see recovery.py)."""

    CREATE = "create"
    START = "start"
    STOP = "stop"
    STANDBY = "standby"
    RESTORE = "restore"
    DELETE = "delete"
    ATTACH = "attach"
    DETACH = "detach"


@dataclass(frozen=True, slots=True)
class Intent:
    """Written to the record before an operation's first external effect, cleared after its last."""

    action: IntentKind
    at: str
    # standby only: the VM was already paused, so undoing the standby must not resume it.
    was_paused: bool = False
    # attach and detach: the volume being attached or detached.
    volume: AttachedVolume | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "action": self.action.value,
            "at": self.at,
            "was_paused": self.was_paused,
        }
        if self.volume is not None:
            data["volume"] = self.volume.to_json()
        return data

    @classmethod
    def from_json(cls, data: object) -> Intent:
        fields = _object(data, "intent")
        volume = fields.get("volume")
        action = IntentKind(_text(fields, "action"))
        if action in (IntentKind.ATTACH, IntentKind.DETACH) and volume is None:
            raise RecordInvalid(f"a {action} intent must name its volume")
        return cls(
            action=action,
            at=_text(fields, "at"),
            was_paused=_flag(fields, "was_paused", False),
            volume=AttachedVolume.from_json(volume) if volume is not None else None,
        )


@dataclass(frozen=True, slots=True)
class ImageRef:
    """The image an instance was made from, pinned by digest, and its disk."""

    name: str
    digest: str
    format: str
    disk: str


@dataclass(frozen=True, slots=True)
class NetworkRecord:
    """The instance's place on the node network; ``address`` and ``mac`` once allocated."""

    enabled: bool
    address: str | None = None
    mac: str | None = None
    tap: str | None = None
    gateway: str | None = None
    dns: str | None = None
    bandwidth: Bandwidth = field(default_factory=Bandwidth)

    def allocation(self) -> dict[str, str]:
        """The allocation as the network manager reads it back."""
        return {"address": self.address or "", "mac": self.mac or ""}


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What ``metadata.json`` holds: everything about an instance that is not derived."""

    id: str
    name: str
    created_at: str
    image: ImageRef
    hypervisor: str
    vcpus: int
    memory_mb: int
    memory_max_mb: int | None
    overlay_size_mb: int
    env: Mapping[str, str]
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    workdir: str | None
    network: NetworkRecord
    booted: bool = False
    intent: Intent | None = None
    restart_policy: RestartPolicy = RestartPolicy.NO
    keep_on_exit: bool = False
    # The program exited and its policy restarts it: set before its VMM is released, cleared
    # by the next start that boots it (by the supervisor or by hand).
    restart_pending: bool = False
    volumes: tuple[AttachedVolume, ...] = ()

    def evolve(self, **changes: Any) -> InstanceRecord:
        """A copy with ``changes``; records are never changed in place."""
        return replace(self, **changes)

    def machine_json(self) -> dict[str, Any]:
        """The VM and program the instance asked for, as both the record and the API spell it."""
        return {
            "hypervisor": self.hypervisor,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "memory_max_mb": self.memory_max_mb,
            "overlay_size_mb": self.overlay_size_mb,
            "env": dict(self.env),
            "entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "cmd": list(self.cmd) if self.cmd is not None else None,
            "workdir": self.workdir,
            "restart_policy": self.restart_policy.value,
            "keep_on_exit": self.keep_on_exit,
            "volumes": [volume.to_json() for volume in self.volumes],
        }

    def to_json(self) -> dict[str, Any]:
        network = self.network
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "image": {
                "name": self.image.name,
                "digest": self.image.digest,
                "format": self.image.format,
                "disk": self.image.disk,
            },
            **self.machine_json(),
            "network": {
                "enabled": network.enabled,
                "address": network.address,
                "mac": network.mac,
                "tap": network.tap,
                "gateway": network.gateway,
                "dns": network.dns,
                "bandwidth": network.bandwidth.to_json(),
            },
            "booted": self.booted,
            "intent": self.intent.to_json() if self.intent is not None else None,
            "restart_pending": self.restart_pending,
        }

    @classmethod
    def from_json(cls, data: object) -> InstanceRecord:
        """Parse a stored record; anything malformed is a :class:`RecordInvalid`.

        Schema 1 (before intents) had the same fields less ``schema``, ``intent``,
        ``restart_policy``, ``keep_on_exit`` and ``restart_pending``; the missing ones take
        their defaults.
        """
        try:
            return cls._parse(data)
        except RecordInvalid:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise RecordInvalid(f"malformed instance record: {error}") from error

    @classmethod
    def _parse(cls, data: object) -> InstanceRecord:
        fields = _object(data, "record")
        schema = fields.get("schema", 1)
        if schema not in (1, SCHEMA_VERSION):
            raise RecordInvalid(f"unknown instance record schema {schema!r}")
        image = _object(fields["image"], "image")
        network = _object(fields["network"], "network")
        env = _object(fields.get("env", {}), "env")
        intent = fields.get("intent")
        return cls(
            id=_text(fields, "id"),
            name=_text(fields, "name"),
            created_at=_text(fields, "created_at"),
            image=ImageRef(
                name=_text(image, "name"),
                digest=_text(image, "digest"),
                format=_text(image, "format"),
                disk=_text(image, "disk"),
            ),
            hypervisor=_text(fields, "hypervisor"),
            vcpus=_whole(fields, "vcpus"),
            memory_mb=_whole(fields, "memory_mb"),
            memory_max_mb=_whole_or_none(fields, "memory_max_mb"),
            overlay_size_mb=_whole(fields, "overlay_size_mb"),
            env={str(k): _string(v, f"env {k}") for k, v in env.items()},
            entrypoint=_argv(fields.get("entrypoint"), "entrypoint"),
            cmd=_argv(fields.get("cmd"), "cmd"),
            workdir=_text_or_none(fields, "workdir"),
            network=NetworkRecord(
                enabled=_flag(network, "enabled", False),
                address=_text_or_none(network, "address"),
                mac=_text_or_none(network, "mac"),
                tap=_text_or_none(network, "tap"),
                gateway=_text_or_none(network, "gateway"),
                dns=_text_or_none(network, "dns"),
                bandwidth=_bandwidth(network.get("bandwidth")),
            ),
            booted=_flag(fields, "booted", False),
            intent=Intent.from_json(intent) if intent is not None else None,
            restart_policy=RestartPolicy(fields.get("restart_policy", RestartPolicy.NO.value)),
            keep_on_exit=_flag(fields, "keep_on_exit", False),
            restart_pending=_flag(fields, "restart_pending", False),
            volumes=tuple(AttachedVolume.from_json(v) for v in _list(fields, "volumes")),
        )


def _bandwidth(value: object) -> Bandwidth:
    if value is None:
        return Bandwidth()
    try:
        return Bandwidth.from_json(value)
    except NetworkConfigError as error:
        raise RecordInvalid(f"network: {error.message}") from error


def _list(fields: Mapping[str, Any], key: str) -> list[Any]:
    value = fields.get(key, [])
    if not isinstance(value, list):
        raise RecordInvalid(f"{key} must be a list")
    return value


def _object(value: object, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordInvalid(f"{label} must be an object")
    return value


def _string(value: object, label: str) -> str:
    if not isinstance(value, str):
        raise RecordInvalid(f"{label} must be a string")
    return value


def _text(fields: Mapping[str, Any], key: str) -> str:
    return _string(fields.get(key), key)


def _text_or_none(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return None if value is None else _string(value, key)


def _whole(fields: Mapping[str, Any], key: str) -> int:
    value = fields.get(key)
    if type(value) is not int:
        raise RecordInvalid(f"{key} must be an integer")
    return value


def _whole_or_none(fields: Mapping[str, Any], key: str) -> int | None:
    return None if fields.get(key) is None else _whole(fields, key)


def _flag(fields: Mapping[str, Any], key: str, default: bool) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise RecordInvalid(f"{key} must be true or false")
    return value


def _argv(value: object, label: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RecordInvalid(f"{label} must be a list")
    return tuple(_string(item, label) for item in value)


@dataclass(frozen=True, slots=True)
class QuarantineInfo:
    """Where an unreadable instance folder was moved, and why."""

    path: str
    reason: str
    quarantined_at: str


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance as callers see it: its stored record plus the derived state.

    A quarantined instance has no record, only ``quarantine``; it reads ``Unknown``.
    """

    id: str
    name: str | None
    state: InstanceState
    guest: GuestStatus
    record: InstanceRecord | None
    pid: int | None = None
    quarantine: QuarantineInfo | None = None
    restarts: int = 0
    agent: AgentInfo = field(default_factory=lambda: AgentInfo(ready=False))
