"""The resource manager: the node's capacity and limits, live usage, and admission.

Instances hold resources; the instance manager knows which (see its ``allocations``) and asks
this manager to admit each operation that would take more (create, start, restore). An
admitted operation holds a *reservation* until it ends, so two operations that run at once
cannot both take the last of a kind: by the time a VMM is visible as running its reservation
is dropped, and while both exist the instance counts once, at the larger of the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from managers.resources import host
from managers.resources.errors import InsufficientResources
from managers.resources.types import (
    Allocation,
    Demand,
    DiskBreakdown,
    NetworkTotals,
    Pool,
    Ratios,
    ResourceKind,
    ResourceReport,
    Usage,
)

# Bytes on disk that no instance holds: (images, volumes).
DiskOutside = Callable[[], Awaitable[tuple[int, int]]]

SAMPLE_SECONDS = 5.0


async def _nothing_outside() -> tuple[int, int]:
    return 0, 0


class ResourceManager:
    """What the node has, what may be allocated, what is in use; admission of operations."""

    def __init__(
        self,
        data_dir: Path,
        ratios: Ratios,
        *,
        disk_outside: DiskOutside = _nothing_outside,
        sample_seconds: float = SAMPLE_SECONDS,
        proc: Path = Path("/proc"),
    ) -> None:
        self._data_dir = data_dir
        self.ratios = ratios
        self._disk_outside = disk_outside
        self._sample_seconds = sample_seconds
        self._proc = proc
        self.capacity = Demand()
        self._pending: dict[str, Demand] = {}
        self._samples: tuple[host.CpuSample, host.CpuSample | None] | None = None
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> ResourceManager:
        """Read the host's capacity and start sampling its CPU use."""
        self.capacity = await anyio.to_thread.run_sync(host.capacity, self._data_dir, self._proc)
        self._samples = (await anyio.to_thread.run_sync(host.cpu_sample, self._proc), None)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._sample)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop sampling."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None

    def limit(self, kind: ResourceKind) -> int:
        """The most of ``kind`` that may be allocated: capacity times the kind's ratio."""
        return int(self.capacity.of(kind) * self.ratios.of(kind))

    @asynccontextmanager
    async def reserve(
        self, key: str, demand: Demand, held: Mapping[str, Demand]
    ) -> AsyncIterator[None]:
        """Hold ``demand`` for instance ``key`` while an operation runs, or refuse it.

        ``held`` is what every instance holds now (the instance manager's view). Raises
        :class:`InsufficientResources` for the first kind that would pass its limit.
        """
        images, volumes = await self._disk_outside()
        # No await from here to the reservation: another operation cannot slip in between.
        counted: dict[str, Demand] = dict(held)
        for other, pending in self._pending.items():
            counted[other] = counted.get(other, Demand()).widest(pending)
        current = counted.pop(key, Demand())
        total = sum(counted.values(), Demand(disk_bytes=images + volumes))
        wanted = current.widest(demand)
        for kind in ResourceKind:
            extra = wanted.of(kind) - current.of(kind)
            if extra <= 0:
                continue
            allocated = total.of(kind) + current.of(kind)
            limit = self.limit(kind)
            if allocated + extra > limit:
                raise InsufficientResources(
                    kind,
                    requested=extra,
                    allocated=allocated,
                    effective_limit=limit,
                    oversub_ratio=self.ratios.of(kind),
                )
        if key in self._pending:
            # One instance runs one operation at a time (its lock); a second is a caller's bug.
            raise RuntimeError(f"instance {key} already holds a reservation")
        self._pending[key] = demand
        try:
            yield
        finally:
            self._pending.pop(key, None)

    async def report(self, allocations: Sequence[Allocation]) -> ResourceReport:
        """``GET /resources``: the pools as instances hold them now, and the host's use."""
        breakdown, pools = await self.pools(allocations)
        return ResourceReport(
            cpu=pools[0],
            memory=pools[1],
            disk=pools[2],
            disk_breakdown=breakdown,
            allocations=tuple(allocations),
            usage=await anyio.to_thread.run_sync(self._usage),
            network=NetworkTotals.of([a.network for a in allocations if a.network is not None]),
        )

    async def pools(
        self, allocations: Sequence[Allocation]
    ) -> tuple[DiskBreakdown, tuple[Pool, Pool, Pool]]:
        """The cpu, memory and disk pools as ``allocations`` hold them, without the host's use."""
        images, volumes = await self._disk_outside()
        held = sum((allocation.held for allocation in allocations), Demand())
        breakdown = DiskBreakdown(
            images_bytes=images, volumes_bytes=volumes, overlays_bytes=held.disk_bytes
        )
        allocated = Demand(held.vcpus, held.memory_bytes, breakdown.total)
        cpu, memory, disk = (
            Pool(
                kind=kind,
                capacity=self.capacity.of(kind),
                effective_limit=self.limit(kind),
                allocated=allocated.of(kind),
                oversub_ratio=self.ratios.of(kind),
            )
            for kind in ResourceKind
        )
        return breakdown, (cpu, memory, disk)

    def _usage(self) -> Usage:
        percent: float | None = None
        interval: float | None = None
        if self._samples is not None:
            before, after = self._samples
            if after is None:
                # The first interval has not ended: measure from start-up until now.
                after = host.cpu_sample(self._proc)
            percent = host.cpu_percent(before, after)
            interval = round(after.at - before.at, 3)
        memory = host.meminfo(self._proc)
        return Usage(
            cpu_percent=percent,
            cpu_interval_seconds=interval,
            memory_used_bytes=memory["MemTotal"] - memory.get("MemAvailable", memory["MemFree"]),
            disk_used_bytes=host.disk_used(self._data_dir),
        )

    async def _sample(self) -> None:
        while True:
            await anyio.sleep(self._sample_seconds)
            with contextlib.suppress(OSError):
                sample = await anyio.to_thread.run_sync(host.cpu_sample, self._proc)
                assert self._samples is not None
                last = self._samples[1] or self._samples[0]
                self._samples = (last, sample)
