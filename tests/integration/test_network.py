"""The network manager against the real kernel: bridge, TAPs, orphans, NAT.

Every body runs in a worker process inside a namespace made for the test (see
``tests/support/netns.py``); the functions named ``_body_*`` run there and return plain data
that the test asserts on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import anyio
import pytest

from dataplane.settings import Settings
from managers.network import (
    AddressExhausted,
    Allocation,
    Bandwidth,
    BridgeConflict,
    Forward,
    NetworkManager,
    NetworkSettings,
    Protocol,
    TapError,
)
from managers.network.addressing import ifb_name, mac_for, tap_name
from managers.network.table import NAT_TABLE, nat_comment
from tests.support.netns import NetnsWorker, netns_worker, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with netns_worker() as live:
        yield live


# -- helpers that run inside the namespace ----------------------------------------------------
async def _run(*argv: str, check: bool = True) -> tuple[int, str]:
    result = await anyio.run_process(list(argv), check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{argv} failed: {result.stderr.decode()}")
    return result.returncode, result.stdout.decode()


async def _link(name: str) -> dict[str, Any] | None:
    code, out = await _run("ip", "-j", "-d", "link", "show", "dev", name, check=False)
    return json.loads(out)[0] if code == 0 else None


async def _ipv4(name: str) -> list[str]:
    _, out = await _run("ip", "-j", "-4", "addr", "show", "dev", name)
    entries = json.loads(out)
    if not entries:
        return []
    return [f"{a['local']}/{a['prefixlen']}" for a in entries[0].get("addr_info", [])]


async def _taps() -> list[str]:
    _, out = await _run("ip", "-j", "-d", "link", "show")
    return sorted(
        link["ifname"]
        for link in json.loads(out)
        if link.get("linkinfo", {}).get("info_kind") == "tun"
    )


async def _nat_rules() -> list[dict[str, Any]] | None:
    code, out = await _run("nft", "-j", "list", "table", "ip", NAT_TABLE, check=False)
    if code != 0:
        return None
    return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]


def _manager(env: dict[str, str]) -> NetworkManager:
    return NetworkManager(Settings.from_env(env).network)


# -- bridge ------------------------------------------------------------------------------------
async def _body_create_then_adopt() -> dict[str, Any]:
    first = _manager({})
    try:
        await first.start(known_instance_ids=[])
    finally:
        await first.close()
    created = await _link("vmbr0")
    second = _manager({})
    try:
        await second.start(known_instance_ids=[])
    finally:
        await second.close()
    adopted = await _link("vmbr0")
    assert created is not None
    assert adopted is not None
    return {
        "kind": created["linkinfo"]["info_kind"],
        "flags": created["flags"],
        "mac": created["address"],
        "addresses": await _ipv4("vmbr0"),
        "same_index": created["ifindex"] == adopted["ifindex"],
    }


def test_start_creates_the_bridge_and_a_second_start_adopts_it(worker: NetnsWorker) -> None:
    seen = worker.call(_body_create_then_adopt)
    assert seen["kind"] == "bridge"
    assert "UP" in seen["flags"]
    assert seen["addresses"] == ["192.168.100.1/24"]
    # A fixed MAC keeps the gateway's MAC stable as TAPs come and go.
    assert seen["mac"] == mac_for(NetworkSettings().gateway)
    assert seen["same_index"]


async def _body_adopt_prepared() -> dict[str, Any]:
    await _run("ip", "link", "add", "br-x", "type", "bridge")
    before = await _link("br-x")
    manager = _manager({"BRIDGE_NAME": "br-x", "SUBNET_CIDR": "10.20.0.0/16"})
    try:
        await manager.start(known_instance_ids=[])
    finally:
        await manager.close()
    after = await _link("br-x")
    assert before is not None
    assert after is not None
    return {
        "same_index": before["ifindex"] == after["ifindex"],
        "addresses": await _ipv4("br-x"),
        "flags": after["flags"],
    }


def test_start_adopts_an_existing_bridge_without_address(worker: NetnsWorker) -> None:
    seen = worker.call(_body_adopt_prepared)
    assert seen["same_index"]
    assert seen["addresses"] == ["10.20.0.1/16"]
    assert "UP" in seen["flags"]


async def _body_conflict(prepare: list[list[str]]) -> dict[str, Any]:
    for argv in prepare:
        await _run(*argv)
    before = await _link("vmbr0")
    before_addresses = await _ipv4("vmbr0")
    manager = _manager({})
    error: BaseException | None = None
    try:
        await manager.start(known_instance_ids=[])
    except BridgeConflict as exc:
        error = exc
    finally:
        await manager.close()
    after = await _link("vmbr0")
    assert before is not None
    assert after is not None
    return {
        "error": str(error) if error else None,
        "unchanged": (before["flags"], before_addresses) == (after["flags"], await _ipv4("vmbr0")),
        "nat": await _nat_rules(),
    }


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        pytest.param(
            [
                ["ip", "link", "add", "vmbr0", "type", "bridge"],
                ["ip", "addr", "add", "10.9.0.1/24", "dev", "vmbr0"],
            ],
            "already carries 10.9.0.1/24",
            id="bridge-with-another-address",
        ),
        pytest.param(
            [
                ["ip", "link", "add", "vmbr0", "type", "bridge"],
                ["ip", "addr", "add", "192.168.100.1/16", "dev", "vmbr0"],
            ],
            "already carries 192.168.100.1/16",
            id="bridge-with-another-prefix",
        ),
        pytest.param(
            [["ip", "link", "add", "vmbr0", "type", "veth", "peer", "name", "vmbr0-peer"]],
            "is a veth device, not a bridge",
            id="not-a-bridge",
        ),
    ],
)
def test_a_conflicting_link_is_an_error_and_left_untouched(
    worker: NetnsWorker, prepare: list[list[str]], expected: str
) -> None:
    seen = worker.call(_body_conflict, prepare)
    assert seen["error"] is not None
    assert expected in seen["error"]
    assert seen["unchanged"]
    assert seen["nat"] is None, "nothing may be installed when start-up fails"


# -- TAP devices -------------------------------------------------------------------------------
async def _body_tap(env: dict[str, str], queue_pairs: int) -> dict[str, Any]:
    manager = _manager(env)
    try:
        await manager.start(known_instance_ids=[])
        allocation = await manager.allocate("inst-1", [])
        name = await manager.create_tap("inst-1", allocation, queue_pairs=queue_pairs)
    finally:
        await manager.close()
    link = await _link(name)
    assert link is not None
    return {"name": name, "link": link}


@pytest.mark.parametrize(
    ("env", "queue_pairs", "isolated", "multi_queue"),
    [
        pytest.param({}, 1, True, False, id="defaults"),
        pytest.param({"NETWORK_ISOLATION": "off"}, 1, False, False, id="isolation-off"),
        pytest.param({}, 2, True, True, id="multi-queue"),
    ],
)
def test_create_tap_flags_master_isolation_and_state(
    worker: NetnsWorker,
    env: dict[str, str],
    queue_pairs: int,
    isolated: bool,
    multi_queue: bool,
) -> None:
    seen = worker.call(_body_tap, env, queue_pairs)
    link = seen["link"]
    assert seen["name"] == tap_name("inst-1")
    assert seen["name"].startswith("dp-")
    assert len(seen["name"]) <= 15
    info = link["linkinfo"]
    assert info["info_kind"] == "tun"
    assert info["info_data"]["type"] == "tap"
    assert info["info_data"]["pi"] is False
    assert info["info_data"]["vnet_hdr"] is True
    assert info["info_data"]["multi_queue"] is multi_queue
    assert info["info_data"]["persist"] is True
    assert link["master"] == "vmbr0"
    assert info["info_slave_data"]["isolated"] is isolated
    # Administratively up; the carrier stays down until a VMM opens the device.
    assert "UP" in link["flags"]


async def _body_standby_restore() -> dict[str, Any]:
    manager = _manager({})
    try:
        await manager.start(known_instance_ids=[])
        allocation = await manager.allocate("inst-s", [])
        stored = json.dumps(allocation.to_dict())
        first = await manager.create_tap("inst-s", allocation)
        await manager.delete_tap("inst-s")
        after_standby = await _taps()
        await manager.delete_tap("inst-s")
        restored = Allocation.from_dict(json.loads(stored))
        second = await manager.create_tap("inst-s", restored)
        guest = manager.guest_network(restored).to_dict()
    finally:
        await manager.close()
    return {
        "first": first,
        "second": second,
        "after_standby": after_standby,
        "after_restore": await _taps(),
        "same_allocation": restored == allocation,
        "guest": guest,
    }


def test_standby_releases_the_tap_and_restore_recreates_it(worker: NetnsWorker) -> None:
    seen = worker.call(_body_standby_restore)
    assert seen["after_standby"] == []
    assert seen["first"] == seen["second"]
    assert seen["after_restore"] == [seen["first"]]
    assert seen["same_allocation"]
    assert seen["guest"] == {
        "address": "192.168.100.2/24",
        "gateway": "192.168.100.1",
        "dns": "1.1.1.1",
        "mac": "02:00:c0:a8:64:02",
    }


async def _body_attach_failure() -> dict[str, Any]:
    manager = _manager({})
    try:
        await manager.start(known_instance_ids=[])
        allocation = await manager.allocate("inst-f", [])
        # The bridge disappears behind the manager's back: attaching must fail.
        await _run("ip", "link", "del", "vmbr0")
        try:
            await manager.create_tap("inst-f", allocation)
        except TapError as exc:
            error: str | None = str(exc)
        else:
            error = None
    finally:
        await manager.close()
    return {"error": error, "taps": await _taps()}


def test_a_tap_that_cannot_be_attached_is_removed(worker: NetnsWorker) -> None:
    seen = worker.call(_body_attach_failure)
    assert seen["error"] is not None
    assert "cannot attach TAP" in seen["error"]
    assert seen["taps"] == []


# -- allocation with TAPs ----------------------------------------------------------------------
async def _body_exhaustion() -> dict[str, Any]:
    manager = _manager({"SUBNET_CIDR": "10.1.2.0/29", "SUBNET_GATEWAY": "10.1.2.1"})
    metadata: dict[str, str] = {}
    try:
        await manager.start(known_instance_ids=[])
        for index in range(5):
            instance = f"inst-{index}"
            allocation = await manager.allocate(instance, metadata.values())
            await manager.create_tap(instance, allocation)
            metadata[instance] = str(allocation.address)
        try:
            await manager.allocate("inst-extra", metadata.values())
        except AddressExhausted as exc:
            error: str | None = str(exc)
        else:
            error = None
        taps_after_failure = await _taps()
        # Deleting one instance frees its address for the next create.
        await manager.delete_tap("inst-2")
        await manager.release("inst-2")
        freed = metadata.pop("inst-2")
        reused = await manager.allocate("inst-extra", metadata.values())
    finally:
        await manager.close()
    return {
        "addresses": [*sorted(metadata.values()), freed],
        "error": error,
        "taps": taps_after_failure,
        "freed": freed,
        "reused": str(reused.address),
    }


def test_exhaustion_is_a_clear_error_and_leaves_nothing_behind(worker: NetnsWorker) -> None:
    seen = worker.call(_body_exhaustion)
    assert sorted(seen["addresses"]) == [f"10.1.2.{i}/29" for i in range(2, 7)]
    assert seen["error"] is not None
    assert "no free address in 10.1.2.0/29" in seen["error"]
    assert seen["taps"] == sorted(tap_name(f"inst-{i}") for i in range(5))
    assert seen["reused"] == seen["freed"]


async def _body_concurrent_creates() -> dict[str, Any]:
    manager = _manager({})
    metadata: dict[str, str] = {}

    async def create(instance: str) -> None:
        allocation = await manager.allocate(instance, list(metadata.values()))
        await manager.create_tap(instance, allocation)
        metadata[instance] = str(allocation.address)

    try:
        await manager.start(known_instance_ids=[])
        async with anyio.create_task_group() as group:
            for index in range(20):
                group.start_soon(create, f"inst-{index}")
    finally:
        await manager.close()
    _, out = await _run("ip", "-j", "link", "show", "master", "vmbr0")
    return {"addresses": list(metadata.values()), "ports": [p["ifname"] for p in json.loads(out)]}


def test_concurrent_creates_get_distinct_addresses_and_attached_taps(
    worker: NetnsWorker,
) -> None:
    seen = worker.call(_body_concurrent_creates)
    assert len(set(seen["addresses"])) == 20
    assert sorted(seen["ports"]) == sorted(tap_name(f"inst-{i}") for i in range(20))


# -- orphans -----------------------------------------------------------------------------------
async def _body_orphans() -> dict[str, Any]:
    crashed = _manager({})
    try:
        await crashed.start(known_instance_ids=[])
        for instance in ("kept", "crashed-before-metadata"):
            allocation = await crashed.allocate(instance, [])
            await crashed.create_tap(instance, allocation)
    finally:
        await crashed.close()
    # Links that are not ours: another TAP without our prefix, and a non-TAP with it.
    await _run("ip", "tuntap", "add", "other0", "mode", "tap")
    await _run("ip", "link", "add", "dp-notatap", "type", "veth", "peer", "name", "nt-peer")
    restarted = _manager({})
    try:
        removed = await restarted.start(known_instance_ids=["kept", "never-had-a-tap"])
    finally:
        await restarted.close()
    return {
        "removed": removed,
        "taps": await _taps(),
        "veth_kept": await _link("dp-notatap") is not None,
    }


def test_start_removes_orphan_taps_only(worker: NetnsWorker) -> None:
    seen = worker.call(_body_orphans)
    assert seen["removed"] == [tap_name("crashed-before-metadata")]
    assert seen["taps"] == sorted([tap_name("kept"), "other0"])
    assert seen["veth_kept"]


# -- NAT ---------------------------------------------------------------------------------------
async def _body_nat() -> dict[str, Any]:
    await _run("nft", "add", "table", "ip", "someone-else")
    seen: dict[str, Any] = {}
    for step, env in (("on", {}), ("again", {}), ("off", {"NETWORK_NAT": "false"})):
        manager = _manager(env)
        try:
            await manager.start(known_instance_ids=[])
        finally:
            await manager.close()
        seen[step] = await _nat_rules()
    _, forward = await _run("cat", "/proc/sys/net/ipv4/ip_forward")
    code, _ = await _run("nft", "list", "table", "ip", "someone-else", check=False)
    seen["forward"] = forward.strip()
    seen["other_table_kept"] = code == 0
    return seen


async def _qdiscs(device: str) -> list[tuple[str, int | None]]:
    """(kind, rate in bytes a second) of the device's qdiscs, as tc shows them."""
    _, out = await _run("tc", "-j", "qdisc", "show", "dev", device)
    return sorted(
        (q["kind"], q.get("options", {}).get("rate"))
        for q in json.loads(out)
        if q["kind"] != "noqueue"
    )


async def _body_shaping() -> dict[str, Any]:
    manager = _manager({})
    seen: dict[str, Any] = {}
    try:
        await manager.start(known_instance_ids=[])
        allocation = await manager.allocate("inst-1", [])
        tap = await manager.create_tap("inst-1", allocation, bandwidth=Bandwidth(100, 20))
        ifb = ifb_name("inst-1")
        seen["both"] = (await _qdiscs(tap), await _qdiscs(ifb))
        _, filters = await _run("tc", "filter", "show", "dev", tap, "ingress")
        seen["redirect"] = f"Redirect to device {ifb}" in filters
        await manager.shape("inst-1", Bandwidth(ingress_mbps=None, egress_mbps=50))
        seen["changed"] = (await _qdiscs(tap), await _qdiscs(ifb))
        await manager.shape("inst-1", Bandwidth())
        seen["lifted"] = (await _qdiscs(tap), await _link(ifb))
        await manager.shape("inst-1", Bandwidth(egress_mbps=5))
        # A leftover IFB of an instance that is gone goes at the next start; ours stays.
        await _run("ip", "link", "add", ifb_name("gone"), "type", "ifb")
        await _run("ip", "link", "add", "dpbother", "type", "ifb")
        seen["removed"] = await manager.start(known_instance_ids=["inst-1"])
        seen["kept"] = await _link(ifb) is not None
        await manager.delete_tap("inst-1")
        seen["deleted"] = (await _link(tap), await _link(ifb))
    finally:
        await manager.close()
    return seen


def test_bandwidth_limits_are_qdiscs_on_the_tap_and_its_ifb(worker: NetnsWorker) -> None:
    seen = worker.call(_body_shaping)
    tap_qdiscs, ifb_qdiscs = seen["both"]
    assert ("tbf", 100_000_000 // 8) in tap_qdiscs, tap_qdiscs
    assert ("ingress", None) in tap_qdiscs
    assert ifb_qdiscs == [("tbf", 20_000_000 // 8)]
    assert seen["redirect"]
    tap_qdiscs, ifb_qdiscs = seen["changed"]
    assert not any(kind == "tbf" for kind, _ in tap_qdiscs), tap_qdiscs
    assert ifb_qdiscs == [("tbf", 50_000_000 // 8)]
    tap_qdiscs, ifb_link = seen["lifted"]
    assert not any(kind in ("tbf", "ingress") for kind, _ in tap_qdiscs), tap_qdiscs
    assert ifb_link is None
    assert seen["removed"] == [ifb_name("gone")]
    assert seen["kept"]
    assert seen["deleted"] == (None, None)


async def _body_forwards_without_nat() -> dict[str, Any]:
    manager = _manager({"NETWORK_NAT": "false"})
    forward = Forward(
        tag="abcdefabcdef",
        protocol=Protocol.UDP,
        listen=IPv4Address("10.9.9.9"),
        host_port=5353,
        target=IPv4Address("192.168.100.7"),
        guest_port=53,
    )
    seen: dict[str, Any] = {}
    try:
        await manager.start(known_instance_ids=[])
        seen["started"] = await _nat_rules()
        await manager.publish([forward])
        seen["forwarding"] = await _nat_rules()
        _, localnet = await _run("cat", "/proc/sys/net/ipv4/conf/vmbr0/route_localnet")
        seen["localnet"] = localnet.strip()
        await manager.publish([])
        seen["emptied"] = await _nat_rules()
        _, localnet = await _run("cat", "/proc/sys/net/ipv4/conf/vmbr0/route_localnet")
        seen["localnet_after"] = localnet.strip()
    finally:
        await manager.close()
    return seen


def test_forwards_get_a_table_of_their_own_when_nat_is_off(worker: NetnsWorker) -> None:
    seen = worker.call(_body_forwards_without_nat)
    assert seen["started"] is None, "no NAT and no forwards: no table"
    rules = seen["forwarding"]
    assert rules is not None
    by_chain: dict[str, list[str]] = {}
    for rule in rules:
        by_chain.setdefault(rule["chain"], []).append(rule.get("comment", ""))
    assert by_chain["prerouting"] == by_chain["output"] == ["dataplane ingress abcdefabcdef"]
    assert len(by_chain["guard"]) == 1  # loopback from anywhere but lo, dropped
    assert len(by_chain["postrouting"]) == 2  # the forwards' masquerades, no outbound NAT
    assert seen["localnet"] == "1"
    assert seen["emptied"] is None
    assert seen["localnet_after"] == "0"


def test_nat_rules_follow_the_setting_and_are_removed_by_their_table(
    worker: NetnsWorker,
) -> None:
    seen = worker.call(_body_nat)
    for step in ("on", "again"):
        rules = seen[step]
        assert rules is not None
        assert len(rules) == 1, "a second start must replace the rules, not add to them"
        rule = rules[0]
        assert rule["comment"] == nat_comment("vmbr0")
        assert {"masquerade": None} in rule["expr"]
        assert {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "192.168.100.0", "len": 24}},
            }
        } in rule["expr"]
    assert seen["off"] is None
    assert seen["forward"] == "1"
    assert seen["other_table_kept"]
