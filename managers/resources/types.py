"""Typed records of the resources subsystem: what a node has, what instances hold, what they ask."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ResourceKind(enum.StrEnum):
    CPU = "cpu"
    MEMORY = "memory"
    DISK = "disk"


# The variable that sets each kind's oversubscription ratio, named in refusals.
RATIO_VARIABLES = {
    ResourceKind.CPU: "CPU_OVERSUB_RATIO",
    ResourceKind.MEMORY: "MEMORY_OVERSUB_RATIO",
    ResourceKind.DISK: "DISK_OVERSUB_RATIO",
}


@dataclass(frozen=True, slots=True)
class Demand:
    """An amount of each kind: what an operation asks for, or what an instance holds."""

    vcpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    def of(self, kind: ResourceKind) -> int:
        if kind is ResourceKind.CPU:
            return self.vcpus
        if kind is ResourceKind.MEMORY:
            return self.memory_bytes
        return self.disk_bytes

    def __add__(self, other: Demand) -> Demand:
        return Demand(
            self.vcpus + other.vcpus,
            self.memory_bytes + other.memory_bytes,
            self.disk_bytes + other.disk_bytes,
        )

    def widest(self, other: Demand) -> Demand:
        """The larger of each kind: one instance seen both as it is and as an operation makes it."""
        return Demand(
            max(self.vcpus, other.vcpus),
            max(self.memory_bytes, other.memory_bytes),
            max(self.disk_bytes, other.disk_bytes),
        )


@dataclass(frozen=True, slots=True)
class Ratios:
    """Oversubscription: the effective limit of a kind is its capacity times its ratio."""

    cpu: float = 4.0
    memory: float = 1.0
    disk: float = 1.0

    def of(self, kind: ResourceKind) -> float:
        if kind is ResourceKind.CPU:
            return self.cpu
        if kind is ResourceKind.MEMORY:
            return self.memory
        return self.disk


@dataclass(frozen=True, slots=True)
class NetworkHold:
    """An instance's place on the node network while its TAP exists: its limits in Mbit/s
    (the guest's directions; ``None`` is no limit)."""

    ingress_mbps: int | None = None
    egress_mbps: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ingress_mbps": self.ingress_mbps, "egress_mbps": self.egress_mbps}


@dataclass(frozen=True, slots=True)
class Allocation:
    """What one instance holds: vCPUs, memory and (with a network) bandwidth while its VMM
    runs, its overlay always."""

    instance_id: str
    instance_name: str
    held: Demand
    network: NetworkHold | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "instance_name": self.instance_name,
            "vcpus": self.held.vcpus,
            "memory_bytes": self.held.memory_bytes,
            "disk_bytes": self.held.disk_bytes,
            "network": self.network.to_json() if self.network is not None else None,
        }


@dataclass(frozen=True, slots=True)
class NetworkTotals:
    """Bandwidth allocated on the node: the limits of instances whose TAP exists, summed, and
    how many such instances have no limit in a direction (which no sum can say)."""

    ingress_mbps: int = 0
    egress_mbps: int = 0
    unlimited_ingress: int = 0
    unlimited_egress: int = 0

    @classmethod
    def of(cls, holds: Sequence[NetworkHold]) -> NetworkTotals:
        return cls(
            ingress_mbps=sum(h.ingress_mbps or 0 for h in holds),
            egress_mbps=sum(h.egress_mbps or 0 for h in holds),
            unlimited_ingress=sum(h.ingress_mbps is None for h in holds),
            unlimited_egress=sum(h.egress_mbps is None for h in holds),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ingress_mbps": self.ingress_mbps,
            "egress_mbps": self.egress_mbps,
            "unlimited_ingress": self.unlimited_ingress,
            "unlimited_egress": self.unlimited_egress,
        }


@dataclass(frozen=True, slots=True)
class Pool:
    """One kind as ``GET /resources`` shows it."""

    kind: ResourceKind
    capacity: int
    effective_limit: int
    allocated: int
    oversub_ratio: float

    @property
    def available(self) -> int:
        return max(0, self.effective_limit - self.allocated)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind.value,
            "capacity": self.capacity,
            "effective_limit": self.effective_limit,
            "allocated": self.allocated,
            "available": self.available,
            "oversub_ratio": self.oversub_ratio,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """What the host uses right now, whoever uses it."""

    cpu_percent: float | None
    cpu_interval_seconds: float | None
    memory_used_bytes: int
    disk_used_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_percent": self.cpu_percent,
            "cpu_interval_seconds": self.cpu_interval_seconds,
            "memory_used_bytes": self.memory_used_bytes,
            "disk_used_bytes": self.disk_used_bytes,
        }


@dataclass(frozen=True, slots=True)
class DiskBreakdown:
    """Where the disk allocation comes from."""

    images_bytes: int
    volumes_bytes: int
    overlays_bytes: int

    @property
    def total(self) -> int:
        return self.images_bytes + self.volumes_bytes + self.overlays_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "images_bytes": self.images_bytes,
            "volumes_bytes": self.volumes_bytes,
            "overlays_bytes": self.overlays_bytes,
        }


@dataclass(frozen=True, slots=True)
class ResourceReport:
    cpu: Pool
    memory: Pool
    disk: Pool
    disk_breakdown: DiskBreakdown
    allocations: tuple[Allocation, ...]
    usage: Usage
    network: NetworkTotals = NetworkTotals()

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu.to_json(),
            "memory": self.memory.to_json(),
            "disk": self.disk.to_json(),
            "disk_breakdown": self.disk_breakdown.to_json(),
            "network": self.network.to_json(),
            "allocations": [allocation.to_json() for allocation in self.allocations],
            "usage": self.usage.to_json(),
        }
