"""What an instance holds of the node, and what booting it asks for (the resource manager admits).

vCPUs and memory are held while a VMM runs (or a restart of the program is due, which boots
one without asking); memory counts at ``memory_max_mb`` when that is set, as the guest may grow
to it. The overlay counts at its provisioned size for as long as the instance exists: a sparse
file may fill up to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from managers.instances.types import InstanceRecord
from managers.resources import Allocation, Demand, NetworkHold

if TYPE_CHECKING:
    from managers.instances.context import Context, Live


def boot_demand(record: InstanceRecord) -> Demand:
    """What the instance holds once its VMM runs."""
    memory_mb = max(record.memory_mb, record.memory_max_mb or 0)
    return Demand(record.vcpus, memory_mb << 20, record.overlay_size_mb << 20)


def held(record: InstanceRecord, live: Live | None) -> Demand:
    running = record.restart_pending or (
        live is not None
        and (live.vmm is not None or live.unreachable is not None or live.restart_at is not None)
    )
    if running:
        return boot_demand(record)
    return Demand(disk_bytes=record.overlay_size_mb << 20)


def held_by_all(ctx: Context) -> dict[str, Demand]:
    """What every instance holds now."""
    return {
        instance_id: held(record, ctx.live.get(instance_id))
        for instance_id, record in list(ctx.records.items())
    }


def allocations(ctx: Context) -> list[Allocation]:
    """Every instance's allocation, oldest first."""
    records = sorted(ctx.records.values(), key=lambda record: (record.created_at, record.id))
    return [
        Allocation(
            record.id,
            record.name,
            held(record, ctx.live.get(record.id)),
            _network_hold(record, ctx.live.get(record.id)),
        )
        for record in records
    ]


def _network_hold(record: InstanceRecord, live: Live | None) -> NetworkHold | None:
    """The instance's limits while its TAP exists (its VMM runs)."""
    if not record.network.enabled or live is None or live.vmm is None:
        return None
    limits = record.network.bandwidth
    return NetworkHold(limits.ingress_mbps, limits.egress_mbps)
