"""Naming, addressing, settings and the allocator: pure logic, no namespace needed."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from managers.network import (
    AddressExhausted,
    Allocation,
    InvalidAllocation,
    NetworkManager,
    NetworkSettings,
)
from managers.network.addressing import first_free, mac_for, tap_name


# -- names and MACs ----------------------------------------------------------------------------
@given(st.text(min_size=1, max_size=200))
def test_tap_names_are_short_prefixed_and_stable(instance_id: str) -> None:
    name = tap_name(instance_id)
    assert name.startswith("dp-")
    assert len(name) <= 15
    assert all(c in "0123456789abcdef" for c in name[3:])
    assert tap_name(instance_id) == name


def test_tap_names_differ_for_ids_sharing_a_long_prefix() -> None:
    ids = [f"01JD8Z3K4M5N6P7Q8R9S{n:04d}" for n in range(500)]
    assert len({tap_name(i) for i in ids}) == len(ids)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_mac_is_locally_administered_unicast_and_encodes_the_address(value: int) -> None:
    address = IPv4Address(value)
    mac = mac_for(address)
    first = int(mac[:2], 16)
    assert first & 0b10, "locally administered bit set"
    assert not first & 0b01, "unicast"
    assert bytes(int(p, 16) for p in mac.split(":"))[2:] == address.packed


def test_mac_example() -> None:
    assert mac_for(IPv4Address("192.168.100.2")) == "02:00:c0:a8:64:02"


# -- address choice ----------------------------------------------------------------------------
def test_first_free_skips_network_gateway_and_broadcast() -> None:
    subnet = IPv4Network("10.0.0.0/29")
    gateway = IPv4Address("10.0.0.3")
    used: set[IPv4Address] = set()
    while True:
        try:
            used.add(first_free(subnet, gateway, used))
        except AddressExhausted:
            break
    assert sorted(used) == [IPv4Address(f"10.0.0.{i}") for i in (1, 2, 4, 5, 6)]


def test_addresses_outside_the_subnet_do_not_count_as_used() -> None:
    subnet = IPv4Network("10.0.0.0/30")
    gateway = IPv4Address("10.0.0.1")
    outside = {IPv4Address("10.9.9.9"), IPv4Address("10.0.0.1")}
    assert first_free(subnet, gateway, outside) == IPv4Address("10.0.0.2")
    with pytest.raises(AddressExhausted, match=r"all 1 usable addresses are taken"):
        first_free(subnet, gateway, outside | {IPv4Address("10.0.0.2")})


@pytest.mark.anyio
async def test_fifty_concurrent_allocations_with_stale_snapshots_never_share() -> None:
    """Each create reads the 'metadata' before allocating and writes it afterwards, with
    yields in between, like a real create that awaits disk I/O."""
    manager = NetworkManager(NetworkSettings())
    metadata: dict[str, str] = {}
    rng = random.Random(8)

    async def create(index: int) -> None:
        snapshot = list(metadata.values())
        for _ in range(rng.randint(0, 3)):
            await anyio.lowlevel.checkpoint()
        allocation = await manager.allocate(f"inst-{index}", snapshot)
        for _ in range(rng.randint(0, 3)):
            await anyio.lowlevel.checkpoint()
        metadata[f"inst-{index}"] = str(allocation.address)

    async with anyio.create_task_group() as group:
        for index in range(50):
            group.start_soon(create, index)
    assert len(metadata) == 50
    assert len(set(metadata.values())) == 50
    assert "192.168.100.1/24" not in metadata.values()


@pytest.mark.anyio
async def test_allocate_is_idempotent_per_instance_and_release_frees() -> None:
    manager = NetworkManager(NetworkSettings(subnet=IPv4Network("10.0.0.0/30"),
                                             gateway=IPv4Address("10.0.0.1")))  # fmt: skip
    first = await manager.allocate("a", [])
    assert await manager.allocate("a", []) == first
    with pytest.raises(AddressExhausted):
        await manager.allocate("b", [])
    await manager.release("a")
    assert await manager.allocate("b", []) == first


@pytest.mark.anyio
async def test_taken_addresses_from_metadata_are_skipped() -> None:
    manager = NetworkManager(NetworkSettings())
    taken: list[IPv4Address | IPv4Interface | str] = [
        "192.168.100.2/24",
        IPv4Address("192.168.100.3"),
        IPv4Interface("192.168.100.4/24"),
    ]
    allocation = await manager.allocate("x", taken)
    assert allocation.address == IPv4Interface("192.168.100.5/24")
    with pytest.raises(InvalidAllocation, match="not an IPv4 address"):
        await manager.allocate("y", ["not-an-address"])


# -- allocations in metadata -------------------------------------------------------------------
def test_allocation_round_trips_through_metadata() -> None:
    allocation = Allocation(
        IPv4Interface("192.168.100.7/24"), mac_for(IPv4Address("192.168.100.7"))
    )
    assert Allocation.from_dict(allocation.to_dict()) == allocation


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"address": "192.168.100.7", "mac": "02:00:c0:a8:64:07"},
        {"address": "fe80::1/64", "mac": "02:00:c0:a8:64:07"},
        {"address": "192.168.100.7/24", "mac": "nope"},
        {"address": 7, "mac": "02:00:c0:a8:64:07"},
    ],
)
def test_malformed_allocations_are_rejected(data: dict[str, object]) -> None:
    with pytest.raises(InvalidAllocation):
        Allocation.from_dict(data)


def test_guest_network_rejects_an_allocation_from_another_subnet() -> None:
    manager = NetworkManager(NetworkSettings())
    foreign = Allocation(IPv4Interface("10.0.0.2/24"), mac_for(IPv4Address("10.0.0.2")))
    with pytest.raises(InvalidAllocation, match="does not belong to subnet"):
        manager.guest_network(foreign)
