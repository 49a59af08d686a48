"""Host networking for instances: bridge, outbound NAT, addresses and MACs, TAP devices."""

from managers.network.errors import (
    AddressExhausted,
    BridgeConflict,
    InvalidAllocation,
    NatError,
    NetlinkFailure,
    NetworkConfigError,
    NetworkError,
    ShapingError,
    TapError,
)
from managers.network.manager import NetworkManager
from managers.network.types import (
    TAP_PREFIX,
    Allocation,
    Bandwidth,
    Forward,
    GuestNetwork,
    NetworkSettings,
    Protocol,
)

__all__ = [
    "TAP_PREFIX",
    "AddressExhausted",
    "Allocation",
    "Bandwidth",
    "BridgeConflict",
    "Forward",
    "GuestNetwork",
    "InvalidAllocation",
    "NatError",
    "NetlinkFailure",
    "NetworkConfigError",
    "NetworkError",
    "NetworkManager",
    "NetworkSettings",
    "Protocol",
    "ShapingError",
    "TapError",
]
