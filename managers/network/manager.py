"""The network manager: the one object the instances manager talks to."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from managers.network import nat
from managers.network.addressing import mac_for, reserved_addresses, tap_name
from managers.network.allocator import AddressAllocator
from managers.network.errors import InvalidAllocation, NetworkError, TapError
from managers.network.links import Links
from managers.network.types import TAP_PREFIX, Allocation, GuestNetwork, NetworkSettings


class NetworkManager:
    """Bridge, NAT, addresses and TAP devices for the instances of one host.

    Lifecycle as the instances manager drives it::

        await net.start(known_instance_ids)          # once: on first use, or at service start
                                                     # when the bridge already exists
        alloc = await net.allocate(iid, taken)       # create: pick address + MAC
        ... record alloc's address and MAC in the instance metadata ...
        tap = await net.create_tap(iid, alloc)       # create / start / restore: TAP for the VMM
        await net.delete_tap(iid)                    # standby / stop / delete: TAP gone
        await net.release(iid)                       # delete (or failed create): address free
        await net.close()                            # service stop: netlink socket closed;
                                                     # bridge, NAT and TAPs stay

    The bridge, the NAT table and live TAPs outlive the service on purpose: VMMs keep running
    across a restart of the agent, and their TAPs with them.
    """

    def __init__(self, settings: NetworkSettings) -> None:
        self._settings = settings
        self._links = Links()
        self._allocator = AddressAllocator(settings)
        self._bridge_index: int | None = None

    @property
    def settings(self) -> NetworkSettings:
        """The bridge, subnet, gateway, DNS, NAT and isolation settings this manager applies."""
        return self._settings

    @staticmethod
    def tap_name(instance_id: str) -> str:
        """The TAP name of an instance (``dp-`` + 12 hex digits), for the VMM's command line."""
        return tap_name(instance_id)

    async def start(self, known_instance_ids: Iterable[str]) -> list[str]:
        """Create or adopt the bridge, install or remove NAT, delete orphan TAPs.

        ``known_instance_ids`` are the instances that exist on disk; any TAP carrying our prefix
        whose name matches none of them was left by a crash (e.g. between TAP creation and the
        metadata write) and is deleted. Returns the names of the TAPs removed. A bridge conflict
        is raised before anything is changed.
        """
        settings = self._settings
        gateway = IPv4Interface(f"{settings.gateway}/{settings.subnet.prefixlen}")
        self._bridge_index = await self._links.ensure_bridge(
            settings.bridge_name, gateway, mac_for(settings.gateway)
        )
        if settings.nat:
            await nat.install(settings.subnet, settings.bridge_name)
        else:
            await nat.remove()
        return await self._remove_orphans({tap_name(iid) for iid in known_instance_ids})

    async def allocate(
        self, instance_id: str, taken: Iterable[IPv4Address | IPv4Interface | str]
    ) -> Allocation:
        """An address and MAC for ``instance_id``, avoiding ``taken`` (the addresses in the other
        instances' metadata) and every reservation made since start. Calling it again for the
        same id returns the same allocation. Raises :class:`AddressExhausted` when full."""
        return await self._allocator.allocate(instance_id, taken)

    async def release(self, instance_id: str) -> None:
        """Forget the reservation of a deleted instance (or of a create that failed)."""
        await self._allocator.release(instance_id)

    async def create_tap(
        self, instance_id: str, allocation: Allocation, *, queue_pairs: int = 1
    ) -> str:
        """Create the instance's TAP, attached to the bridge, up, isolated if configured.

        ``queue_pairs`` must match the VMM's virtio-net queue pairs: more than one makes a
        multi-queue TAP. Any leftover link with the same name is replaced. Returns the name.
        """
        if self._bridge_index is None:
            raise NetworkError("the network manager is not started: call start() first")
        self._check(allocation)
        if queue_pairs < 1:
            raise TapError(f"queue_pairs must be at least 1, got {queue_pairs}")
        name = tap_name(instance_id)
        await self._links.create_tap(
            name,
            self._bridge_index,
            isolated=self._settings.isolation,
            multi_queue=queue_pairs > 1,
        )
        return name

    async def delete_tap(self, instance_id: str) -> None:
        """Remove the instance's TAP; doing so when it is already gone is not an error."""
        await self._links.delete(tap_name(instance_id))

    def bridge_exists(self) -> bool:
        """Whether the host bridge is there already (made by an earlier run)."""
        return Path("/sys/class/net", self._settings.bridge_name, "bridge").is_dir()

    def guest_network(self, allocation: Allocation) -> GuestNetwork:
        """What the guest's init configures, to be written to the instance's config disk."""
        self._check(allocation)
        return GuestNetwork(
            address=allocation.address,
            gateway=self._settings.gateway,
            dns=self._settings.dns_server,
            mac=allocation.mac,
        )

    async def close(self) -> None:
        """Close the netlink socket; the bridge, the NAT table and the TAPs stay."""
        await self._links.close()

    async def _remove_orphans(self, expected: set[str]) -> list[str]:
        removed: list[str] = []
        for link in await self._links.list_links():
            # Only TAP devices ("tun" kind) with our prefix are ours; anything else is left be.
            if link.kind != "tun" or not link.name.startswith(TAP_PREFIX):
                continue
            if link.name in expected:
                continue
            if await self._links.delete(link.name):
                removed.append(link.name)
        return removed

    def _check(self, allocation: Allocation) -> None:
        subnet = self._settings.subnet
        if allocation.address.network != subnet:
            raise InvalidAllocation(
                f"allocation {allocation.address} does not belong to subnet {subnet}"
            )
        if allocation.address.ip in reserved_addresses(subnet, self._settings.gateway):
            raise InvalidAllocation(
                f"allocation {allocation.address} is the network, gateway or broadcast address"
            )
