"""Host networking for instances: bridge, outbound NAT, addresses and MACs, TAP devices."""

from managers.network.errors import (
    AddressExhausted,
    BridgeConflict,
    InvalidAllocation,
    NatError,
    NetlinkFailure,
    NetworkConfigError,
    NetworkError,
    TapError,
)
from managers.network.manager import NetworkManager
from managers.network.types import TAP_PREFIX, Allocation, GuestNetwork, NetworkSettings

__all__ = [
    "TAP_PREFIX",
    "AddressExhausted",
    "Allocation",
    "BridgeConflict",
    "GuestNetwork",
    "InvalidAllocation",
    "NatError",
    "NetlinkFailure",
    "NetworkConfigError",
    "NetworkError",
    "NetworkManager",
    "NetworkSettings",
    "TapError",
]
