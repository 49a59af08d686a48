"""The network subsystem's exception tree.

Everything raised on purpose by :mod:`managers.network` is a :class:`NetworkError`, so the service
edge can map the whole family to HTTP in one place. Each class's ``code`` (a
:class:`~managers.errors.DomainError` attribute) is the error code the API returns; a class
without one of its own answers with its parent's, ``network_error``::

    NetworkError
    ├── NetworkConfigError   bad settings (bridge name, subnet, gateway, DNS, flags)
    ├── BridgeConflict       an existing link named like our bridge is not ours to adopt
    ├── AddressExhausted     no free address left in the subnet (addresses_exhausted)
    ├── InvalidAllocation    an allocation that does not fit the configured subnet
    ├── TapError             creating, attaching or deleting a TAP device failed
    ├── NatError             installing or removing our nftables table failed
    ├── ShapingError         a bandwidth limit could not be applied (tc)
    └── NetlinkFailure       any other netlink request the kernel refused
"""

from __future__ import annotations

from managers.errors import DomainError


class NetworkError(DomainError):
    """Base of every error raised on purpose by the network manager."""

    code = "network_error"


class NetworkConfigError(NetworkError):
    """A network setting is malformed or inconsistent; raised before anything is touched."""


class BridgeConflict(NetworkError):
    """A link with the bridge's name exists but is not a bridge, or carries another address.

    The manager never rewrites a link it did not create: the operator resolves the conflict.
    """


class AddressExhausted(NetworkError):
    """Every usable address of the subnet is taken or reserved."""

    code = "addresses_exhausted"


class InvalidAllocation(NetworkError):
    """An allocation (address or MAC) that does not belong to the configured subnet."""


class TapError(NetworkError):
    """A TAP device could not be created, attached to the bridge, configured or deleted."""


class NatError(NetworkError):
    """The nftables rules for outbound NAT could not be installed, inspected or removed."""


class ShapingError(NetworkError):
    """tc refused a qdisc, filter or IFB device that a bandwidth limit needs."""


class NetlinkFailure(NetworkError):
    """The kernel refused a netlink request outside the cases above (e.g. bridge creation)."""
