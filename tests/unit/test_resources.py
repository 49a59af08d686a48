"""The resource manager: limits, admission with reservations, the report; and the instance
manager asking it before every boot (fake VMMs, a fake /proc)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from managers.instances import InstanceState
from managers.paths import Paths
from managers.resources import (
    Demand,
    InsufficientResources,
    Ratios,
    ResourceKind,
    ResourceManager,
)
from tests.unit.test_instance_manager import (
    FakeBackend,
    FakeImages,
    FakeNetwork,
    build,
    request,
)

pytestmark = pytest.mark.anyio

GIB = 1 << 30
MIB = 1 << 20


def fake_proc(root: Path, memory_bytes: int = 2 * GIB, busy: int = 100, idle: int = 300) -> Path:
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {memory_bytes // 1024} kB\n"
        "MemFree:          100000 kB\n"
        f"MemAvailable:    {memory_bytes // 2048} kB\n"
    )
    (proc / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n")
    return proc


@pytest.fixture
async def resources(tmp_path: Path) -> AsyncIterator[ResourceManager]:
    async with ResourceManager(tmp_path, Ratios(), proc=fake_proc(tmp_path)) as manager:
        yield manager


async def test_limits_are_capacity_times_the_ratio(tmp_path: Path) -> None:
    ratios = Ratios(cpu=2.5, memory=1.5, disk=0.5)
    async with ResourceManager(tmp_path, ratios, proc=fake_proc(tmp_path)) as manager:
        report = await manager.report([])
    cpus = os.cpu_count() or 1
    assert report.cpu.capacity == cpus
    assert report.cpu.effective_limit == int(cpus * 2.5)
    assert report.memory.capacity == 2 * GIB
    assert report.memory.effective_limit == 3 * GIB
    stat = os.statvfs(tmp_path)
    assert report.disk.capacity == stat.f_blocks * stat.f_frsize
    assert report.disk.effective_limit == report.disk.capacity // 2
    assert report.memory.available == 3 * GIB


async def test_a_demand_past_the_limit_is_refused_naming_the_limit(
    resources: ResourceManager,
) -> None:
    with pytest.raises(InsufficientResources) as refused:
        async with resources.reserve("a", Demand(1, 3 * GIB, 0), {"b": Demand(1, 512 * MIB)}):
            pass
    details = refused.value.details
    assert details["resource"] == "memory"
    assert details["requested"] == 3 * GIB
    assert details["allocated"] == 512 * MIB
    assert details["available"] == 2 * GIB - 512 * MIB
    assert details["short_by"] == 3 * GIB - (2 * GIB - 512 * MIB)
    assert "MEMORY_OVERSUB_RATIO=1" in refused.value.message


async def test_a_reservation_counts_until_its_operation_ends(resources: ResourceManager) -> None:
    async with resources.reserve("a", Demand(1, 1536 * MIB), {}):
        with pytest.raises(InsufficientResources):
            async with resources.reserve("b", Demand(1, 1024 * MIB), {}):
                pass
        # Once the first instance's VMM is visible it counts once, not twice.
        async with resources.reserve("b", Demand(1, 512 * MIB), {"a": Demand(1, 1536 * MIB)}):
            pass
    async with resources.reserve("b", Demand(1, 1024 * MIB), {}):
        pass


async def test_an_instance_counts_once_at_the_larger_of_what_it_holds_and_asks(
    resources: ResourceManager,
) -> None:
    # A stopped instance holds its overlay; starting it asks for vCPUs and memory on top.
    held = {"a": Demand(disk_bytes=GIB), "b": Demand(1, GIB, GIB)}
    async with resources.reserve("a", Demand(1, GIB, GIB), held):
        pass
    with pytest.raises(InsufficientResources) as refused:
        async with resources.reserve("a", Demand(1, GIB + 1, GIB), held):
            pass
    assert refused.value.details["requested"] == GIB + 1


async def test_cpu_is_oversubscribed_by_default(resources: ResourceManager) -> None:
    limit = resources.limit(ResourceKind.CPU)
    assert limit == 4 * (os.cpu_count() or 1)
    async with resources.reserve("a", Demand(limit, 0, 0), {}):
        pass
    with pytest.raises(InsufficientResources) as refused:
        async with resources.reserve("a", Demand(limit + 1, 0, 0), {}):
            pass
    assert refused.value.details["resource"] == "cpu"


async def test_usage_reads_the_host(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, busy=100, idle=300)
    async with ResourceManager(tmp_path, Ratios(), proc=proc, sample_seconds=3600) as manager:
        # Between start-up and now: 300 more busy ticks of 400.
        fake_proc(tmp_path, busy=400, idle=400)
        usage = (await manager.report([])).usage
    assert usage.cpu_percent == 75.0
    assert usage.memory_used_bytes == 2 * GIB - GIB
    assert usage.disk_used_bytes > 0


async def test_the_instance_manager_asks_before_every_boot(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    async with (
        ResourceManager(tmp_path, Ratios(), proc=fake_proc(tmp_path)) as resources,
        build(
            paths, FakeImages(disk), FakeBackend(), FakeNetwork(), admission=resources
        ) as manager,
    ):
        await manager.create(request("one", memory_mb=1024))
        with pytest.raises(InsufficientResources):
            await manager.create(request("two", memory_mb=1536))
        # Refused before anything was made: one folder, and the name is free again.
        assert [i.name for i in await manager.list()] == ["one"]
        assert len(list((paths.root / "instances").iterdir())) == 1
        # Not booted, it holds only its overlay.
        await manager.create(request("two", memory_mb=1536, start=False))
        with pytest.raises(InsufficientResources):
            await manager.start_instance("two")
        assert (await manager.get("two")).state is InstanceState.CREATED
        await manager.standby("one")
        await manager.start_instance("two")
        with pytest.raises(InsufficientResources):
            await manager.restore("one")
        assert (await manager.get("one")).state is InstanceState.STANDBY
        held = {a.instance_name: a.held for a in await manager.allocations()}
        assert held == {
            "one": Demand(0, 0, 16 * MIB),
            "two": Demand(1, 1536 * MIB, 16 * MIB),
        }
        await manager.delete("two")
        assert (await manager.restore("one")).state is not InstanceState.STANDBY


async def test_two_creates_at_once_cannot_both_take_the_last_memory(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    outcomes: list[str] = []
    async with (
        ResourceManager(tmp_path, Ratios(), proc=fake_proc(tmp_path)) as resources,
        build(
            paths, FakeImages(disk), FakeBackend(), FakeNetwork(), admission=resources
        ) as manager,
    ):

        async def create(name: str) -> None:
            try:
                await manager.create(request(name, memory_mb=1536))
                outcomes.append("created")
            except InsufficientResources:
                outcomes.append("refused")

        async with anyio.create_task_group() as group:
            for name in ("a", "b", "c"):
                group.start_soon(create, name)
        assert sorted(outcomes) == ["created", "refused", "refused"]
        assert len(await manager.list()) == 1
        assert len(list((paths.root / "instances").iterdir())) == 1
