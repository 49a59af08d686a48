"""Value types of the network subsystem: settings, an instance's allocation, the guest's config."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    ip_interface,
)
from typing import Any

from managers.network.errors import InvalidAllocation, NetworkConfigError

#: Every TAP this manager creates starts with this; start-up only ever removes TAPs named so.
TAP_PREFIX = "dp-"
#: Every IFB device (the shaper of what an instance sends) starts with this; start-up only ever
#: removes IFBs named so. ``dpb-`` does not start with ``dp-``, so the two never mix.
IFB_PREFIX = "dpb-"
#: Linux interface names hold at most 15 characters (IFNAMSIZ - 1).
IFNAME_MAX = 15

DEFAULT_SUBNET = IPv4Network("192.168.100.0/24")
DEFAULT_GATEWAY = IPv4Address("192.168.100.1")
DEFAULT_DNS = IPv4Address("1.1.1.1")

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """What the operator configures; validated on construction so a bad value changes nothing.

    ``nat`` installs outbound masquerading for the subnet; ``isolation`` sets the bridge port
    ``isolated`` flag on every TAP, so instances reach the gateway but not each other.
    """

    bridge_name: str = "vmbr0"
    subnet: IPv4Network = DEFAULT_SUBNET
    gateway: IPv4Address = DEFAULT_GATEWAY
    dns_server: IPv4Address | IPv6Address = DEFAULT_DNS
    nat: bool = True
    isolation: bool = True

    def __post_init__(self) -> None:
        if not _IFNAME.fullmatch(self.bridge_name):
            raise NetworkConfigError(
                f"BRIDGE_NAME {self.bridge_name!r} is not a valid interface name "
                f"(1-{IFNAME_MAX} of letters, digits, '_', '.', '-')"
            )
        if self.bridge_name.startswith(TAP_PREFIX):
            raise NetworkConfigError(
                f"BRIDGE_NAME {self.bridge_name!r} must not start with {TAP_PREFIX!r}, "
                "the prefix of instance TAPs"
            )
        if self.subnet.prefixlen > 30:
            raise NetworkConfigError(
                f"SUBNET_CIDR {self.subnet} is too small: a /30 or larger leaves room for "
                "a gateway and at least one instance"
            )
        if self.gateway not in self.subnet:
            raise NetworkConfigError(
                f"SUBNET_GATEWAY {self.gateway} is not inside SUBNET_CIDR {self.subnet}"
            )
        if self.gateway in (self.subnet.network_address, self.subnet.broadcast_address):
            raise NetworkConfigError(
                f"SUBNET_GATEWAY {self.gateway} is the network or broadcast address of "
                f"{self.subnet}"
            )


@dataclass(frozen=True, slots=True)
class Allocation:
    """An instance's place on the subnet; stored in the instance's metadata, nowhere else.

    ``address`` carries the subnet prefix (``192.168.100.2/24``); ``mac`` is the guest NIC's
    MAC, derived from the address.
    """

    address: IPv4Interface
    mac: str

    def to_dict(self) -> dict[str, str]:
        return {"address": str(self.address), "mac": self.mac}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        """Rebuild an allocation read back from metadata; malformed data is an
        :class:`InvalidAllocation`."""
        address_text = data.get("address")
        mac = data.get("mac")
        if not isinstance(address_text, str) or not isinstance(mac, str):
            raise InvalidAllocation(f"allocation needs string 'address' and 'mac', got {data!r}")
        try:
            address = ip_interface(address_text)
        except ValueError as exc:
            raise InvalidAllocation(f"allocation address {address_text!r} is invalid") from exc
        if not isinstance(address, IPv4Interface) or "/" not in address_text:
            raise InvalidAllocation(
                f"allocation address {address_text!r} must be IPv4 with a prefix length"
            )
        if not _MAC.fullmatch(mac):
            raise InvalidAllocation(f"allocation MAC {mac!r} is not of the form aa:bb:cc:dd:ee:ff")
        return cls(address=address, mac=mac)


@dataclass(frozen=True, slots=True)
class GuestNetwork:
    """What the guest's init needs to configure its NIC, written to the config disk."""

    address: IPv4Interface
    gateway: IPv4Address
    dns: IPv4Address | IPv6Address
    mac: str

    def to_dict(self) -> dict[str, str]:
        return {
            "address": str(self.address),
            "gateway": str(self.gateway),
            "dns": str(self.dns),
            "mac": self.mac,
        }


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class Forward:
    """One host port forwarded to a guest port, by DNAT in our nftables table.

    ``listen`` is the host address it answers on; ``None`` means every local address
    (including 127.0.0.1, for connections made on the host itself). ``tag`` names the
    rule in its comment, so ``nft list`` shows whose it is.
    """

    tag: str
    protocol: Protocol
    listen: IPv4Address | None
    host_port: int
    target: IPv4Address
    guest_port: int


#: tbf keeps its rate in a 32-bit count of bytes a second: 34,359 Mbit/s at most.
MAX_MBPS = 32000


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """An instance's limits in Mbit/s, as the guest sees them: ``ingress_mbps`` what it
    receives, ``egress_mbps`` what it sends. ``None`` is no limit."""

    ingress_mbps: int | None = None
    egress_mbps: int | None = None

    def __post_init__(self) -> None:
        for name in ("ingress_mbps", "egress_mbps"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MBPS
            ):
                raise NetworkConfigError(
                    f"bandwidth {name} must be a whole number of Mbit/s from 1 to {MAX_MBPS}, "
                    f"not {value!r}"
                )

    @property
    def limited(self) -> bool:
        return self.ingress_mbps is not None or self.egress_mbps is not None

    def to_json(self) -> dict[str, int | None]:
        return {"ingress_mbps": self.ingress_mbps, "egress_mbps": self.egress_mbps}

    @classmethod
    def from_json(cls, data: object) -> Bandwidth:
        """Parse ``{"ingress_mbps"?: N|null, "egress_mbps"?: N|null}``; anything else is a
        :class:`NetworkConfigError` whose message says what is wrong."""
        if not isinstance(data, Mapping):
            raise NetworkConfigError("bandwidth must be an object")
        unknown = sorted(set(data) - {"ingress_mbps", "egress_mbps"})
        if unknown:
            raise NetworkConfigError(f"bandwidth has unknown field(s): {', '.join(unknown)}")
        return cls(data.get("ingress_mbps"), data.get("egress_mbps"))
