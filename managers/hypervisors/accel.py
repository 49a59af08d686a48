"""Decide between KVM and TCG by running a real guest, not by looking at ``/dev/kvm``.

Some hosts have a ``/dev/kvm`` that opens and even runs real-mode code but cannot run a normal
Linux guest (``kvm_pvm`` here: the kernel hangs before its first console line). So the probe boots
the guest kernel itself with no root disk under KVM: a working KVM reaches the
"Kernel panic" for the missing root in well under a second, and ``panic=-1`` with ``-no-reboot``
ends QEMU. No panic line before the deadline means KVM is not usable.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import anyio

from .process import VmmProcess, proc_start_time
from .types import Acceleration

PROBE_TIMEOUT = 6.0
_cache: dict[tuple[str, str], Acceleration] = {}


async def probe_acceleration(qemu_bin: str, kernel: Path) -> Acceleration:
    key = (qemu_bin, str(kernel))
    if key not in _cache:
        _cache[key] = (
            Acceleration.KVM if await _kvm_runs_guest(qemu_bin, kernel) else (Acceleration.TCG)
        )
    return _cache[key]


async def _kvm_runs_guest(qemu_bin: str, kernel: Path) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as scratch:
        serial = Path(scratch) / "serial.log"
        argv = [
            qemu_bin,
            "-machine", "pc,accel=kvm",
            "-cpu", "host",
            "-m", "128",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 loglevel=1",
            "-serial", f"file:{serial}",
        ]  # fmt: skip
        child = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        process = VmmProcess(child.pid, proc_start_time(child.pid) or 0, child)
        try:
            await process.wait_exit(PROBE_TIMEOUT)
        finally:
            await process.terminate(grace=1.0)
        text = serial.read_bytes() if serial.exists() else b""
        return b"Kernel panic" in text or b"Linux version" in text
