"""The network manager: the one object the instances manager talks to."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import anyio

from managers.network import flows, table
from managers.network.addressing import ifb_name, mac_for, reserved_addresses, tap_name
from managers.network.allocator import AddressAllocator
from managers.network.errors import InvalidAllocation, NetworkError, TapError
from managers.network.links import Links
from managers.network.types import (
    IFB_PREFIX,
    TAP_PREFIX,
    Allocation,
    Bandwidth,
    Forward,
    GuestNetwork,
    NetworkSettings,
)

log = logging.getLogger(__name__)


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

    The bridge, our nftables table and live TAPs outlive the service on purpose: VMMs keep running
    across a restart of the agent, and their TAPs with them.
    """

    def __init__(self, settings: NetworkSettings) -> None:
        self._settings = settings
        self._links = Links()
        self._allocator = AddressAllocator(settings)
        self._bridge_index: int | None = None
        self._forwards: tuple[Forward, ...] = ()
        # Whether the table this process installed last holds forwards: then an empty publish
        # must still rewrite it, network started or not.
        self._table_forwards = False
        self._table_lock = anyio.Lock()

    @property
    def settings(self) -> NetworkSettings:
        """The bridge, subnet, gateway, DNS, NAT and isolation settings this manager applies."""
        return self._settings

    @staticmethod
    def tap_name(instance_id: str) -> str:
        """The TAP name of an instance (``dp-`` + 12 hex digits), for the VMM's command line."""
        return tap_name(instance_id)

    async def start(self, known_instance_ids: Iterable[str]) -> list[str]:
        """Create or adopt the bridge, install our nftables table (NAT as configured, the
        forwards last published) or remove it, delete orphan TAPs and IFBs.

        ``known_instance_ids`` are the instances that exist on disk; any TAP or IFB carrying
        our prefix whose name matches none of them was left by a crash (e.g. between TAP
        creation and the metadata write) and is deleted. Returns the names of the links
        removed. A bridge conflict is raised before anything is changed.
        """
        settings = self._settings
        gateway = IPv4Interface(f"{settings.gateway}/{settings.subnet.prefixlen}")
        self._bridge_index = await self._links.ensure_bridge(
            settings.bridge_name, gateway, mac_for(settings.gateway)
        )
        async with self._table_lock:
            await self._install(self._forwards)
        known = list(known_instance_ids)
        return await self._remove_orphans(
            {tap_name(iid) for iid in known} | {ifb_name(iid) for iid in known}
        )

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
        self,
        instance_id: str,
        allocation: Allocation,
        *,
        queue_pairs: int = 1,
        bandwidth: Bandwidth | None = None,
    ) -> str:
        """Create the instance's TAP, attached to the bridge, up, isolated if configured, and
        limited to ``bandwidth``.

        ``queue_pairs`` must match the VMM's virtio-net queue pairs: more than one makes a
        multi-queue TAP. Any leftover link with the same name is replaced. A limit that
        cannot be applied removes the TAP again. Returns the name.
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
        if bandwidth is not None and bandwidth.limited:
            try:
                await self._links.shape(name, ifb_name(instance_id), bandwidth)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.delete_tap(instance_id)
                raise
        return name

    async def shape(self, instance_id: str, bandwidth: Bandwidth) -> None:
        """Limit a running instance's TAP to ``bandwidth`` (no limit lifts one)."""
        await self._links.shape(tap_name(instance_id), ifb_name(instance_id), bandwidth)

    async def publish(self, forwards: Sequence[Forward]) -> None:
        """Make the table forward exactly ``forwards`` (one nft transaction, NAT kept), and
        forget the flows the change redirects (``flows.py``)."""
        new = tuple(forwards)
        async with self._table_lock:
            old = self._forwards
            # Before the network's first use there is nothing of ours to change unless there
            # is something to forward: a node that never asks for a network is never touched.
            if self._bridge_index is not None or new or self._table_forwards:
                await self._install(new)
            self._forwards = new
        removed = [f for f in old if f not in new]
        added = [f for f in new if f not in old]
        try:
            await flows.forget(removed, added)
        except Exception as error:
            # The rules are right; flows already under way just keep their old fate.
            log.warning("could not forget the conntrack entries of changed forwards: %s", error)

    async def _install(self, forwards: tuple[Forward, ...]) -> None:
        """Under the table lock."""
        settings = self._settings
        await table.install(
            settings.subnet, settings.bridge_name, nat=settings.nat, forwards=forwards
        )
        self._table_forwards = bool(forwards)

    async def is_local(self, address: IPv4Address) -> bool:
        """Whether ``address`` is one of this host's (what a forward may listen on)."""
        return await self._links.is_local(address)

    async def delete_tap(self, instance_id: str) -> None:
        """Remove the instance's TAP (its qdiscs go with it) and its IFB; doing so when they
        are already gone is not an error."""
        await self._links.delete(tap_name(instance_id))
        await self._links.delete(ifb_name(instance_id))

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
        """Close the netlink socket; the bridge, our nftables table and the TAPs stay."""
        await self._links.close()

    async def _remove_orphans(self, expected: set[str]) -> list[str]:
        removed: list[str] = []
        for link in await self._links.list_links():
            # Only TAP devices ("tun" kind) and IFBs with our prefixes are ours; anything else
            # is left be.
            ours = (link.kind == "tun" and link.name.startswith(TAP_PREFIX)) or (
                link.kind == "ifb" and link.name.startswith(IFB_PREFIX)
            )
            if not ours:
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
