"""Resources: the node's capacity, oversubscription limits, usage and admission. See README.md."""

from __future__ import annotations

from .errors import InsufficientResources, ResourceError
from .manager import DiskOutside, ResourceManager
from .types import (
    Allocation,
    Demand,
    DiskBreakdown,
    NetworkHold,
    NetworkTotals,
    Pool,
    Ratios,
    ResourceKind,
    ResourceReport,
    Usage,
)

__all__ = [
    "Allocation",
    "Demand",
    "DiskBreakdown",
    "DiskOutside",
    "InsufficientResources",
    "NetworkHold",
    "NetworkTotals",
    "Pool",
    "Ratios",
    "ResourceError",
    "ResourceKind",
    "ResourceManager",
    "ResourceReport",
    "Usage",
]
