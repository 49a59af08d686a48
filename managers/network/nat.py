"""Outbound NAT for the instance subnet, in an nftables table of our own.

Everything lives in the table ``ip dataplane``: the table name is the marker, so removing our
rules is deleting that table, and nothing another tool installed is ever touched. Each install
replaces the whole table in one nft transaction, so rules never pile up across restarts and
there is no moment with half a rule set.
"""

from __future__ import annotations

import os
import shutil
from ipaddress import IPv4Network

import anyio

from managers.network.errors import NatError

NAT_TABLE = "dataplane"
NAT_FAMILY = "ip"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
# Services often run with a PATH lacking the sbin directories where nft lives.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"]
)


def nat_comment(bridge: str) -> str:
    return f"dataplane outbound NAT for {bridge}"


def ruleset(subnet: IPv4Network, bridge: str) -> str:
    """The nft script that (re)creates our table; ``add`` before ``delete`` makes the delete
    valid whether or not the table already exists."""
    return (
        f"add table {NAT_FAMILY} {NAT_TABLE}\n"
        f"delete table {NAT_FAMILY} {NAT_TABLE}\n"
        f"table {NAT_FAMILY} {NAT_TABLE} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {subnet} ip daddr != {subnet} masquerade "
        f'comment "{nat_comment(bridge)}"\n'
        "  }\n"
        "}\n"
    )


async def install(subnet: IPv4Network, bridge: str) -> None:
    """Masquerade traffic leaving the subnet and turn on IPv4 forwarding, without which the
    kernel would drop the instances' packets before NAT sees them."""
    await _nft(ruleset(subnet, bridge), "install the NAT rules")
    await _enable_forwarding()


async def remove() -> None:
    """Delete our table if present. IPv4 forwarding is left as it is: other services on the
    host may rely on it. Without nft installed there can be no table of ours to remove."""
    if _nft_path() is None:
        return
    await _nft(
        f"add table {NAT_FAMILY} {NAT_TABLE}\ndelete table {NAT_FAMILY} {NAT_TABLE}\n",
        "remove the NAT rules",
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
