"""Conntrack entries of the flows a forward decided, forgotten when the forward changes.

NAT is decided on a flow's first packet and remembered in its conntrack entry. So removing a
DNAT rule does not stop the flows it already rewrote (a UDP stream that keeps sending never
times out, and would reach the next instance given the address), and adding one does not catch
flows that began before it (their entries say "not rewritten"). Deleting those entries makes
the next packet of each flow be decided anew, by the table as it now is.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from pyroute2 import AsyncConntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from managers.network.types import Forward, Protocol

_PROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}


async def forget(removed: Iterable[Forward], added: Iterable[Forward]) -> int:
    """Delete the entries of flows rewritten by ``removed`` and of flows to an ``added``
    forward's port that were not; return how many were deleted."""
    removed, added = list(removed), list(added)
    if not removed and not added:
        return 0
    deleted = 0
    ct = AsyncConntrack()
    try:
        for forward in removed:
            reply = NFCTAttrTuple(
                proto=_PROTO[forward.protocol], saddr=str(forward.target), sport=forward.guest_port
            )
            entries = [
                entry
                async for entry in await ct.dump_entries(tuple_reply=reply)
                if entry.tuple_orig.dport == forward.host_port
            ]
            for entry in entries:
                deleted += await _delete(ct, entry)
        for forward in added:
            orig = NFCTAttrTuple(proto=_PROTO[forward.protocol], dport=forward.host_port)
            entries = [
                entry
                async for entry in await ct.dump_entries(tuple_orig=orig)
                # Not rewritten: the reply would come from where the packet was sent.
                if entry.tuple_reply.saddr == entry.tuple_orig.daddr
                and (forward.listen is None or entry.tuple_orig.daddr == str(forward.listen))
            ]
            for entry in entries:
                deleted += await _delete(ct, entry)
    finally:
        ct.close()
    return deleted


async def _delete(ct: AsyncConntrack, entry: object) -> int:
    try:
        await ct.delete(entry)
    except (NetlinkError, OSError):
        return 0  # it ended on its own meanwhile
    return 1
