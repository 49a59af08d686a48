"""What the host has and uses, read from ``/proc`` and ``statvfs``: cheap, synchronous reads."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from managers.resources.types import Demand

_PROC = Path("/proc")


def cpu_count() -> int:
    """Every CPU the host has online, as vCPUs can be spread over all of them."""
    return os.cpu_count() or 1


def meminfo(proc: Path = _PROC) -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    found: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            found[key] = int(fields[0]) * scale
    return found


def disk_total(path: Path) -> int:
    """The size of the filesystem that holds ``path``."""
    stat = os.statvfs(path)
    return stat.f_blocks * stat.f_frsize


def disk_used(path: Path) -> int:
    """Bytes used on the filesystem that holds ``path``, by anyone."""
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def capacity(data_dir: Path, proc: Path = _PROC) -> Demand:
    """The host's vCPUs, memory and the disk that holds ``data_dir``."""
    return Demand(
        vcpus=cpu_count(), memory_bytes=meminfo(proc)["MemTotal"], disk_bytes=disk_total(data_dir)
    )


@dataclass(frozen=True, slots=True)
class CpuSample:
    busy: int
    total: int
    at: float


def cpu_sample(proc: Path = _PROC) -> CpuSample:
    """The host's CPU time so far, busy and total, in clock ticks (the first line of /proc/stat)."""
    with open(proc / "stat", "rb") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user).
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return CpuSample(busy=total - idle, total=total, at=time.monotonic())


def cpu_percent(before: CpuSample, after: CpuSample) -> float | None:
    """How busy the host was between two samples, 0-100 across all CPUs."""
    ticks = after.total - before.total
    if ticks <= 0:
        return None
    return round(100.0 * (after.busy - before.busy) / ticks, 1)
