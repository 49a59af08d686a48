"""Cloud Hypervisor v53's VMM state machine, as its API shows it. No guest runs.

States: no config (fresh), config with no VM ("Created"), VM Running or Paused. A guest power-off
drops the VM and keeps the config, so ``vm.info`` says Created again (v53 with ``--no-shutdown``);
without ``--no-shutdown`` the VMM process exits instead.

Answers follow v53's code, not the YAML where they differ: 500 for a wrong state, 404 when there is
no VM config, 400 for a bad body or a body on a bodiless action, 200 for ``vmm.shutdown``, error
bodies as JSON arrays of strings.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .guest import SimulatedGuest
from .spec import ApiSpec

Answer = tuple[int, Any]


class ApiFailure(Exception):
    def __init__(self, status: int, chain: list[str], violation: bool = False) -> None:
        super().__init__("; ".join(chain))
        self.status = status
        self.chain = chain
        # A violation is a request the reference rejects: the test that sent it must fail.
        self.violation = violation


def _state_error(action: str, state: str) -> ApiFailure:
    return ApiFailure(500, [f"Error from API: {action}", f"Invalid VM state transition: {state}"])


@dataclass
class SimulatedVmm:
    spec: ApiSpec
    events_path: Path | None
    no_shutdown: bool
    guest_behaviour: str = "acpi"
    started: float = field(default_factory=time.monotonic)
    config: dict[str, Any] | None = None
    vm_state: str | None = None  # None, "Running" or "Paused"
    exit_requested: asyncio.Event = field(default_factory=asyncio.Event)
    guest: SimulatedGuest = field(default_factory=lambda: SimulatedGuest(None))
    _bdf: int = 3

    # -- plumbing ---------------------------------------------------------------------------
    def event(self, source: str, name: str, properties: dict[str, str] | None = None) -> None:
        if self.events_path is None:
            return
        elapsed = time.monotonic() - self.started
        record = {
            "timestamp": {"secs": int(elapsed), "nanos": int((elapsed % 1) * 1e9)},
            "source": source,
            "event": name,
            "properties": properties,
        }
        with self.events_path.open("a") as handle:
            handle.write(json.dumps(record, indent=2) + "\n\n")

    def serial_line(self, text: str) -> None:
        serial = (self.config or {}).get("serial") or {}
        if serial.get("mode") == "File" and serial.get("file"):
            with open(serial["file"], "a") as handle:
                handle.write(f"[ch-simulator] {text}\n")

    def serial_path(self) -> Path | None:
        serial = (self.config or {}).get("serial") or {}
        if serial.get("mode") == "File" and serial.get("file"):
            return Path(serial["file"])
        return None

    def start_guest(self, action: str) -> None:
        # Cloud Hypervisor opens (creates) a console in File mode as it makes the devices.
        console = (self.config or {}).get("console") or {}
        if console.get("mode") == "File":
            try:
                Path(console["file"]).touch()
            except OSError as exc:
                raise ApiFailure(
                    500, [f"Error from API: {action}", f"Cannot open console file: {exc}"]
                ) from exc
        try:
            self.guest.boot(self.config or {}, self.serial_path())
        except OSError as exc:
            raise ApiFailure(
                500, [f"Error from API: {action}", f"Cannot create virtio-vsock device: {exc}"]
            ) from exc

    def info_state(self) -> str:
        return self.vm_state or "Created"

    def need_config(self, action: str) -> dict[str, Any]:
        if self.config is None:
            raise ApiFailure(404, [f"Error from API: {action}", "VM is not created"])
        return self.config

    def need_vm(self, action: str, *states: str) -> None:
        self.need_config(action)
        if self.vm_state not in states:
            raise _state_error(action, self.info_state())

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, method: str, endpoint: str, body: bytes) -> Answer:
        operation = self.spec.operations.get((method, endpoint))
        if operation is None:
            if self.spec.endpoints(endpoint):
                raise ApiFailure(400, [f"{method} is not allowed on {endpoint}"], violation=True)
            raise ApiFailure(404, [f"unknown endpoint {endpoint}"], violation=True)
        value: Any = None
        if operation.body_schema is None:
            if body:
                raise ApiFailure(400, [f"{endpoint} takes no body"], violation=True)
        else:
            if not body:
                raise ApiFailure(400, [f"{endpoint} needs a body"], violation=True)
            try:
                value = json.loads(body)
            except ValueError as exc:
                raise ApiFailure(400, [f"invalid JSON: {exc}"], violation=True) from exc
            problems = self.spec.errors(operation.body_schema, value)
            if problems:
                raise ApiFailure(400, problems, violation=True)
        handler = getattr(self, "do_" + endpoint.replace(".", "_").replace("-", "_"), None)
        if handler is None:
            raise ApiFailure(500, [f"{endpoint} is not simulated"], violation=True)
        result: Answer = handler(value)
        return result

    # -- vmm ----------------------------------------------------------------------------------
    def do_vmm_ping(self, _body: None) -> Answer:
        return 200, {
            "build_version": "v53.0",
            "version": "53.0.0",
            "pid": os.getpid(),
            "features": ["kvm", "io_uring"],
        }

    def do_vmm_shutdown(self, _body: None) -> Answer:
        self.guest.power_off()
        if self.vm_state is not None:
            self.event("vm", "shutdown")
        self.vm_state = None
        self.event("vmm", "shutdown")
        self.exit_requested.set()
        return 200, None

    # -- vm lifecycle ---------------------------------------------------------------------------
    def do_vm_create(self, body: dict[str, Any]) -> Answer:
        if self.config is not None:
            raise ApiFailure(500, ["Error from API: VmCreate", "The VM is already created"])
        problems = _semantic_problems(body)
        if problems:
            raise ApiFailure(500, ["Error from API: VmCreate", *problems], violation=True)
        self.config = copy.deepcopy(body)
        self.event("vm", "created")
        return 204, None

    def do_vm_boot(self, _body: None) -> Answer:
        config = self.need_config("VmBoot")
        if self.vm_state is not None:
            raise _state_error("VmBoot", self.vm_state)
        kernel = config["payload"].get("kernel")
        if not kernel or not Path(kernel).is_file():
            raise ApiFailure(500, ["Error from API: VmBoot", f"Cannot open kernel {kernel!r}"])
        for disk in config.get("disks") or []:
            if not Path(disk["path"]).is_file():
                raise ApiFailure(
                    500, ["Error from API: VmBoot", f"Cannot open disk {disk['path']}"]
                )
        self.event("vm", "booting")
        cmdline = str(config["payload"].get("cmdline", ""))
        self.serial_line(f"booted {kernel} cmdline={cmdline!r}")
        self.start_guest("VmBoot")
        self.vm_state = "Running"
        self.event("vm", "booted")
        # The test guest's own power-off timer (tests/support/hypervisor_guest.py).
        for arg in cmdline.split():
            if arg.startswith("poweroff_after="):
                delay = float(arg.partition("=")[2])
                asyncio.get_running_loop().call_later(delay, self._guest_power_off)
        return 204, None

    def do_vm_info(self, _body: None) -> Answer:
        config = self.need_config("VmInfo")
        memory = config.get("memory", {"size": 512 << 20})
        actual = int(memory.get("size", 0)) + int(memory.get("hotplugged_size", 0) or 0)
        return 200, {
            "config": config,
            "state": self.info_state(),
            "memory_actual_size": actual,
            "device_tree": {},
        }

    def do_vm_counters(self, _body: None) -> Answer:
        self.need_vm("VmCounters", "Running", "Paused")
        return 200, {}

    def do_vm_pause(self, _body: None) -> Answer:
        self.need_vm("VmPause", "Running")
        self.event("vm", "pausing")
        self.guest.pause()
        self.vm_state = "Paused"
        self.event("vm", "paused")
        return 204, None

    def do_vm_resume(self, _body: None) -> Answer:
        self.need_vm("VmResume", "Paused")
        self.event("vm", "resuming")
        self.guest.resume()
        self.vm_state = "Running"
        self.event("vm", "resumed")
        return 204, None

    def do_vm_shutdown(self, _body: None) -> Answer:
        self.need_vm("VmShutdown", "Running", "Paused")
        self.guest.power_off()
        self.vm_state = None
        self.event("vm", "shutdown")
        return 204, None

    def do_vm_reboot(self, _body: None) -> Answer:
        self.need_vm("VmReboot", "Running")
        config = self.need_config("VmReboot")
        self.event("vm", "rebooting")
        self.guest.power_off()
        self.serial_line(f"booted {config['payload']['kernel']} (reboot)")
        self.start_guest("VmReboot")
        self.event("vm", "rebooted")
        return 204, None

    def do_vm_delete(self, _body: None) -> Answer:
        self.guest.power_off()
        self.config = None
        self.vm_state = None
        self.event("vm", "deleted")
        return 204, None

    def do_vm_nmi(self, _body: None) -> Answer:
        self.need_vm("VmNmi", "Running")
        return 204, None

    def do_vm_power_button(self, _body: None) -> Answer:
        self.need_vm("VmPowerButton", "Running", "Paused")
        if self.guest_behaviour == "acpi" and self.vm_state == "Running":
            asyncio.get_running_loop().call_later(0.05, self._guest_power_off)
        return 204, None

    def _guest_power_off(self) -> None:
        if self.vm_state != "Running":
            return
        self.serial_line("guest powered off")
        self.guest.power_off()
        self.vm_state = None
        self.event("vm", "shutdown")
        if not self.no_shutdown:
            self.event("vmm", "shutdown")
            self.exit_requested.set()

    # -- devices and memory -------------------------------------------------------------------
    def do_vm_add_disk(self, body: dict[str, Any]) -> Answer:
        config = self.need_config("VmAddDisk")
        problems = _disk_problems(body)
        if problems:
            raise ApiFailure(500, ["Error from API: VmAddDisk", *problems], violation=True)
        disks = config.setdefault("disks", [])
        disk_id = body.get("id") or f"_disk{len(disks)}"
        if any(d.get("id") == disk_id for d in disks):
            raise ApiFailure(500, ["Error from API: VmAddDisk", f"Identifier {disk_id} in use"])
        if not Path(body["path"]).is_file():
            raise ApiFailure(500, ["Error from API: VmAddDisk", f"Cannot open {body['path']}"])
        disks.append({**body, "id": disk_id})
        if self.vm_state is None:
            return 204, None
        self._bdf += 1
        self.event("vm", "device-added", {"id": disk_id})
        return 200, {"id": disk_id, "bdf": f"0000:00:{self._bdf:02x}.0"}

    def do_vm_remove_device(self, body: dict[str, Any]) -> Answer:
        config = self.need_config("VmRemoveDevice")
        for kind in ("disks", "net"):
            devices = config.get(kind) or []
            for device in devices:
                if device.get("id") == body.get("id"):
                    devices.remove(device)
                    self.event("vm", "device-removed", {"id": str(body.get("id"))})
                    return 204, None
        raise ApiFailure(
            500, ["Error from API: VmRemoveDevice", f"Unknown device {body.get('id')!r}"]
        )

    def do_vm_resize(self, body: dict[str, Any]) -> Answer:
        config = self.need_config("VmResize")
        memory = config["memory"]
        if "desired_ram" in body:
            base = int(memory["size"])
            current = base + int(memory.get("hotplugged_size") or 0)
            limit = base + int(memory.get("hotplug_size") or 0)
            wanted = int(body["desired_ram"])
            if wanted > limit:
                raise ApiFailure(500, ["Error from API: VmResize", "Insufficient hotplug RAM"])
            if wanted < current:
                raise ApiFailure(
                    500, ["Error from API: VmResize", "Cannot shrink memory with ACPI hotplug"]
                )
            memory["hotplugged_size"] = wanted - base
        if "desired_vcpus" in body:
            if int(body["desired_vcpus"]) > int(config["cpus"]["max_vcpus"]):
                raise ApiFailure(500, ["Error from API: VmResize", "Too many vCPUs"])
            config["cpus"]["boot_vcpus"] = int(body["desired_vcpus"])
        return 204, None

    # -- snapshot and restore -----------------------------------------------------------------
    def do_vm_snapshot(self, body: dict[str, Any]) -> Answer:
        self.need_config("VmSnapshot")
        if self.vm_state != "Paused":
            raise ApiFailure(
                500, ["Error from API: VmSnapshot", "Trying to snapshot while VM is running"]
            )
        target = _file_url(body.get("destination_url"), "VmSnapshot")
        if not target.is_dir():
            raise ApiFailure(500, ["Error from API: VmSnapshot", f"{target} is not a directory"])
        self.event("vm", "snapshotting")
        (target / "config.json").write_text(json.dumps(self.config))
        (target / "state.json").write_text(json.dumps({"simulated": True, "vm_state": "Paused"}))
        (target / "memory-ranges").write_bytes(b"\x00" * 4096)
        self.event("vm", "snapshotted")
        return 204, None

    def do_vm_restore(self, body: dict[str, Any]) -> Answer:
        if self.config is not None:
            raise ApiFailure(500, ["Error from API: VmRestore", "The VM is already created"])
        source = _file_url(body.get("source_url"), "VmRestore")
        try:
            config = json.loads((source / "config.json").read_text())
            json.loads((source / "state.json").read_text())
            (source / "memory-ranges").stat()
        except (OSError, ValueError) as exc:
            raise ApiFailure(500, ["Error from API: VmRestore", f"Bad snapshot: {exc}"]) from exc
        problems = self.spec.errors("VmConfig", config) + _semantic_problems(config)
        if problems:
            raise ApiFailure(500, ["Error from API: VmRestore", *problems], violation=True)
        for disk in config.get("disks") or []:
            if not Path(disk["path"]).is_file():
                raise ApiFailure(
                    500, ["Error from API: VmRestore", f"Cannot open disk {disk['path']}"]
                )
        self.event("vm", "restoring")
        self.config = config
        # The restored guest runs on from its snapshot: its agent is a fresh process, with no
        # session of before (as after our agent's HELLO), and no new boot markers.
        self.guest.restored = True
        self.start_guest("VmRestore")
        self.vm_state = "Running" if body.get("resume") else "Paused"
        if self.vm_state == "Paused":
            self.guest.pause()
        self.serial_line("restored")
        self.event("vm", "restored")
        return 204, None


def _file_url(url: object, action: str) -> Path:
    parsed = urlparse(str(url))
    if parsed.scheme != "file" or not parsed.path.startswith("/"):
        raise ApiFailure(500, [f"Error from API: {action}", f"Unsupported URL {url!r}"])
    return Path(parsed.path)


def _disk_problems(disk: dict[str, Any]) -> list[str]:
    problems = []
    if not disk.get("path"):
        problems.append("a disk needs a path")
    if disk.get("image_type") != "Raw":
        # Not a v53 rule but this project's: format probing on raw guest-written disks is unsafe.
        problems.append(f"disk {disk.get('id')!r} must say image_type Raw")
    return problems


def _semantic_problems(config: dict[str, Any]) -> list[str]:
    """What v53's ``VmConfig::validate`` refuses, for the fields this project uses."""
    problems: list[str] = []
    cpus = config.get("cpus")
    if cpus and cpus["max_vcpus"] < cpus["boot_vcpus"]:
        problems.append("max_vcpus is below boot_vcpus")
    if not (config.get("payload") or {}).get("kernel"):
        problems.append("no kernel in payload")
    for name in ("serial", "console"):
        mode = (config.get(name) or {}).get("mode")
        if mode == "File" and not (config.get(name) or {}).get("file"):
            problems.append(f"{name} in File mode needs a file")
    if (config.get("console") or {}).get("mode") not in ("Off", "File", None):
        problems.append("this project sets the console Off or to a File")
    for disk in config.get("disks") or []:
        problems.extend(_disk_problems(disk))
    ids = [d.get("id") for d in (config.get("disks") or []) + (config.get("net") or [])]
    if len([i for i in ids if i]) != len({i for i in ids if i}):
        problems.append("device identifiers are not unique")
    return problems
