"""Bandwidth limits on an instance's TAP, with tc over netlink (pyroute2).

Directions are the guest's. What the guest *receives* leaves the host through the TAP, so a
token bucket (``tbf``) as the TAP's root qdisc shapes it. What the guest *sends* arrives on the
TAP, where Linux can only police (drop) or redirect; we redirect it, with an ``ingress`` qdisc
and a match-all ``u32`` filter whose ``mirred`` action sends every packet to an IFB device of
the instance's own, and shape it there with another ``tbf``. Shaping queues rather than drops,
so TCP settles at the limit instead of saw-toothing under it; and the kernels we run on have no
``act_police`` module at all (measured: "Failed to load TC action module"), while ``ifb`` and
``act_mirred`` are there.

Every function is idempotent: it brings the devices to what ``bandwidth`` says whatever they
held before, so the same call serves create, a change on a running instance and start-up.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import protocols
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import TC_H_ROOT

from managers.network.types import Bandwidth

#: The token bucket may run this long at line rate before the limit bites, and packets may
#: wait this long in the queue before they are dropped.
BURST_SECONDS = 0.01
LATENCY = "50ms"
MIN_BURST = 32 * 1024
ROOT = "1:"
INGRESS = "ffff:"
# u32 wants a class id even when the action decides where the packet goes.
_CLASSID = 0x10001


def burst_bytes(mbps: int) -> int:
    return max(MIN_BURST, int(mbps * 1_000_000 / 8 * BURST_SECONDS))


async def apply(ipr: Any, tap_index: int, ifb: str, bandwidth: Bandwidth) -> None:
    """Make ``tap_index`` (and the IFB named ``ifb``) enforce ``bandwidth``."""
    if bandwidth.ingress_mbps is not None:
        await _tbf(ipr, tap_index, bandwidth.ingress_mbps)
    else:
        await _ignore_absent(ipr.tc("del", index=tap_index, handle=ROOT, parent=TC_H_ROOT))
    if bandwidth.egress_mbps is not None:
        ifb_index = await _ensure_ifb(ipr, ifb)
        await _tbf(ipr, ifb_index, bandwidth.egress_mbps)
        # Made anew every time rather than trusted: a crash between the qdisc and its filter,
        # or an IFB made again (a new ifindex), would leave a redirect that limits nothing or
        # drops everything. What the guest sends in the moment between goes unshaped.
        await _ignore_absent(ipr.tc("del", "ingress", tap_index, handle=INGRESS))
        await ipr.tc("add", "ingress", tap_index, handle=INGRESS)
        await ipr.tc(
            "add-filter",
            "u32",
            tap_index,
            parent=INGRESS,
            prio=1,
            protocol=protocols.ETH_P_ALL,
            target=_CLASSID,
            keys=["0x0/0x0+0"],
            action={
                "kind": "mirred",
                "direction": "egress",
                "action": "redirect",
                "ifindex": ifb_index,
            },
        )
    else:
        await _ignore_absent(ipr.tc("del", "ingress", tap_index, handle=INGRESS))
        await remove_ifb(ipr, ifb)


async def remove_ifb(ipr: Any, ifb: str) -> None:
    indices = await ipr.link_lookup(ifname=ifb)
    if indices:
        await _ignore_absent(ipr.link("del", index=indices[0]))


async def _tbf(ipr: Any, index: int, mbps: int) -> None:
    await ipr.tc(
        "replace",
        "tbf",
        index,
        handle=ROOT,
        rate=f"{mbps}mbit",
        burst=burst_bytes(mbps),
        latency=LATENCY,
    )


async def _ensure_ifb(ipr: Any, name: str) -> int:
    indices = await ipr.link_lookup(ifname=name)
    if not indices:
        await ipr.link("add", ifname=name, kind="ifb")
        indices = await ipr.link_lookup(ifname=name)
    index = int(indices[0])
    await ipr.link("set", index=index, state="up")
    return index


async def _ignore_absent(request: Any) -> None:
    """Run a delete; what is already gone (ENOENT, EINVAL for a default qdisc, ENODEV) is
    what was wanted."""
    try:
        await request
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise
