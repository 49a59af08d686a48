"""Cloud Hypervisor ``VmConfig`` bodies, and the path rewrite of a snapshot's ``config.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .agent_socket import AGENT_VSOCK_CID
from .types import DiskSpec, SpecChanges, VmSpec

MIB = 1 << 20


def disk_config(disk: DiskSpec) -> dict[str, Any]:
    # v53 probes the image format when none is given, which lets a guest that wrote a qcow2
    # header into a raw disk change how it is opened next time: always say Raw.
    config: dict[str, Any] = {
        "id": disk.id,
        "path": str(disk.path),
        "readonly": disk.readonly,
        "image_type": "Raw",
    }
    if disk.serial:
        config["serial"] = disk.serial
    return config


def vm_config(spec: VmSpec, agent_socket: Path | None = None) -> dict[str, Any]:
    memory: dict[str, Any] = {"size": spec.memory_mb * MIB}
    if spec.max_memory_mb > spec.memory_mb:
        memory["hotplug_size"] = (spec.max_memory_mb - spec.memory_mb) * MIB
        memory["hotplug_method"] = "Acpi"
    payload: dict[str, Any] = {"kernel": str(spec.kernel), "cmdline": spec.cmdline}
    if spec.initrd is not None:
        payload["initramfs"] = str(spec.initrd)
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus},
        "memory": memory,
        "payload": payload,
        "disks": [disk_config(disk) for disk in spec.disks],
        # The serial port carries the kernel's console and the init's markers; the virtio
        # console, when there is one, the program's output (Cloud Hypervisor has no
        # virtio-serial ports).
        "console": (
            {"mode": "File", "file": str(spec.output_file)}
            if spec.output_file is not None
            else {"mode": "Off"}
        ),
        "serial": {"mode": "File", "file": str(spec.serial_file)},
        "rng": {"src": "/dev/urandom"},
    }
    if spec.agent and agent_socket is not None:
        config["vsock"] = {"cid": AGENT_VSOCK_CID, "socket": str(agent_socket)}
    if spec.net is not None:
        config["net"] = [{"id": spec.net.id, "tap": spec.net.tap, "mac": spec.net.mac}]
    return config


def rewrite_snapshot_config(config: dict[str, Any], changes: SpecChanges) -> list[str]:
    """Apply ``changes`` to a snapshot's ``config.json`` in place; return what is wrong with
    the result (paths that do not exist), checked before anything is written."""
    problems: list[str] = []
    disks = config.get("disks") or []
    known = {disk.get("id") for disk in disks}
    for disk_id in changes.disk_paths:
        if disk_id not in known:
            problems.append(f"the snapshot has no disk {disk_id!r}")
    for disk in disks:
        new_path = changes.disk_paths.get(disk.get("id", ""))
        if new_path is not None:
            disk["path"] = str(new_path)
    if changes.serial_file is not None:
        config["serial"] = {"mode": "File", "file": str(changes.serial_file)}
    console = config.get("console")
    if (
        changes.output_file is not None
        and isinstance(console, dict)
        and console.get("mode") == "File"
    ):
        console["file"] = str(changes.output_file)
    vsock = config.get("vsock")
    if changes.agent_socket is not None and isinstance(vsock, dict):
        # A restored VMM makes its own vsock socket: in the instance's folder, not the source's.
        vsock["socket"] = str(changes.agent_socket)
    if changes.tap is not None:
        nets = config.get("net") or []
        if len(nets) != 1:
            problems.append(f"cannot rename the TAP of a snapshot with {len(nets)} NICs")
        for net in nets:
            net["tap"] = changes.tap
    payload = config.setdefault("payload", {})
    if changes.kernel is not None:
        payload["kernel"] = str(changes.kernel)
    if changes.initrd is not None:
        payload["initramfs"] = str(changes.initrd)
    for disk in disks:
        path = disk.get("path")
        if isinstance(path, str) and not Path(path).exists():
            problems.append(f"disk {disk.get('id')!r}: {path!r} does not exist")
    serial = config.get("serial") or {}
    serial_file = serial.get("file") if serial.get("mode") == "File" else None
    if isinstance(serial_file, str) and not Path(serial_file).parent.is_dir():
        problems.append(f"serial file folder for {serial['file']!r} does not exist")
    console = config.get("console") or {}
    output_file = console.get("file") if console.get("mode") == "File" else None
    if isinstance(output_file, str) and not Path(output_file).parent.is_dir():
        problems.append(f"console file folder for {console['file']!r} does not exist")
    return problems
