"""Decide between KVM and TCG by running a real guest, not by looking at ``/dev/kvm``.

Some hosts have a ``/dev/kvm`` that opens and even runs real-mode code but cannot run a normal
Linux guest (``kvm_pvm`` here: the kernel hangs before its first console line). So the probe boots
the guest kernel itself with no root disk under KVM: a working KVM reaches the
"Kernel panic" for the missing root in well under a second, and ``panic=-1`` with ``-no-reboot``
ends QEMU. No panic line before the deadline means KVM is not usable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import anyio

from managers.atomic import write_json_atomic

from .process import VmmProcess, proc_start_time
from .types import Acceleration

PROBE_TIMEOUT = 6.0
_cache: dict[str, Acceleration] = {}
_probing: dict[str, anyio.Lock] = {}


async def probe_acceleration(
    qemu_bin: str, kernel: Path, cache_file: Path | None = None
) -> Acceleration:
    """KVM or TCG, probed once per QEMU binary, kernel and host boot.

    A probe that finds KVM unusable costs its whole timeout, so the answer is shared
    by concurrent callers and, with ``cache_file``, by later processes: it stays
    true until the binary, the kernel or the host's boot changes.
    """
    key = _fingerprint(qemu_bin, kernel)
    lock = _probing.setdefault(key, anyio.Lock())
    async with lock:
        if key not in _cache:
            stored = _read_cache(cache_file).get(key) if cache_file else None
            if stored in (Acceleration.KVM.value, Acceleration.TCG.value):
                _cache[key] = Acceleration(stored)
            else:
                usable = await _kvm_runs_guest(qemu_bin, kernel)
                _cache[key] = Acceleration.KVM if usable else Acceleration.TCG
                if cache_file is not None:
                    _write_cache(cache_file, key, _cache[key])
    return _cache[key]


def _fingerprint(qemu_bin: str, kernel: Path) -> str:
    parts = []
    for path in (Path(shutil.which(qemu_bin) or qemu_bin), kernel):
        try:
            stat = path.resolve().stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            parts.append(str(path))
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        parts.append("unknown-boot")
    return "|".join(parts)


def _read_cache(cache_file: Path) -> dict[str, str]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, key: str, value: Acceleration) -> None:
    # Only this host's current answer is worth keeping.
    with contextlib.suppress(OSError):
        write_json_atomic(cache_file, {key: value.value})


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
