"""Value types shared by every hypervisor backend."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# A TAP name is a Linux interface name: at most 15 bytes, no slash or whitespace.
_TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class BackendKind(enum.StrEnum):
    CLOUD_HYPERVISOR = "cloud-hypervisor"
    QEMU = "qemu"


class VmState(enum.StrEnum):
    """The VM's state as the VMM reports it.

    ``NOT_CREATED``: the VMM runs but holds no VM (a fresh process).
    ``SHUTDOWN``: the guest is off and the VMM process is still alive.
    """

    NOT_CREATED = "NotCreated"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


class Acceleration(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class MemoryRestoreMode(enum.StrEnum):
    """How Cloud Hypervisor loads guest memory on restore (ignored by QEMU)."""

    COPY = "Copy"
    ON_DEMAND = "OnDemand"


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A raw disk image. ``id`` names the device for hot removal; ``serial`` is what the guest sees
    (the guest's init finds its disks by serial)."""

    id: str
    path: Path
    readonly: bool = False
    serial: str | None = None

    def problems(self) -> list[str]:
        found = []
        if not _ID_RE.fullmatch(self.id):
            found.append(f"disk id {self.id!r} must match {_ID_RE.pattern}")
        if not self.path.is_absolute():
            found.append(f"disk {self.id!r}: path {str(self.path)!r} must be absolute")
        if self.serial is not None and (
            not self.serial or len(self.serial) > 20 or not self.serial.isascii()
        ):
            found.append(f"disk {self.id!r}: serial must be 1-20 ASCII characters")
        if self.serial is not None and any(c in self.serial for c in ",= "):
            found.append(f"disk {self.id!r}: serial must not contain ',', '=' or spaces")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": str(self.path),
            "readonly": self.readonly,
            "serial": self.serial,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DiskSpec:
        return cls(
            id=str(data["id"]),
            path=Path(data["path"]),
            readonly=bool(data.get("readonly", False)),
            serial=data.get("serial"),
        )


@dataclass(frozen=True, slots=True)
class NetSpec:
    """A virtio-net device on an existing TAP (made by the network manager)."""

    tap: str
    mac: str
    id: str = "net0"

    def problems(self) -> list[str]:
        found = []
        if not _TAP_RE.fullmatch(self.tap):
            found.append(f"TAP name {self.tap!r} is not a valid interface name")
        if not _MAC_RE.fullmatch(self.mac):
            found.append(f"MAC {self.mac!r} must be six lower-case hex pairs joined by ':'")
        if not _ID_RE.fullmatch(self.id):
            found.append(f"net id {self.id!r} must match {_ID_RE.pattern}")
        return found

    def to_json(self) -> dict[str, Any]:
        return {"tap": self.tap, "mac": self.mac, "id": self.id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetSpec:
        return cls(tap=str(data["tap"]), mac=str(data["mac"]), id=str(data.get("id", "net0")))


@dataclass(frozen=True, slots=True)
class VmSpec:
    """Everything needed to create and boot a VM.

    ``memory_max_mb`` above ``memory_mb`` reserves room for :meth:`Vmm.resize_memory`.
    The serial port (the kernel's console: early boot, panics, our init's markers) goes to
    ``serial_file``. ``output_file``, when set, adds the channel the init sends the program's
    output to, written to that file: a virtio-serial port named ``dataplane.output`` on QEMU,
    the virtio console (``hvc0``) on Cloud Hypervisor, which has no other (see
    :func:`output_transport`). Either moves output in buffers where the emulated UART traps on
    every byte. ``agent``
    adds the guest agent's channel (a virtio-serial port on QEMU, vsock on Cloud Hypervisor),
    whose host end is the VMM's ``agent.sock``.
    """

    kernel: Path
    serial_file: Path
    output_file: Path | None = None
    cmdline: str = ""
    initrd: Path | None = None
    vcpus: int = 1
    memory_mb: int = 256
    memory_max_mb: int | None = None
    disks: tuple[DiskSpec, ...] = ()
    net: NetSpec | None = None
    agent: bool = False

    @property
    def max_memory_mb(self) -> int:
        return self.memory_max_mb if self.memory_max_mb is not None else self.memory_mb

    def problems(self) -> list[str]:
        """Every reason this spec cannot be booted, checked before any process starts."""
        found: list[str] = []
        named = [("kernel", self.kernel), ("serial_file", self.serial_file)]
        if self.output_file is not None:
            named.append(("output_file", self.output_file))
        for name, value in named:
            if not value.is_absolute():
                found.append(f"{name} path {str(value)!r} must be absolute")
        if not self.kernel.is_file():
            found.append(f"kernel {str(self.kernel)!r} does not exist")
        if self.initrd is not None and not self.initrd.is_file():
            found.append(f"initrd {str(self.initrd)!r} does not exist")
        if not 1 <= self.vcpus <= 255:
            found.append(f"vcpus must be between 1 and 255, not {self.vcpus}")
        if self.memory_mb < 32:
            found.append(f"memory_mb must be at least 32, not {self.memory_mb}")
        if self.max_memory_mb < self.memory_mb:
            found.append("memory_max_mb must not be below memory_mb")
        seen: set[str] = set()
        for disk in self.disks:
            found.extend(disk.problems())
            if disk.id in seen:
                found.append(f"disk id {disk.id!r} is used twice")
            seen.add(disk.id)
            if not disk.path.is_file():
                found.append(f"disk {disk.id!r}: {str(disk.path)!r} does not exist")
        if self.net is not None:
            found.extend(self.net.problems())
        if "\n" in self.cmdline or "\x00" in self.cmdline:
            found.append("cmdline must be one line without NUL bytes")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": str(self.kernel),
            "serial_file": str(self.serial_file),
            "output_file": str(self.output_file) if self.output_file else None,
            "cmdline": self.cmdline,
            "initrd": str(self.initrd) if self.initrd else None,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "memory_max_mb": self.memory_max_mb,
            "disks": [disk.to_json() for disk in self.disks],
            "net": self.net.to_json() if self.net else None,
            "agent": self.agent,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmSpec:
        return cls(
            kernel=Path(data["kernel"]),
            serial_file=Path(data["serial_file"]),
            # Absent from records written before guests had an output channel.
            output_file=Path(data["output_file"]) if data.get("output_file") else None,
            cmdline=str(data.get("cmdline", "")),
            initrd=Path(data["initrd"]) if data.get("initrd") else None,
            vcpus=int(data["vcpus"]),
            memory_mb=int(data["memory_mb"]),
            memory_max_mb=data.get("memory_max_mb"),
            disks=tuple(DiskSpec.from_json(d) for d in data.get("disks", [])),
            net=NetSpec.from_json(data["net"]) if data.get("net") else None,
            agent=bool(data.get("agent", False)),
        )


@dataclass(frozen=True, slots=True)
class SpecChanges:
    """What differs between the snapshot's world and the restoring one.

    A snapshot records absolute paths and the TAP name; when the instance's files moved (or the
    network manager made a new TAP), restore rewrites them. Disks are matched by ``id``.
    """

    disk_paths: dict[str, Path] = field(default_factory=dict)
    serial_file: Path | None = None
    output_file: Path | None = None
    tap: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    agent_socket: Path | None = None

    def apply(self, spec: VmSpec) -> VmSpec:
        disks = tuple(
            replace(disk, path=self.disk_paths.get(disk.id, disk.path)) for disk in spec.disks
        )
        net = spec.net
        if net is not None and self.tap is not None:
            net = replace(net, tap=self.tap)
        return replace(
            spec,
            disks=disks,
            net=net,
            serial_file=self.serial_file or spec.serial_file,
            # A snapshot's devices are fixed: a VM booted without the channel restores without it.
            output_file=(self.output_file or spec.output_file) if spec.output_file else None,
            kernel=self.kernel or spec.kernel,
            initrd=self.initrd or spec.initrd,
        )


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Process-wide settings of a backend (from the dataplane's configuration)."""

    cloud_hypervisor_bin: str | None = None
    qemu_bin: str | None = None
    start_timeout: float = 10.0
    request_timeout: float = 30.0
    memory_restore_mode: MemoryRestoreMode = MemoryRestoreMode.COPY
    # ``None`` probes: KVM when a guest actually runs on it, TCG otherwise.
    acceleration: Acceleration | None = None
    # The kernel the QEMU acceleration probe boots (KERNEL_PATH); without one the probe uses
    # the first VM's kernel.
    kernel: Path | None = None
    # Where the acceleration probe's answer is kept across processes (see accel.py).
    probe_cache: Path | None = None


@dataclass(frozen=True, slots=True)
class VmmInfo:
    """What a running VMM says about itself."""

    kind: BackendKind
    version: str
    pid: int
