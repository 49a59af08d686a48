"""Netlink work on links: the bridge, TAP devices, bridge ports. One AsyncIPRoute, one lock.

pyroute2's async API is used because its synchronous ``IPRoute`` fails inside a running event
loop. Requests are serialised by a lock: multi-step sequences (create, attach, bring up) then
never interleave with a concurrent delete of the same name, and the socket sees one request at a
time.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import anyio
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from managers.network import shaping
from managers.network.errors import BridgeConflict, NetlinkFailure, ShapingError, TapError
from managers.network.types import Bandwidth

# IFF_UP from <linux/if.h>: the administrative "up" flag.
IFF_UP = 0x1
# RTN_LOCAL from <linux/rtnetlink.h>: a route to one of the host's own addresses.
_RTN_LOCAL = 2


@dataclass(frozen=True, slots=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    flags: int
    master: int | None


class Links:
    def __init__(self) -> None:
        self._ipr: Any = None
        self._lock = anyio.Lock()

    async def _route(self) -> Any:
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
        return self._ipr

    async def close(self) -> None:
        async with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    # -- queries --------------------------------------------------------------------------
    async def find(self, name: str) -> LinkInfo | None:
        async with self._lock:
            return await self._find(name)

    async def list_links(self) -> list[LinkInfo]:
        async with self._lock:
            ipr = await self._route()
            return [_link_info(message) async for message in await ipr.link("dump")]

    async def is_local(self, address: IPv4Address) -> bool:
        """Whether the kernel delivers packets for ``address`` to this host (a route of type
        ``local``: one of its addresses; not a broadcast, not a neighbour)."""
        async with self._lock:
            ipr = await self._route()
            try:
                routes = await ipr.route("get", dst=str(address))
            except NetlinkError:
                return False  # no route at all
            return any(route["type"] == _RTN_LOCAL for route in routes)

    # -- the bridge -----------------------------------------------------------------------
    async def ensure_bridge(self, name: str, gateway: IPv4Interface, mac: str) -> int:
        """Create the bridge with ``gateway`` on it, or adopt an existing one that matches.

        Returns the bridge's interface index. A link of that name that is not a bridge, or a
        bridge carrying any other IPv4 address, is a :class:`BridgeConflict` and is left as
        found. A bridge we created is removed again if configuring it fails.
        """
        async with self._lock:
            ipr = await self._route()
            existing = await self._find(name)
            if existing is None:
                return await self._create_bridge(ipr, name, gateway, mac)
            if existing.kind != "bridge":
                raise BridgeConflict(
                    f"link {name!r} exists but is a {existing.kind or 'plain'} device, "
                    "not a bridge; remove it or choose another BRIDGE_NAME"
                )
            found = await self._ipv4_addresses(ipr, existing.index)
            if found and found != {gateway}:
                listed = ", ".join(sorted(str(address) for address in found))
                raise BridgeConflict(
                    f"bridge {name!r} already carries {listed}, not {gateway}; refusing to "
                    "change it: fix the bridge or SUBNET_GATEWAY/SUBNET_CIDR"
                )
            try:
                if not found:
                    await ipr.addr(
                        "add",
                        index=existing.index,
                        address=str(gateway.ip),
                        prefixlen=gateway.network.prefixlen,
                    )
                await ipr.link("set", index=existing.index, state="up")
            except NetlinkError as exc:
                raise NetlinkFailure(f"cannot configure bridge {name!r}: {exc}") from exc
            return existing.index

    async def _create_bridge(self, ipr: Any, name: str, gateway: IPv4Interface, mac: str) -> int:
        try:
            await ipr.link("add", ifname=name, kind="bridge", address=mac)
        except NetlinkError as exc:
            raise NetlinkFailure(f"cannot create bridge {name!r}: {exc}") from exc
        try:
            index = _index_of(await ipr.link_lookup(ifname=name), name)
            await ipr.addr(
                "add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen
            )
            await ipr.link("set", index=index, state="up")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await _remove_after_failure(ipr, name, exc)
            if isinstance(exc, NetlinkError):
                raise NetlinkFailure(f"cannot configure new bridge {name!r}: {exc}") from exc
            raise
        return index

    # -- TAP devices ----------------------------------------------------------------------
    async def create_tap(
        self, name: str, bridge_index: int, *, isolated: bool, multi_queue: bool
    ) -> int:
        """A persistent TAP suited to virtio-net, attached to the bridge and up.

        An existing link of that name is replaced: the name is derived from the instance id,
        so it can only be a leftover of the same instance. If any step after creation fails the
        TAP is deleted, so a failure never leaves a half-made device behind.
        """
        async with self._lock:
            ipr = await self._route()
            try:
                await _delete_if_present(ipr, name)
            except NetlinkError as exc:
                raise TapError(f"cannot replace the existing link {name!r}: {exc}") from exc
            flags = {"no_pi": True, "vnet_hdr": True, "multi_queue": multi_queue}
            try:
                await ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=flags)
            except (NetlinkError, OSError) as exc:
                raise TapError(f"cannot create TAP {name!r}: {exc}") from exc
            try:
                index = _index_of(await ipr.link_lookup(ifname=name), name)
                await ipr.link("set", index=index, master=bridge_index)
                await ipr.brport("set", index=index, isolated=1 if isolated else 0)
                await ipr.link("set", index=index, state="up")
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await _remove_after_failure(ipr, name, exc)
                if isinstance(exc, NetlinkError | NetlinkFailure):
                    raise TapError(
                        f"cannot attach TAP {name!r} to the bridge (index {bridge_index}): {exc}"
                    ) from exc
                raise
            return index

    async def shape(self, tap: str, ifb: str, bandwidth: Bandwidth) -> None:
        """Make the TAP (and its IFB) enforce ``bandwidth``; see ``shaping.py``."""
        async with self._lock:
            ipr = await self._route()
            index = _index_of(await ipr.link_lookup(ifname=tap), tap)
            try:
                await shaping.apply(ipr, index, ifb, bandwidth)
            except (NetlinkError, OSError) as exc:
                raise ShapingError(
                    f"cannot apply bandwidth limits {bandwidth.to_json()} to {tap}: {exc}"
                ) from exc

    async def delete(self, name: str) -> bool:
        """Delete the link if present; ``False`` when there was nothing to delete."""
        async with self._lock:
            ipr = await self._route()
            try:
                indices = await ipr.link_lookup(ifname=name)
                if not indices:
                    return False
                await ipr.link("del", index=indices[0])
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise TapError(f"cannot delete link {name!r}: {exc}") from exc
            return True

    # -- helpers --------------------------------------------------------------------------
    async def _find(self, name: str) -> LinkInfo | None:
        ipr = await self._route()
        indices = await ipr.link_lookup(ifname=name)
        if not indices:
            return None
        try:
            messages = await ipr.link("get", index=indices[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise NetlinkFailure(f"cannot read link {name!r}: {exc}") from exc
        return _link_info(messages[0])

    @staticmethod
    async def _ipv4_addresses(ipr: Any, index: int) -> set[IPv4Interface]:
        found: set[IPv4Interface] = set()
        async for message in await ipr.addr("dump", family=socket.AF_INET):
            if message["index"] == index:
                found.add(IPv4Interface(f"{message.get('IFA_ADDRESS')}/{message['prefixlen']}"))
        return found


def _link_info(message: Any) -> LinkInfo:
    kind = message.get(("linkinfo", "kind"))
    master = message.get("IFLA_MASTER")
    return LinkInfo(
        index=int(message["index"]),
        name=str(message.get("ifname")),
        kind=str(kind) if kind is not None else None,
        flags=int(message["flags"]),
        master=int(master) if master is not None else None,
    )


def _index_of(indices: list[int], name: str) -> int:
    if not indices:
        raise NetlinkFailure(f"link {name!r} vanished right after it was created")
    return int(indices[0])


async def _delete_if_present(ipr: Any, name: str) -> None:
    indices = await ipr.link_lookup(ifname=name)
    if indices:
        await ipr.link("del", index=indices[0])


async def _remove_after_failure(ipr: Any, name: str, cause: BaseException) -> None:
    """Undo a half-made link; if even that fails, say so on the error being raised."""
    try:
        await _delete_if_present(ipr, name)
    except NetlinkError as exc:
        cause.add_note(f"cleanup also failed: link {name!r} could not be removed: {exc}")
