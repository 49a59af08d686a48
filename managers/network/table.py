"""Our nftables table ``ip dataplane``: outbound NAT for the subnet and the ingresses' DNAT.

Everything lives in that one table: the table name is the marker, so removing our rules is
deleting the table, and nothing another tool installed is ever touched. Each install
replaces the whole table in one nft transaction, so rules never pile up across restarts,
there is no moment with half a rule set, and the table always says exactly what the
settings and the ingress records say.

Forwards (ingresses) need three things beyond a ``dnat`` rule:

- The same rule in the ``output`` hook, so a connection made on the host itself (to one of
  its addresses, or to 127.0.0.1) is forwarded too.
- ``route_localnet`` on the bridge, without which the kernel refuses to route a packet whose
  source is 127.0.0.1 out of it, and a ``masquerade`` of such packets so the guest answers
  the gateway. ``route_localnet`` would also let a guest address the host's loopback
  services through the bridge (the hole kube-proxy once had, CVE-2020-8558), and a forward
  listening on 127.0.0.1 would take packets for 127.0.0.1 from any interface (the kernel
  calls them martians only when routing, after DNAT has rewritten them). So the table drops
  every packet for 127.0.0.0/8 that did not arrive on ``lo``, before anything else sees it;
  ``route_localnet`` is set only after that rule is in place and cleared before it goes.
- A ``masquerade`` of forwarded packets whose source is on the subnet (a guest reaching an
  ingress), so the answer returns through the host rather than straight to the guest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from ipaddress import IPv4Network

import anyio

from managers.network.errors import NatError
from managers.network.types import Forward

NAT_TABLE = "dataplane"
NAT_FAMILY = "ip"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
LOOPBACK = IPv4Network("127.0.0.0/8")
# Services often run with a PATH lacking the sbin directories where nft lives.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"]
)


def nat_comment(bridge: str) -> str:
    return f"dataplane outbound NAT for {bridge}"


def forward_comment(forward: Forward) -> str:
    return f"dataplane ingress {forward.tag}"


def ruleset(
    subnet: IPv4Network, bridge: str, *, nat: bool, forwards: Sequence[Forward] = ()
) -> str | None:
    """The nft script that (re)creates our table, or ``None`` when there is nothing to put in
    it. ``add`` before ``delete`` makes the delete valid whether or not the table exists."""
    if not nat and not forwards:
        return None
    postrouting: list[str] = []
    if nat:
        postrouting.append(
            f'ip saddr {subnet} ip daddr != {subnet} masquerade comment "{nat_comment(bridge)}"'
        )
    chains: list[str] = []
    if forwards:
        dnat = [_dnat(forward) for forward in forwards]
        chains.append(
            _chain(
                "guard",
                "type filter hook prerouting priority raw; policy accept;",
                [f'iifname != "lo" ip daddr {LOOPBACK} drop'],
            )
        )
        chains.append(
            _chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", dnat)
        )
        # The output hook has no symbolic name for the dstnat priority; -100 is its value.
        chains.append(_chain("output", "type nat hook output priority -100; policy accept;", dnat))
        postrouting += [
            f"ct status dnat ip saddr {LOOPBACK} ip daddr {subnet} masquerade",
            f"ct status dnat ip saddr {subnet} ip daddr {subnet} masquerade",
        ]
    chains.append(
        _chain(
            "postrouting", "type nat hook postrouting priority srcnat; policy accept;", postrouting
        )
    )
    return (
        f"add table {NAT_FAMILY} {NAT_TABLE}\n"
        f"delete table {NAT_FAMILY} {NAT_TABLE}\n"
        f"table {NAT_FAMILY} {NAT_TABLE} {{\n" + "".join(chains) + "}\n"
    )


def _chain(name: str, header: str, rules: Sequence[str]) -> str:
    body = "".join(f"    {rule}\n" for rule in rules)
    return f"  chain {name} {{\n    {header}\n{body}  }}\n"


def _dnat(forward: Forward) -> str:
    where = "fib daddr type local" if forward.listen is None else f"ip daddr {forward.listen}"
    return (
        f"{where} {forward.protocol.value} dport {forward.host_port} "
        f"dnat to {forward.target}:{forward.guest_port} "
        f'comment "{forward_comment(forward)}"'
    )


async def install(
    subnet: IPv4Network, bridge: str, *, nat: bool, forwards: Sequence[Forward] = ()
) -> None:
    """Make our table say exactly this, turn on IPv4 forwarding when it forwards anything
    (without it the kernel drops the instances' packets before NAT sees them), and set
    ``route_localnet`` on the bridge exactly when there are forwards."""
    script = ruleset(subnet, bridge, nat=nat, forwards=forwards)
    if not forwards:
        # Off before the guard that makes it safe can go.
        await _route_localnet(bridge, False)
    if script is None:
        await remove()
    else:
        await _nft(script, "install the nftables rules")
        await _enable_forwarding()
    if forwards:
        await _route_localnet(bridge, True)


async def remove() -> None:
    """Delete our table if present. IPv4 forwarding is left as it is: other services on the
    host may rely on it. Without nft installed there can be no table of ours to remove."""
    if _nft_path() is None:
        return
    await _nft(
        f"add table {NAT_FAMILY} {NAT_TABLE}\ndelete table {NAT_FAMILY} {NAT_TABLE}\n",
        "remove the nftables rules",
    )


def _nft_path() -> str | None:
    return shutil.which("nft", path=_SEARCH_PATH)


async def _nft(script: str, purpose: str) -> None:
    nft = _nft_path()
    if nft is None:
        raise NatError(f"cannot {purpose}: the nft command (package nftables) is not installed")
    result = await anyio.run_process([nft, "-f", "-"], input=script.encode(), check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        raise NatError(f"cannot {purpose}: nft failed: {detail}")


async def _enable_forwarding() -> None:
    path = anyio.Path(IP_FORWARD)
    try:
        if (await path.read_text()).strip() != "1":
            await path.write_text("1\n")
    except OSError as exc:
        raise NatError(f"cannot enable IPv4 forwarding via {IP_FORWARD}: {exc}") from exc


async def _route_localnet(bridge: str, on: bool) -> None:
    """Our bridge's ``route_localnet``; a bridge not made yet gets it when ``start`` makes it."""
    path = anyio.Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet")
    wanted = "1" if on else "0"
    try:
        if (await path.read_text()).strip() != wanted:
            await path.write_text(f"{wanted}\n")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NatError(f"cannot set route_localnet on {bridge}: {exc}") from exc
