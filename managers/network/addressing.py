"""Pure naming and addressing rules: TAP names, MACs, the usable part of the subnet."""

from __future__ import annotations

import hashlib
from collections.abc import Set
from ipaddress import IPv4Address, IPv4Network

from managers.network.errors import AddressExhausted
from managers.network.types import IFB_PREFIX, IFNAME_MAX, TAP_PREFIX

_TAP_HASH_CHARS = IFNAME_MAX - len(TAP_PREFIX)
_IFB_HASH_CHARS = IFNAME_MAX - len(IFB_PREFIX)


def tap_name(instance_id: str) -> str:
    """``dp-`` plus 12 hex digits of the id's SHA-256.

    A hash rather than a slice of the id: ids may be longer than 12 characters, share a prefix
    (time-ordered ids do) or hold characters an interface name cannot; 48 bits make a collision
    between two live instances negligible. The same id always gives the same name, which is what
    lets restore recreate the TAP and start-up recognise orphans.
    """
    digest = hashlib.sha256(instance_id.encode()).hexdigest()
    return TAP_PREFIX + digest[:_TAP_HASH_CHARS]


def ifb_name(instance_id: str) -> str:
    """``dpb-`` plus 11 hex digits of the id's SHA-256: the device that shapes what the
    instance sends (its TAP's ingress is redirected there), named like the TAP for the same
    reasons."""
    digest = hashlib.sha256(instance_id.encode()).hexdigest()
    return IFB_PREFIX + digest[:_IFB_HASH_CHARS]


def mac_for(address: IPv4Address) -> str:
    """``02:00`` followed by the four address bytes.

    ``02`` sets the locally-administered bit and leaves the multicast bit clear; embedding the
    whole address makes the MAC unique per address and stable across standby/restore.
    """
    octets = (0x02, 0x00, *address.packed)
    return ":".join(f"{octet:02x}" for octet in octets)


def reserved_addresses(subnet: IPv4Network, gateway: IPv4Address) -> frozenset[IPv4Address]:
    return frozenset({subnet.network_address, subnet.broadcast_address, gateway})


def usable_count(subnet: IPv4Network, gateway: IPv4Address) -> int:
    return subnet.num_addresses - len(reserved_addresses(subnet, gateway))


def first_free(subnet: IPv4Network, gateway: IPv4Address, used: Set[IPv4Address]) -> IPv4Address:
    """The lowest usable address of ``subnet`` not in ``used``.

    The scan stops at the first gap, so it costs at most ``len(used) + 3`` steps even in a
    large subnet; exhaustion is decided by counting first, without scanning.
    """
    excluded = reserved_addresses(subnet, gateway)
    in_subnet = {address for address in used if address in subnet} - excluded
    if len(in_subnet) >= usable_count(subnet, gateway):
        raise AddressExhausted(
            f"no free address in {subnet}: all {usable_count(subnet, gateway)} usable addresses "
            "are taken"
        )
    for address in subnet.hosts():
        if address not in excluded and address not in in_subnet:
            return address
    raise AddressExhausted(f"no free address in {subnet}")
