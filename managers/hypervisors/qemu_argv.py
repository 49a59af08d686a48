"""The QEMU command line for a VM, kept identical between a boot and a restore.

An incoming migration only loads into a QEMU with the same devices at the same PCI addresses, so
every virtio device gets an explicit slot that is recorded with the VM (hot-plugged disks and
memory DIMMs included) and replayed on restore.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .types import Acceleration, DiskSpec, VmSpec

# Slot 0 is the host bridge and 1 the PIIX3; 2 stays free (no VGA). 31 is the last slot.
FIRST_SLOT = 3
LAST_SLOT = 31
MAX_DIMMS = 8
# The VM's virtio-serial controller (named for its first port, as recorded layouts know it),
# the guest agent's port, and the port's name in the guest.
AGENT_DEVICE = "agent"
AGENT_CHARDEV = "agentchr"
AGENT_PORT_NAME = "dataplane.agent"
# The program's output channel: a second port on the same controller (a controller of its own
# cost the boot about 100 ms under TCG; the port, nothing measurable), named so the guest can
# find it. A port, not a virtconsole, since the guest writes a port in buffers of up to 32 KiB
# without waiting for the host, where a console takes 2 KiB a time and waits.
OUTPUT_CHARDEV = "outputchr"
OUTPUT_PORT_NAME = "dataplane.output"


@dataclass(slots=True)
class QemuLayout:
    """The VM's devices as they are now: boot spec plus hot-plug changes and their slots."""

    spec: VmSpec
    slots: dict[str, int] = field(default_factory=dict)
    dimms: list[int] = field(default_factory=list)  # sizes in MiB, in plug order

    @classmethod
    def for_boot(cls, spec: VmSpec) -> QemuLayout:
        layout = cls(spec)
        if spec.net is not None:
            layout.slots[spec.net.id] = layout.free_slot()
        for disk in spec.disks:
            layout.slots[disk.id] = layout.free_slot()
        if spec.agent or spec.output_file is not None:
            layout.slots[AGENT_DEVICE] = layout.free_slot()
        return layout

    def free_slot(self) -> int:
        used = set(self.slots.values())
        for slot in range(FIRST_SLOT, LAST_SLOT + 1):
            if slot not in used:
                return slot
        raise LookupError("no free PCI slot")

    @property
    def memory_mb(self) -> int:
        return self.spec.memory_mb + sum(self.dimms)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "slots": self.slots, "dimms": self.dimms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QemuLayout:
        return cls(
            VmSpec.from_json(data["spec"]),
            {str(k): int(v) for k, v in data.get("slots", {}).items()},
            [int(v) for v in data.get("dimms", [])],
        )


def _opt(value: str | Path) -> str:
    """QEMU's option syntax escapes a comma by doubling it."""
    return str(value).replace(",", ",,")


def blockdev_args(disk: DiskSpec) -> list[dict[str, Any]]:
    """The two block nodes (file, then raw format) for a disk, as QMP ``blockdev-add`` args."""
    return [
        {
            "driver": "file",
            "node-name": f"f-{disk.id}",
            "filename": str(disk.path),
            "read-only": disk.readonly,
        },
        {"driver": "raw", "node-name": disk.id, "file": f"f-{disk.id}", "read-only": disk.readonly},
    ]


def disk_device_args(disk: DiskSpec, slot: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "driver": "virtio-blk-pci",
        "id": disk.id,
        "drive": disk.id,
        "bus": "pci.0",
        "addr": hex(slot),
    }
    if disk.serial:
        args["serial"] = disk.serial
    return args


def _keyvals(args: dict[str, Any]) -> str:
    parts = []
    for key, value in args.items():
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        parts.append(f"{key}={_opt(text)}")
    return ",".join(parts)


def build_argv(
    qemu_bin: str,
    instance_id: str,
    layout: QemuLayout,
    socket: Path,
    acceleration: Acceleration,
    incoming: Path | None = None,
    agent_socket: Path | None = None,
) -> list[str]:
    spec = layout.spec
    argv = [
        qemu_bin,
        "-name", f"guest={_opt(instance_id)}",
        "-machine", f"pc,accel={acceleration.value}",
        "-cpu", "host" if acceleration is Acceleration.KVM else "max",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        # The guest powering off leaves QEMU alive in "shutdown", like Cloud Hypervisor.
        "-no-shutdown",
        "-qmp", f"unix:{_opt(socket)},server=on,wait=off",
        "-serial", f"file:{_opt(spec.serial_file)}",
        "-kernel", str(spec.kernel),
        "-append", spec.cmdline,
    ]  # fmt: skip
    memory = f"{spec.memory_mb}M"
    if spec.max_memory_mb > spec.memory_mb:
        memory += f",slots={MAX_DIMMS},maxmem={spec.max_memory_mb}M"
    argv += ["-m", memory]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    for index, size in enumerate(layout.dimms):
        argv += ["-object", f"memory-backend-ram,id=mem-dimm{index},size={size}M"]
        argv += ["-device", f"pc-dimm,id=dimm{index},memdev=mem-dimm{index}"]
    if spec.net is not None:
        vhost = "on" if os.path.exists("/dev/vhost-net") else "off"
        argv += [
            "-netdev",
            f"tap,id=host-{spec.net.id},ifname={spec.net.tap},script=no,downscript=no,vhost={vhost}",
            "-device",
            f"virtio-net-pci,netdev=host-{spec.net.id},id={spec.net.id},mac={spec.net.mac},"
            f"bus=pci.0,addr={hex(layout.slots[spec.net.id])}",
        ]
    for disk in spec.disks:
        for node in blockdev_args(disk):
            argv += ["-blockdev", _keyvals(node)]
        argv += ["-device", _keyvals(disk_device_args(disk, layout.slots[disk.id]))]
    if (spec.agent and agent_socket is not None) or spec.output_file is not None:
        argv += [
            "-device",
            f"virtio-serial-pci,id={AGENT_DEVICE},bus=pci.0,addr={hex(layout.slots[AGENT_DEVICE])}",
        ]
    # Ports are numbered in the order they are given, which a restore must repeat.
    if spec.agent and agent_socket is not None:
        # QEMU listens; the dataplane connects. Bytes it sends before the guest opens the port
        # wait in the socket, so the agent's HELLO needs no retry loop.
        argv += [
            "-chardev",
            f"socket,id={AGENT_CHARDEV},path={_opt(agent_socket)},server=on,wait=off",
            "-device",
            f"virtserialport,bus={AGENT_DEVICE}.0,chardev={AGENT_CHARDEV},name={AGENT_PORT_NAME}",
        ]
    if spec.output_file is not None:
        argv += [
            "-chardev",
            f"file,id={OUTPUT_CHARDEV},path={_opt(spec.output_file)}",
            "-device",
            f"virtserialport,bus={AGENT_DEVICE}.0,chardev={OUTPUT_CHARDEV},name={OUTPUT_PORT_NAME}",
        ]
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return argv
