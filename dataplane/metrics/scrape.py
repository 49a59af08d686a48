"""What ``GET /metrics`` reads at scrape time, and the text it answers.

The figures that describe the node *now* (instances by state, images by status, each VMM's
CPU time and memory, log bytes, webhook deliveries and backlog, resource pools) are read from
the managers in one async pass into a :class:`Snapshot`, then rendered in a worker thread with
the always-kept metrics of :class:`~dataplane.metrics.registry.Metrics`. A series per instance
exists only while the instance does; its label is the instance id, so the count is bounded by
the node's instances.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dataplane.metrics.registry import Metrics
from managers.images import ImageStatus
from managers.instances import InstanceState
from managers.resources import ResourceKind

if TYPE_CHECKING:
    from dataplane.runtime import Runtime

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class VmmUsage:
    instance_id: str
    cpu_seconds: float
    resident_bytes: int


@dataclass(frozen=True, slots=True)
class WebhookFigures:
    endpoint: str
    delivered: int
    failed: int
    dropped: int
    backlog: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    instances: dict[str, int]
    images: dict[str, int]
    vmm_pids: dict[str, int]
    log_written: dict[str, int]
    log_dropped: dict[str, int]
    webhooks: tuple[WebhookFigures, ...]
    # resource -> (allocated, effective limit); empty without a resource manager
    pools: dict[str, tuple[int, int]]


async def snapshot(runtime: Runtime) -> Snapshot:
    """Everything read from the managers, without touching the disk."""
    instances = dict.fromkeys((str(state) for state in InstanceState), 0)
    pids: dict[str, int] = {}
    if runtime.instances is not None:
        for instance in await runtime.instances.list():
            instances[str(instance.state)] += 1
            if instance.pid is not None:
                pids[instance.id] = instance.pid
    images = dict.fromkeys((str(status) for status in ImageStatus), 0)
    if runtime.images is not None:
        for image in await runtime.images.list():
            images[str(image.status)] += 1
    pools: dict[str, tuple[int, int]] = {}
    if runtime.resources is not None and runtime.instances is not None:
        _, held = await runtime.resources.pools(await runtime.instances.allocations())
        for pool in held:
            pools[pool.kind.value] = (pool.allocated, pool.effective_limit)
    webhooks: list[WebhookFigures] = []
    if runtime.events is not None:
        last = runtime.events.log.next_seq - 1
        for endpoint in runtime.events.endpoints:
            stats = endpoint.stats
            webhooks.append(
                WebhookFigures(
                    endpoint=endpoint_label(endpoint.url),
                    delivered=stats.delivered,
                    failed=stats.failed_attempts,
                    dropped=stats.dropped,
                    backlog=max(0, last - stats.cursor),
                )
            )
    tally = runtime.log_tally
    return Snapshot(
        instances=instances,
        images=images,
        vmm_pids=pids,
        log_written=tally.written(),
        log_dropped=tally.dropped(),
        webhooks=tuple(webhooks),
        pools=pools,
    )


def endpoint_label(url: str) -> str:
    """A webhook URL without credentials or query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def vmm_usage(instance_id: str, pid: int, proc: str = "/proc") -> VmmUsage | None:
    """CPU time (user + system) and resident memory of a VMM from ``/proc/<pid>/stat``."""
    # os.open and one read, not pathlib: a scrape makes one of these per VMM.
    try:
        handle = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None  # it exited since the snapshot
    try:
        raw = os.read(handle, 4096)
    finally:
        os.close(handle)
    # The command name is in parentheses and may hold spaces: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # stat(5): utime and stime are fields 14 and 15, rss (pages) field 24; here 3 fields in.
    return VmmUsage(
        instance_id,
        cpu_seconds=(int(fields[11]) + int(fields[12])) / _TICKS,
        resident_bytes=int(fields[21]) * _PAGE,
    )


class _SnapshotCollector(Collector):
    def __init__(self, snap: Snapshot, vmms: Iterable[VmmUsage]) -> None:
        self._snap = snap
        self._vmms = list(vmms)

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        instances = GaugeMetricFamily(
            "dataplane_instances", "Instances by state.", labels=["state"]
        )
        for state, count in snap.instances.items():
            instances.add_metric([state], count)
        yield instances
        images = GaugeMetricFamily("dataplane_images", "Images by status.", labels=["status"])
        for status, count in snap.images.items():
            images.add_metric([status], count)
        yield images
        cpu = CounterMetricFamily(
            "dataplane_vmm_cpu_seconds",
            "CPU time (user and system) used by each instance's VMM process.",
            labels=["instance_id"],
        )
        memory = GaugeMetricFamily(
            "dataplane_vmm_resident_memory_bytes",
            "Resident memory of each instance's VMM process (guest memory it touched included).",
            labels=["instance_id"],
        )
        for usage in self._vmms:
            cpu.add_metric([usage.instance_id], usage.cpu_seconds)
            memory.add_metric([usage.instance_id], usage.resident_bytes)
        yield cpu
        yield memory
        written = CounterMetricFamily(
            "dataplane_log_written_bytes",
            "Bytes written to instance logs since start-up, by source.",
            labels=["source"],
        )
        dropped = CounterMetricFamily(
            "dataplane_log_dropped_bytes",
            "Bytes of instance logs removed by retention since start-up, by source.",
            labels=["source"],
        )
        for source, count in sorted(snap.log_written.items()):
            written.add_metric([source], count)
        for source, count in sorted(snap.log_dropped.items()):
            dropped.add_metric([source], count)
        yield written
        yield dropped
        deliveries = CounterMetricFamily(
            "dataplane_webhook_deliveries",
            "Webhook delivery attempts since start-up, by endpoint and result "
            "(delivered, failed: an attempt to be retried, dropped: given up).",
            labels=["endpoint", "result"],
        )
        backlog = GaugeMetricFamily(
            "dataplane_webhook_outbox_depth",
            "Events recorded but not yet delivered, by endpoint.",
            labels=["endpoint"],
        )
        for hook in snap.webhooks:
            deliveries.add_metric([hook.endpoint, "delivered"], hook.delivered)
            deliveries.add_metric([hook.endpoint, "failed"], hook.failed)
            deliveries.add_metric([hook.endpoint, "dropped"], hook.dropped)
            backlog.add_metric([hook.endpoint], hook.backlog)
        yield deliveries
        yield backlog
        if snap.pools:
            allocated = GaugeMetricFamily(
                "dataplane_resource_allocated",
                "What instances, images and volumes hold (vCPUs for cpu, else bytes).",
                labels=["resource"],
            )
            limit = GaugeMetricFamily(
                "dataplane_resource_effective_limit",
                "Capacity times the oversubscription ratio (vCPUs for cpu, else bytes).",
                labels=["resource"],
            )
            for kind in ResourceKind:
                held, most = snap.pools[kind.value]
                allocated.add_metric([kind.value], held)
                limit.add_metric([kind.value], most)
            yield allocated
            yield limit


def render(metrics: Metrics, snap: Snapshot) -> bytes:
    """The Prometheus text exposition of both registries (blocking: /proc reads)."""
    vmms = (vmm_usage(i, pid) for i, pid in snap.vmm_pids.items())
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(_SnapshotCollector(snap, (usage for usage in vmms if usage is not None)))
    return generate_latest(metrics.registry) + generate_latest(scraped)


async def exposition(runtime: Runtime) -> bytes:
    """``GET /metrics``'s body."""
    snap = await snapshot(runtime)
    return await anyio.to_thread.run_sync(render, runtime.metrics, snap)
