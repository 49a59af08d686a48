"""Bandwidth limits on instances, on fake VMMs and a fake network that holds what the kernel
would: given at create, changed while running or resting, kept through standby and restore,
re-applied at start-up, and refused where they cannot be."""

from __future__ import annotations

import json

import pytest

from managers.instances import CreateRequest, InstanceState, InvalidInstanceSpec
from managers.instances.types import InstanceRecord
from managers.network import Bandwidth, TapError
from tests.unit.test_instance_manager import (
    FakeNetwork,
    Node,
    build,
    request,
)
from tests.unit.test_instance_manager import node as node  # the same fixture

pytestmark = pytest.mark.anyio


def _stored(node: Node, instance_id: str) -> Bandwidth:
    data = json.loads(node.paths.instance_metadata(instance_id).read_text())
    return InstanceRecord.from_json(data).network.bandwidth


async def test_limits_follow_the_instance_through_changes_standby_and_restore(node: Node) -> None:
    manager = node.manager
    limits = Bandwidth(ingress_mbps=100, egress_mbps=20)
    created = await manager.create(request("web", network=True, bandwidth=limits))
    assert node.network.limits[created.id] == limits
    assert _stored(node, created.id) == limits

    changed = await manager.set_bandwidth("web", Bandwidth(egress_mbps=5))
    assert changed.record is not None
    assert changed.record.network.bandwidth == Bandwidth(egress_mbps=5)
    assert node.network.limits[created.id] == Bandwidth(egress_mbps=5)

    await manager.standby("web")
    assert created.id not in node.network.limits  # no TAP, nothing to hold limits
    rested = await manager.set_bandwidth("web", Bandwidth(ingress_mbps=7))
    assert rested.state is InstanceState.STANDBY
    assert _stored(node, created.id) == Bandwidth(ingress_mbps=7)
    await manager.restore("web")
    assert node.network.limits[created.id] == Bandwidth(ingress_mbps=7)

    await manager.set_bandwidth("web", Bandwidth())
    assert node.network.limits[created.id] == Bandwidth()


async def test_a_restart_reapplies_what_the_record_says(node: Node) -> None:
    created = await node.manager.create(
        request("web", network=True, bandwidth=Bandwidth(ingress_mbps=50))
    )
    # What a crash between the record's write and tc would leave: the kernel disagrees.
    node.network.limits[created.id] = Bandwidth()
    await node.manager.__aexit__(None, None, None)

    class Bridged(FakeNetwork):
        def bridge_exists(self) -> bool:
            return True

    network = Bridged(taps=node.network.taps, allocated=node.network.allocated)
    network.limits = node.network.limits
    async with build(node.paths, node.images, node.backend, network):
        assert network.limits[created.id] == Bandwidth(ingress_mbps=50)


async def test_a_limit_the_kernel_refuses_leaves_the_old_one(node: Node) -> None:
    created = await node.manager.create(
        request("web", network=True, bandwidth=Bandwidth(ingress_mbps=10))
    )

    async def refuse(instance_id: str, bandwidth: Bandwidth) -> None:
        if bandwidth != Bandwidth(ingress_mbps=10):
            raise TapError("tc says no")
        node.network.limits[instance_id] = bandwidth

    node.network.shape = refuse  # type: ignore[method-assign]
    with pytest.raises(TapError):
        await node.manager.set_bandwidth("web", Bandwidth(ingress_mbps=999))
    assert _stored(node, created.id) == Bandwidth(ingress_mbps=10)
    assert node.network.limits[created.id] == Bandwidth(ingress_mbps=10)


async def test_limits_need_a_network(node: Node) -> None:
    await node.manager.create(request("plain"))
    with pytest.raises(InvalidInstanceSpec, match="without a network"):
        await node.manager.set_bandwidth("plain", Bandwidth(ingress_mbps=10))


@pytest.mark.parametrize(
    ("network", "problem"),
    [
        ({"enabled": False, "bandwidth": {"ingress_mbps": 10}}, "needs network.enabled"),
        ({"enabled": True, "bandwidth": {"ingress_mbps": 0}}, "from 1 to 32000"),
        ({"enabled": True, "bandwidth": {"egress_mbps": 32001}}, "from 1 to 32000"),
        ({"enabled": True, "bandwidth": {"egress_mbps": 1.5}}, "whole number"),
        ({"enabled": True, "bandwidth": {"up": 1}}, "unknown"),
        ({"enabled": True, "bandwidth": 10}, "must be an object"),
        ({"enabled": True, "speed": 10}, "network must be"),
    ],
)
async def test_a_malformed_bandwidth_is_a_400_before_anything(
    network: dict[str, object], problem: str
) -> None:
    with pytest.raises(InvalidInstanceSpec, match=problem):
        CreateRequest.from_json({"name": "x", "image": "app", "network": network})


async def test_a_request_parses_limits_and_no_limit() -> None:
    parsed = CreateRequest.from_json(
        {"name": "x", "image": "app", "network": {"enabled": True, "bandwidth": {"egress_mbps": 3}}}
    )
    assert parsed.bandwidth == Bandwidth(egress_mbps=3)
    plain = CreateRequest.from_json({"name": "x", "image": "app", "network": {"enabled": True}})
    assert plain.bandwidth == Bandwidth()
