"""Real frames through the manager's TAPs and bridge.

A test "guest" opens a TAP the manager made, exactly as a VMM does (``/dev/net/tun``,
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``), and speaks raw Ethernet through it with the guest MAC
and address of its allocation: ARP and ICMP echo against the gateway, ARP against a neighbour,
ICMP echo to an "upstream" host in a second namespace to prove NAT. All traffic stays inside the
namespaces the test created.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from types import TracebackType
from typing import Any

import anyio
import pytest

from dataplane.settings import Settings
from managers.network import Allocation, NetworkManager, NetworkSettings
from tests.support.netns import NetnsWorker, netns_worker, network_namespace, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# The kernel's default virtio-net header length for a TAP (struct virtio_net_hdr).
VNET_HDR = bytes(10)
BROADCAST = b"\xff" * 6
ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
# Waiting for a frame that must not come is bounded by this; it is never asserted on.
SILENCE_WINDOW = 1.5
ANSWER_WINDOW = 3.0


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with netns_worker() as live:
        yield live


# -- a minimal Ethernet guest on a TAP file descriptor ----------------------------------------
def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class TapGuest:
    """Plays a VM's NIC: opens the TAP by name and reads/writes frames behind a vnet header."""

    def __init__(self, tap: str, allocation: Allocation) -> None:
        self.mac = _mac_bytes(allocation.mac)
        self.ip = allocation.address.ip
        self.fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            ifreq = struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> TapGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self.fd)

    def send(self, dst: bytes, ethertype: int, payload: bytes) -> None:
        os.write(self.fd, VNET_HDR + dst + self.mac + struct.pack("!H", ethertype) + payload)

    def receive(self, match: Callable[[bytes], bool], window: float) -> bytes | None:
        """The first frame within ``window`` seconds that ``match`` accepts, or ``None``."""
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                break
            frame = os.read(self.fd, 65536)[len(VNET_HDR) :]
            if match(frame):
                return frame
        return None

    # ARP -------------------------------------------------------------------------------------
    def arp_request(self, target: IPv4Address) -> None:
        body = struct.pack(
            "!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 1,
            self.mac, self.ip.packed, bytes(6), target.packed,
        )  # fmt: skip
        self.send(BROADCAST, ETH_ARP, body)

    def arp_reply(self, to_mac: bytes, to_ip: IPv4Address) -> None:
        body = struct.pack(
            "!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 2, self.mac, self.ip.packed, to_mac, to_ip.packed
        )
        self.send(to_mac, ETH_ARP, body)

    def resolve(self, target: IPv4Address, window: float = ANSWER_WINDOW) -> bytes | None:
        """Ask for ``target``'s MAC, re-asking a few times as a real stack would."""
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            self.arp_request(target)
            frame = self.receive(lambda f: _is_arp(f, 2, sender=target, target=self.ip), 0.3)
            if frame is not None:
                return frame[22:28]
        return None

    # ICMP echo -------------------------------------------------------------------------------
    def ping(self, dst_mac: bytes, dst_ip: IPv4Address, ident: int = 0x4450) -> bool:
        payload = b"dataplane-ping"
        icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
        icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0x4000, 64, 1, 0,
            self.ip.packed, dst_ip.packed,
        )  # fmt: skip
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        self.send(dst_mac, ETH_IPV4, header + icmp)
        reply = self.receive(
            lambda f: _is_echo_reply(f, source=dst_ip, target=self.ip, ident=ident),
            ANSWER_WINDOW,
        )
        return reply is not None and reply.endswith(payload)


def _is_arp(frame: bytes, op: int, *, sender: IPv4Address, target: IPv4Address) -> bool:
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_ARP:
        return False
    return (
        struct.unpack("!H", frame[20:22])[0] == op
        and frame[28:32] == sender.packed
        and frame[38:42] == target.packed
    )


def _is_echo_reply(frame: bytes, *, source: IPv4Address, target: IPv4Address, ident: int) -> bool:
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_IPV4:
        return False
    ip = frame[14:]
    header_len = (ip[0] & 0x0F) * 4
    icmp = ip[header_len:]
    return (
        ip[9] == 1
        and ip[12:16] == source.packed
        and ip[16:20] == target.packed
        and icmp[0] == 0
        and struct.unpack("!H", icmp[4:6])[0] == ident
    )


# -- bodies run inside the namespace ---------------------------------------------------------
async def _make_taps(env: dict[str, str], ids: list[str]) -> list[tuple[str, Allocation]]:
    manager = NetworkManager(Settings.from_env(env).network)
    made: list[tuple[str, Allocation]] = []
    try:
        await manager.start(known_instance_ids=[])
        for instance in ids:
            allocation = await manager.allocate(instance, [])
            made.append((await manager.create_tap(instance, allocation), allocation))
    finally:
        await manager.close()
    return made


def _reach_gateway(guest: TapGuest, gateway: IPv4Address) -> bool:
    gateway_mac = guest.resolve(gateway)
    return gateway_mac is not None and guest.ping(gateway_mac, gateway)


def _body_neighbours(env: dict[str, str]) -> dict[str, bool]:
    (tap_a, alloc_a), (tap_b, alloc_b) = anyio.run(_make_taps, env, ["inst-a", "inst-b"])
    gateway = Settings.from_env(env).network.gateway
    with TapGuest(tap_a, alloc_a) as a, TapGuest(tap_b, alloc_b) as b:
        seen = {"a_gateway": _reach_gateway(a, gateway), "b_gateway": _reach_gateway(b, gateway)}
        heard = None
        deadline = time.monotonic() + SILENCE_WINDOW
        while heard is None and time.monotonic() < deadline:
            a.arp_request(b.ip)
            heard = b.receive(lambda f: _is_arp(f, 1, sender=a.ip, target=b.ip), 0.3)
        seen["b_heard_a"] = heard is not None
        answered = False
        if heard is not None:
            b.arp_reply(a.mac, a.ip)
            answer = a.receive(lambda f: _is_arp(f, 2, sender=b.ip, target=a.ip), ANSWER_WINDOW)
            answered = answer is not None
        seen["a_heard_b"] = answered
    return seen


def test_isolated_neighbours_reach_the_gateway_but_not_each_other(worker: NetnsWorker) -> None:
    seen = worker.call(_body_neighbours, {})
    assert seen == {"a_gateway": True, "b_gateway": True, "b_heard_a": False, "a_heard_b": False}


def test_without_isolation_neighbours_reach_each_other(worker: NetnsWorker) -> None:
    seen = worker.call(_body_neighbours, {"NETWORK_ISOLATION": "off"})
    assert seen == {"a_gateway": True, "b_gateway": True, "b_heard_a": True, "a_heard_b": True}


async def _standby_and_restore(allocation: dict[str, str]) -> str:
    manager = NetworkManager(NetworkSettings())
    try:
        await manager.start(known_instance_ids=["inst-r"])
        await manager.delete_tap("inst-r")
        return await manager.create_tap("inst-r", Allocation.from_dict(allocation))
    finally:
        await manager.close()


def _body_restore() -> dict[str, Any]:
    ((tap, allocation),) = anyio.run(_make_taps, {}, ["inst-r"])
    gateway = NetworkSettings().gateway
    with TapGuest(tap, allocation) as guest:
        before = _reach_gateway(guest, gateway)
    restored_tap = anyio.run(_standby_and_restore, allocation.to_dict())
    with TapGuest(restored_tap, allocation) as guest:
        after = _reach_gateway(guest, gateway)
    return {"before": before, "after": after, "same_tap": restored_tap == tap}


def test_the_network_works_again_after_standby_and_restore(worker: NetnsWorker) -> None:
    seen = worker.call(_body_restore)
    assert seen == {"before": True, "after": True, "same_tap": True}


UPSTREAM = IPv4Address("203.0.113.2")


def _body_upstream(env: dict[str, str], upstream_ns: str) -> dict[str, Any]:
    """Ping a host in ``upstream_ns``, which has no route back to the instance subnet: an
    answer can only come if the source was masqueraded to the uplink address. Forwarding is
    switched on up front so that NAT is the only difference between the two cases."""
    for argv in (
        ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        ["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", upstream_ns],
        ["ip", "addr", "add", "203.0.113.1/24", "dev", "up0"],
        ["ip", "link", "set", "up0", "up"],
        ["ip", "-n", upstream_ns, "addr", "add", f"{UPSTREAM}/24", "dev", "up0"],
        ["ip", "-n", upstream_ns, "link", "set", "up0", "up"],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    ((tap, allocation),) = anyio.run(_make_taps, env, ["inst-n"])
    gateway = Settings.from_env(env).network.gateway
    with TapGuest(tap, allocation) as guest:
        gateway_mac = guest.resolve(gateway)
        if gateway_mac is None:
            return {"gateway": False, "upstream": False}
        return {"gateway": True, "upstream": guest.ping(gateway_mac, UPSTREAM)}


@pytest.mark.parametrize(("env", "answered"), [({}, True), ({"NETWORK_NAT": "off"}, False)])
def test_outbound_traffic_is_masqueraded_only_with_nat_on(
    worker: NetnsWorker, env: dict[str, str], answered: bool
) -> None:
    with network_namespace() as upstream:
        seen = worker.call(_body_upstream, env, upstream)
    assert seen == {"gateway": True, "upstream": answered}
