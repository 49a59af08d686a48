"""Decide between KVM and TCG by running a real guest, not by looking at ``/dev/kvm``.

Some hosts have a ``/dev/kvm`` that opens and even runs real-mode code but cannot run a normal
Linux guest (``kvm_pvm`` here: the kernel hangs before its first console line). So the probe boots
the guest kernel itself with no root disk under KVM: a working KVM reaches the
"Kernel panic" for the missing root in well under a second, and ``panic=-1`` with ``-no-reboot``
ends QEMU. No panic line before the deadline means KVM is not usable.

A probe on a broken KVM spins a core until it is ended, so it must never outlive its caller:
it reads the guest console from a pipe (no scratch file to leave behind), runs in its own
process group, is ended when its deadline passes or its caller is cancelled, and is killed by
the kernel (``PR_SET_PDEATHSIG``) when the dataplane itself dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TypedDict

import anyio
from anyio.abc import ByteReceiveStream

from managers.atomic import write_json_atomic

from .process import VmmProcess, proc_start_time
from .types import Acceleration

PROBE_TIMEOUT = 6.0
KVM_DEVICE = Path("/dev/kvm")
# Probes of other QEMU binaries and kernels of this boot are kept up to this many; beyond it
# the oldest answers go (they cost one probe if asked again).
CACHE_LIMIT = 64
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
# "Linux version" is below ``loglevel=1`` and normally never shows; either line proves the
# guest ran under KVM.
_MARKERS = (b"Kernel panic", b"Linux version")

# Runs between fork and QEMU's exec: Python's ``preexec_fn`` is unsafe in a threaded process
# (and anyio cannot pass one), so the death signal is set by this tiny interpreter, which then
# becomes QEMU (exec keeps the pid, the process group and the death signal). The signal is tied
# to the thread that forked; anyio forks from the event loop's thread, which lives as long as
# anyone can await the probe. A parent that died before ``prctl`` would never signal, so the
# parent's pid is checked after it. 125: no death signal; 127: QEMU could not be executed.
_PDEATHSIG_EXEC = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
zero = ctypes.c_ulong(0)
if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), zero, zero, zero) != 0:
    os._exit(125)
if os.getppid() != int(sys.argv[1]):
    os._exit(125)
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError:
    os._exit(127)
"""

_cache: dict[str, Acceleration] = {}
_probing: dict[str, anyio.Lock] = {}
# Serialises this process's read-modify-writes of the cache file; see ``_store_answer`` for
# other processes.
_cache_file_lock = threading.Lock()


class _Entry(TypedDict):
    acceleration: str
    boot_id: str
    probed_at: float


async def probe_acceleration(
    qemu_bin: str, kernel: Path, cache_file: Path | None = None
) -> Acceleration:
    """KVM or TCG, probed once per QEMU binary, kernel and host boot.

    A probe that finds KVM unusable costs its whole timeout, so the answer is shared
    by concurrent callers and, with ``cache_file``, by later processes: it stays
    true until the binary, the kernel or the host's boot changes. The cache file keeps
    the answers for every binary and kernel probed during this boot (up to ``CACHE_LIMIT``).
    """
    # stat() and small reads only, but a slow filesystem must not stall the event loop.
    key = await anyio.to_thread.run_sync(_fingerprint, qemu_bin, kernel)
    lock = _probing.setdefault(key, anyio.Lock())
    async with lock:
        if key not in _cache:
            answer = None
            if cache_file is not None:
                answer = await anyio.to_thread.run_sync(_stored_answer, cache_file, key)
            if answer is None:
                usable = await _kvm_runs_guest(qemu_bin, kernel)
                answer = Acceleration.KVM if usable else Acceleration.TCG
                if cache_file is not None:
                    # write_atomic fsyncs, which may take a while on a busy disk.
                    await anyio.to_thread.run_sync(_store_answer, cache_file, key, answer)
            _cache[key] = answer
    return _cache[key]


def _fingerprint(qemu_bin: str, kernel: Path) -> str:
    """The QEMU binary and the kernel, by path and file identity (a reinstall changes it)."""
    parts = []
    for path in (Path(shutil.which(qemu_bin) or qemu_bin), kernel):
        try:
            real = path.resolve()
            stat = real.stat()
            parts.append(f"{real}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            parts.append(str(path))
    return "|".join(parts)


def _boot_id() -> str:
    try:
        return _BOOT_ID_FILE.read_text().strip()
    except OSError:
        return "unknown-boot"


def _current_entries(cache_file: Path, boot_id: str) -> dict[str, _Entry]:
    """The file's well-formed entries of this boot; anything else is as good as absent."""
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    entries: dict[str, _Entry] = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            continue
        acceleration = value.get("acceleration")
        probed_at = value.get("probed_at")
        if (
            value.get("boot_id") == boot_id
            and acceleration in (Acceleration.KVM.value, Acceleration.TCG.value)
            and isinstance(probed_at, int | float)
        ):
            entries[str(key)] = _Entry(
                acceleration=str(acceleration), boot_id=boot_id, probed_at=float(probed_at)
            )
    return entries


def _stored_answer(cache_file: Path, key: str) -> Acceleration | None:
    entry = _current_entries(cache_file, _boot_id()).get(key)
    return Acceleration(entry["acceleration"]) if entry is not None else None


def _store_answer(cache_file: Path, key: str, answer: Acceleration) -> None:
    # Two dataplanes may read-modify-write the file at once and the later rename wins, losing
    # the other's new entry. That costs the loser one more probe later, never a wrong answer:
    # every entry written is its writer's own probe of that binary and kernel during this boot.
    boot_id = _boot_id()
    with _cache_file_lock:
        entries = _current_entries(cache_file, boot_id)
        entries[key] = _Entry(acceleration=answer.value, boot_id=boot_id, probed_at=time.time())
        newest = sorted(entries.items(), key=lambda item: item[1]["probed_at"], reverse=True)
        with contextlib.suppress(OSError):
            write_json_atomic(cache_file, dict(newest[:CACHE_LIMIT]))


async def _kvm_runs_guest(
    qemu_bin: str,
    kernel: Path,
    *,
    seconds: float = PROBE_TIMEOUT,
    kvm_device: Path = KVM_DEVICE,
) -> bool:
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return False
    # Resolved here so a missing binary fails loudly, as it would without the exec trampoline,
    # instead of reading as "KVM unusable".
    binary = shutil.which(qemu_bin)
    if binary is None:
        raise FileNotFoundError(errno.ENOENT, "QEMU binary not found", qemu_bin)
    # -I -S: nothing from the environment or site-packages runs before QEMU, and the
    # interpreter starts in ~20 ms.
    argv = [
        sys.executable or "python3", "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()),
        binary,
        "-machine", "pc,accel=kvm",
        "-cpu", "host",
        "-m", "128",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel),
        "-append", "console=ttyS0 panic=-1 loglevel=1",
        "-serial", "stdio",
    ]  # fmt: skip
    child = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    process = VmmProcess(child.pid, proc_start_time(child.pid) or 0, child)
    try:
        assert child.stdout is not None  # stdout=PIPE
        with anyio.move_on_after(seconds):
            return await _console_shows_guest(child.stdout)
        return False
    finally:
        # Shielded: a caller cancelled mid-probe is exactly when QEMU must not be left running.
        # Bounded by terminate(): 1 s after SIGTERM, then SIGKILL and at most 5 s more.
        with anyio.CancelScope(shield=True):
            await process.terminate(grace=1.0)
            if process.alive():
                # Unkillable (stuck in the kernel): waiting for it would hang the caller too.
                process.release()
                if child.stdout is not None:
                    await child.stdout.aclose()
            else:
                await process.aclose()


async def _console_shows_guest(console: ByteReceiveStream) -> bool:
    """True at the first marker line; False when the console closes (QEMU ended) without one."""
    overlap = max(len(marker) for marker in _MARKERS) - 1
    tail = b""
    async for chunk in console:
        window = tail + chunk
        if any(marker in window for marker in _MARKERS):
            return True
        tail = window[-overlap:]
    return False
