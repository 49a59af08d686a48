"""Address allocation: the instances' metadata is the record, this only closes the race window."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, ip_interface

import anyio

from managers.network.addressing import first_free, mac_for
from managers.network.errors import InvalidAllocation
from managers.network.types import Allocation, NetworkSettings


class AddressAllocator:
    """Hands out addresses from the subnet, never the same one twice at once.

    There is no allocation file: the caller passes the addresses its instance metadata holds
    (``taken``). Between handing out an address and the caller writing its metadata, that
    address lives only here, in ``_reserved``. A reservation is kept until :meth:`release`
    (instance deleted or creation abandoned) rather than dropped when the metadata is written:
    a concurrent caller may have read its ``taken`` snapshot *before* that write, and the
    reservation is what still protects the address from that stale snapshot. A restart empties
    the reservations, and by then every allocation is in some metadata file.
    """

    def __init__(self, settings: NetworkSettings) -> None:
        self._settings = settings
        self._lock = anyio.Lock()
        self._reserved: dict[str, Allocation] = {}

    async def allocate(
        self, instance_id: str, taken: Iterable[IPv4Address | IPv4Interface | str]
    ) -> Allocation:
        async with self._lock:
            existing = self._reserved.get(instance_id)
            if existing is not None:
                return existing
            used = {_as_address(item) for item in taken}
            used.update(allocation.address.ip for allocation in self._reserved.values())
            address = first_free(self._settings.subnet, self._settings.gateway, used)
            allocation = Allocation(
                address=IPv4Interface(f"{address}/{self._settings.subnet.prefixlen}"),
                mac=mac_for(address),
            )
            self._reserved[instance_id] = allocation
            return allocation

    async def release(self, instance_id: str) -> None:
        async with self._lock:
            self._reserved.pop(instance_id, None)


def _as_address(item: IPv4Address | IPv4Interface | str) -> IPv4Address:
    # IPv4Interface subclasses IPv4Address, so it must be tested first.
    if isinstance(item, IPv4Interface):
        return item.ip
    if isinstance(item, IPv4Address):
        return item
    try:
        parsed = ip_interface(item)
    except ValueError as exc:
        raise InvalidAllocation(f"taken address {item!r} is not an IPv4 address") from exc
    if not isinstance(parsed, IPv4Interface):
        raise InvalidAllocation(f"taken address {item!r} is not an IPv4 address")
    return parsed.ip
