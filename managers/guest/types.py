"""Value types of the guest package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


@dataclass(frozen=True, slots=True)
class GuestArtifacts:
    """What a VMM needs to boot a guest; every path is absolute and exists."""

    vmlinux: Path
    """The kernel as an ELF image: QEMU ``microvm`` and Cloud Hypervisor boot it as PVH."""
    bzimage: Path
    """The kernel as shipped (bzImage) for loaders that want one (QEMU ``pc``, CH v39+)."""
    initrd: Path
    kernel_version: str
    initrd_hash: str = ""
    """The hash of the initrd's inputs; empty for an ``INITRD_PATH`` override."""


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Static IPv4 configuration of the guest's one network interface."""

    address: str
    """Address with prefix length, e.g. ``192.168.100.5/24``."""
    gateway: str | None = None
    dns: tuple[str, ...] = ()
    mac: str | None = None
    """Picks the interface by MAC address; without it the first non-loopback one is used."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dns", tuple(self.dns))


@dataclass(frozen=True, slots=True)
class VolumeMount:
    """A disk mounted into the guest's root: ``source`` is a virtio serial or a ``/dev/`` path."""

    source: str
    mount_path: str
    readonly: bool = False


VolumeSpec = VolumeMount | tuple[str, str, bool]
EnvSpec = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """What the init applies inside the guest; written to the config disk by the host.

    The program's argv is ``entrypoint + cmd`` (OCI semantics: the request has already chosen
    between the image's values and its own). ``env`` keeps its order; the init adds ``PATH``
    and ``HOME`` only when they are absent, as Docker does.
    """

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: EnvSpec = ()
    workdir: str = ""
    user: str = ""
    """``uid``, ``uid:gid``, ``name`` or ``name:group``, resolved in the image; empty is root."""
    hostname: str = ""
    network: NetworkConfig | None = None
    volumes: Sequence[VolumeSpec] = ()
    agent_transport: str = ""
    """Where the guest agent finds its channel: ``virtio-serial:NAME`` or ``vsock:PORT``; empty
    lets the agent try both (see ``managers/agent/PROTOCOL.md``)."""
    output_transport: str = ""
    """Where the init relays the program's stdout and stderr: ``console`` (the virtio console,
    ``hvc0``) or ``virtio-serial:NAME``; empty, the program writes to the serial port."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "entrypoint", tuple(self.entrypoint))
        object.__setattr__(self, "cmd", tuple(self.cmd))
        pairs = tuple(self.env.items()) if isinstance(self.env, Mapping) else tuple(self.env)
        object.__setattr__(self, "env", tuple((str(k), str(v)) for k, v in pairs))
        object.__setattr__(
            self,
            "volumes",
            tuple(v if isinstance(v, VolumeMount) else VolumeMount(*v) for v in self.volumes),
        )

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.entrypoint, *self.cmd)

    @property
    def env_pairs(self) -> tuple[tuple[str, str], ...]:
        env = self.env
        assert isinstance(env, tuple)
        return env

    @property
    def volume_mounts(self) -> tuple[VolumeMount, ...]:
        volumes = self.volumes
        assert isinstance(volumes, tuple)
        return volumes


class MarkerKind(StrEnum):
    INIT_STARTED = "init-started"
    PROGRAM_STARTED = "program-started"
    PROGRAM_EXITED = "program-exited"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Marker:
    """One machine-readable line the init printed on the serial console."""

    kind: MarkerKind
    exit_code: int | None = None
    """For ``program-exited``: the exit status, or 128 + the signal number."""
    reason: str | None = None
    """For ``error``: a fixed slug such as ``program-not-found`` (see markers.py)."""
    detail: str | None = None
