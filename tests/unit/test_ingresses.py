"""The ingresses manager on a fake network port and a fake instance lookup: records, rules
published, every refusal changing nothing, restart, reconcile and quarantine."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from managers.ingresses import (
    CreateIngress,
    IngressExists,
    IngressManager,
    IngressNotFound,
    IngressRecord,
    InstanceWithoutNetwork,
    InvalidIngressSpec,
    PortInUse,
    Target,
    TargetNotFound,
    ports,
)
from managers.network import Forward, NatError, Protocol
from managers.paths import Paths

pytestmark = pytest.mark.anyio

WEB = Target("aaaaaaaaaaaa", IPv4Address("192.168.100.2"))
DB = Target("bbbbbbbbbbbb", IPv4Address("192.168.100.3"))
OFFLINE = Target("cccccccccccc", None)


@dataclass
class FakeNetwork:
    published: list[tuple[Forward, ...]] = field(default_factory=list)
    fail: bool = False

    async def is_local(self, address: IPv4Address) -> bool:
        return address == IPv4Address("127.0.0.1")

    async def publish(self, forwards: Sequence[Forward]) -> None:
        if self.fail:
            raise NatError("cannot install the nftables rules: nft failed: the fake says no")
        self.published.append(tuple(forwards))

    @property
    def table(self) -> list[tuple[int, str, int]]:
        return [(f.host_port, str(f.target), f.guest_port) for f in self.published[-1]]


@dataclass
class Node:
    paths: Paths
    network: FakeNetwork
    instances: dict[str, Target]
    changes: list[tuple[str, str]]

    def manager(self, network: FakeNetwork | None = None) -> IngressManager:
        async def lookup(key: str) -> Target | None:
            by_name = {"web": WEB.instance_id, "db": DB.instance_id, "offline": OFFLINE.instance_id}
            return self.instances.get(by_name.get(key, key))

        return IngressManager(
            self.paths,
            self.network if network is None else network,
            lookup=lookup,
            on_change=lambda kind, ingress: self.changes.append((kind, ingress.name)),
        )

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in self.paths.ingresses.iterdir())


@pytest.fixture
async def node(tmp_path: Path) -> Node:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    return Node(
        paths,
        FakeNetwork(),
        {t.instance_id: t for t in (WEB, DB, OFFLINE)},
        [],
    )


def ask(
    name: str, instance: str, host_port: int, guest_port: int = 80, **extra: object
) -> CreateIngress:
    return CreateIngress.from_json(
        {"name": name, "instance_id": instance, "host_port": host_port, "guest_port": guest_port}
        | extra
    )


async def test_create_records_and_publishes_and_delete_undoes_it(node: Node) -> None:
    async with node.manager() as manager:
        await manager.reconcile()
        made = await manager.create(ask("site", "web", 18080))
        assert (made.target, made.instance_id) == (WEB.address, WEB.instance_id)
        assert node.network.table == [(18080, "192.168.100.2", 80)]
        assert (await manager.get("site")) == made == (await manager.get(made.id))
        stored = json.loads(node.paths.ingress_metadata(made.id).read_text())
        assert IngressRecord.from_json(stored) == made
        udp = await manager.create(ask("dns", "db", 18080, 53, protocol="udp"))
        assert [i.name for i in await manager.list()] == ["site", "dns"]
        assert node.network.published[-1][1].protocol is Protocol.UDP
        await manager.delete("site")
        assert node.network.table == [(18080, "192.168.100.3", 53)]
        assert node.on_disk() == [udp.id]
        with pytest.raises(IngressNotFound):
            await manager.get("site")
    assert node.changes == [
        ("ingress.created", "site"),
        ("ingress.created", "dns"),
        ("ingress.deleted", "site"),
    ]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"name": "Bad", "instance_id": "web", "host_port": 18081, "guest_port": 80}, "name"),
        ({"name": "x", "instance_id": "web", "host_port": 0, "guest_port": 80}, "host_port"),
        ({"name": "x", "instance_id": "web", "host_port": 18081, "guest_port": 65536}, "guest"),
        ({"name": "x", "instance_id": "web", "host_port": "80", "guest_port": 80}, "whole"),
        ({"name": "x", "instance_id": "web", "host_port": True, "guest_port": 80}, "whole"),
        ({"name": "x", "instance_id": "web", "host_port": 18081}, "missing"),
        ({"name": "x", "instance_id": "web", "host_port": 1, "guest_port": 1, "y": 1}, "unknown"),
        (
            {"name": "x", "instance_id": "web", "host_port": 1, "guest_port": 1,
             "protocol": "sctp"},
            "protocol",
        ),
        (
            {"name": "x", "instance_id": "web", "host_port": 1, "guest_port": 1,
             "listen_address": "::1"},
            "IPv4",
        ),
        (
            {"name": "x", "instance_id": "web", "host_port": 1, "guest_port": 1,
             "listen_address": "0.0.0.0"},
            "unicast",
        ),
        ({"name": "abcdef012345", "instance_id": "web", "host_port": 1, "guest_port": 1},
         "read as an ingress id"),
        ({"name": "x", "instance_id": "web", "host_port": 1, "guest_port": 1,
          "listen_address": 2130706433}, "must be a string"),
        ({"name": "x", "instance_id": "web", "host_port": 1, "guest_port": 1,
          "listen_address": "255.255.255.255"}, "unicast"),
        ([], "object"),
    ],
)  # fmt: skip
async def test_a_malformed_request_is_refused_on_its_own(body: object, error: str) -> None:
    with pytest.raises(InvalidIngressSpec, match=error):
        CreateIngress.from_json(body)


async def test_every_refusal_changes_nothing(node: Node) -> None:
    async with node.manager() as manager:
        await manager.reconcile()
        await manager.create(ask("site", "web", 18082))
        before, published = node.on_disk(), len(node.network.published)
        with pytest.raises(IngressExists):
            await manager.create(ask("site", "db", 18083))
        with pytest.raises(TargetNotFound):
            await manager.create(ask("other", "nobody", 18083))
        with pytest.raises(InstanceWithoutNetwork, match="without a network"):
            await manager.create(ask("other", "offline", 18083))
        # The same port and protocol on every address, or on one address inside "every".
        with pytest.raises(PortInUse, match="ingress 'site'"):
            await manager.create(ask("other", "db", 18082))
        with pytest.raises(PortInUse, match="ingress 'site'"):
            await manager.create(ask("other", "db", 18082, listen_address="127.0.0.1"))
        with pytest.raises(InvalidIngressSpec, match="not an address of this host"):
            await manager.create(ask("other", "db", 18083, listen_address="203.0.113.9"))
        # A port a process on the host listens on.
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            taken = listener.getsockname()[1]
            with pytest.raises(PortInUse, match="in use by a process"):
                await manager.create(ask("other", "db", taken))
        assert node.on_disk() == before
        assert len(node.network.published) == published
        # The other protocol on the same port is another port.
        await manager.create(ask("other", "db", 18082, protocol="udp"))


async def test_a_node_without_networking_forwards_nothing(node: Node) -> None:
    async def lookup(key: str) -> Target | None:
        return WEB

    async with IngressManager(node.paths, None, lookup=lookup) as manager:
        await manager.reconcile()
        with pytest.raises(InstanceWithoutNetwork, match="no networking"):
            await manager.create(ask("site", "web", 18084))
        assert await manager.list() == []


async def test_rules_that_cannot_be_installed_leave_no_ingress(node: Node) -> None:
    async with node.manager() as manager:
        await manager.reconcile()
        node.network.fail = True
        with pytest.raises(NatError):
            await manager.create(ask("site", "web", 18085))
        assert (await manager.list(), node.on_disk()) == ([], [])
    assert node.changes == []


async def test_an_instance_delete_takes_its_ingresses(node: Node) -> None:
    async with node.manager() as manager:
        await manager.reconcile()
        await manager.create(ask("one", "web", 18086))
        await manager.create(ask("two", "web", 18087))
        kept = await manager.create(ask("three", "db", 18088))
        await manager.instance_removed(WEB.instance_id)
        assert [i.name for i in await manager.list()] == ["three"]
        assert node.on_disk() == [kept.id]
        assert node.network.table == [(18088, "192.168.100.3", 80)]
        await manager.instance_removed("ffffffffffff")  # none of its own: the table stays
        assert node.network.table == [(18088, "192.168.100.3", 80)]


async def test_a_restart_publishes_the_records_and_settles_what_changed(node: Node) -> None:
    async with node.manager() as manager:
        await manager.reconcile()
        await manager.create(ask("one", "web", 18089))
        await manager.create(ask("two", "db", 18090))
    # While the dataplane was down: db was deleted, web moved, and a record was damaged.
    del node.instances[DB.instance_id]
    moved = IPv4Address("192.168.100.9")
    node.instances[WEB.instance_id] = Target(WEB.instance_id, moved)
    broken = node.paths.ingress_dir("dddddddddddd")
    broken.mkdir()
    (broken / "metadata.json").write_text("{not json")
    (node.paths.ingresses / ".creating-eeeeeeeeeeee").mkdir()
    node.changes.clear()
    network = FakeNetwork()
    async with node.manager(network) as manager:
        await manager.reconcile()
        assert [(i.name, i.target) for i in await manager.list()] == [("one", moved)]
        assert network.table == [(18089, "192.168.100.9", 80)]
    assert node.changes == [("ingress.deleted", "two")]
    assert len(node.on_disk()) == 1
    quarantined = list((node.paths.quarantine_kind("ingresses")).iterdir())
    assert [q.name.split("-")[0] for q in quarantined] == ["dddddddddddd"]


def test_a_udp_service_that_shares_its_port_is_still_found() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as service:
        # SO_REUSEADDR lets a second UDP socket that sets it too bind the same port; the probe
        # must not be that second socket.
        service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        service.bind(("0.0.0.0", 0))
        port = service.getsockname()[1]
        with pytest.raises(PortInUse):
            ports.check_free(Protocol.UDP, None, port)
    ports.check_free(Protocol.UDP, None, port)
