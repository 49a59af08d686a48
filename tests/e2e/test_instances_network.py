"""Instances on the network, for real: TAP, bridge, addresses, isolation, NAT-free reachability.

The dataplane runs inside a network namespace this test creates (it serves on a Unix socket,
since the namespace's loopback is out of reach), so its bridge, TAPs and nftables rules never
touch the machine's own network. The image arrives by archive import (a registry on the host's
loopback is out of the namespace's reach too). A web server the test starts inside the
namespace answers on the gateway address; guests fetch from it through TAP and bridge.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.apps import busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.netns import network_namespace, unavailable_reason
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import RunningServer, run_server

REASON = unavailable_reason() or (
    None if shutil.which("qemu-system-x86_64") else "qemu-system-x86_64 is not installed"
)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.skipif(
        REASON is not None, reason=REASON or "network namespaces and QEMU are available"
    ),
]

GATEWAY = "192.168.100.1"
SUBNET = "192.168.100.0/29"  # 5 instance addresses: small enough to run out of
PAGE = "hello from the gateway"
BOUND = 120.0

# Fetches the page from the gateway and pings a neighbour, once a second, forever: the
# log shows what the network allowed at every moment, before and after standby.
PROBE = """#!/bin/sh
while :; do
  # (busybox-static segfaults on wget -T; timeout bounds the wait instead)
  if page=$(timeout 3 wget -q -O - http://GATEWAY:8000/page.txt 2>/dev/null); then
    echo "fetch ok: $page"
  else
    echo "fetch failed"
  fi
  if [ -n "$PEER" ]; then
    if ping -c 1 -W 1 "$PEER" >/dev/null 2>&1; then
      echo "peer reachable"
    else
      echo "peer unreachable"
    fi
  fi
  sleep 1
done
""".replace("GATEWAY", GATEWAY)


@dataclass
class Net:
    server: RunningServer
    client: httpx.Client
    namespace: str
    isolated: bool
    data_dir: Path


def start_web_server(namespace: str, root: Path) -> subprocess.Popen[bytes]:
    (root / "page.txt").write_text(PAGE)
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "http.server", "8000",
         "--bind", "0.0.0.0", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["isolated", "open"])
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp(f"net-{request.param}")
    artifacts = shared_artifacts()
    image = make_image(
        busybox_layers({"/app/probe": PROBE}),
        config={"Entrypoint": ["/app/probe"], "Env": ["PATH=/bin"]},
    )
    archive = tmp / "probe.tar"
    write_oci_archive(archive, image, name="tests/probe:v1")
    env = {
        "HYPERVISOR": "qemu",
        "KERNEL_PATH": str(artifacts.bzimage),
        "INITRD_PATH": str(artifacts.initrd),
        "SUBNET_CIDR": SUBNET,
        "SUBNET_GATEWAY": GATEWAY,
        "NETWORK_ISOLATION": "true" if request.param == "isolated" else "false",
    }
    web_root = tmp / "www"
    web_root.mkdir()
    with network_namespace() as namespace:
        subprocess.run(
            ["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"], check=True
        )
        web = start_web_server(namespace, web_root)
        try:
            with (
                run_server(tmp / "data", env, netns=namespace) as server,
                server.client(BOUND) as client,
            ):
                imported = client.post(
                    "/images/import",
                    content=archive.read_bytes(),
                    headers={"content-type": "application/x-tar"},
                )
                assert imported.status_code == 202, imported.text
                wait_image(client, imported.json()["digest"])
                yield Net(server, client, namespace, request.param == "isolated", tmp / "data")
                for instance in client.get("/instances").json():
                    client.delete(f"/instances/{instance['id']}")
                assert taps(namespace) == [], "every TAP goes with its instance"
        finally:
            web.terminate()
            web.wait(10)


def wait_image(client: httpx.Client, digest: str) -> None:
    deadline = time.monotonic() + BOUND
    while (image := client.get(f"/images/{digest}").json())["status"] != "ready":
        assert image["status"] != "failed", image
        assert time.monotonic() < deadline
        time.sleep(0.1)


def taps(namespace: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "ip", "-o", "link", "show", "type", "tun"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines() if line.strip()]


def create(net: Net, name: str, **extra: Any) -> dict[str, Any]:
    response = net.client.post(
        "/instances",
        json={"name": name, "image": "tests/probe:v1", "network": {"enabled": True}, **extra},
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def app_lines(net: Net, instance_id: str) -> list[str]:
    body = net.client.get(f"/instances/{instance_id}/logs").text
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def wait_line(net: Net, instance_id: str, wanted: str, *, after: int = 0) -> int:
    """Wait until ``wanted`` appears in the app log past line ``after``; return its index."""
    deadline = time.monotonic() + BOUND
    while True:
        lines = app_lines(net, instance_id)
        for index in range(after, len(lines)):
            if lines[index] == wanted:
                return index
        assert time.monotonic() < deadline, f"no {wanted!r}; last lines: {lines[-8:]}"
        time.sleep(0.2)


def test_instances_reach_the_gateway_and_isolation_decides_the_rest(net: Net) -> None:
    first = create(net, "alpha")
    ip_a = first["network"]["ip"].split("/")[0]
    second = create(net, "beta", env={"PEER": ip_a})
    assert first["network"]["ip"] != second["network"]["ip"]
    assert first["network"]["mac"] != second["network"]["mac"]
    assert len(taps(net.namespace)) == 2

    wait_line(net, first["id"], f"fetch ok: {PAGE}")
    wait_line(net, second["id"], "peer unreachable" if net.isolated else "peer reachable")


def test_standby_and_restore_keep_the_address_and_the_network(net: Net) -> None:
    instance = create(net, "gamma")
    wait_line(net, instance["id"], f"fetch ok: {PAGE}")
    tap_count = len(taps(net.namespace))
    standby = net.client.post(f"/instances/{instance['id']}/standby").json()
    assert standby["state"] == "Standby"
    assert len(taps(net.namespace)) == tap_count - 1, "standby releases the TAP"
    seen = len(app_lines(net, instance["id"]))
    restored = net.client.post(f"/instances/{instance['id']}/restore").json()
    assert restored["state"] == "Running"
    assert restored["network"] == instance["network"]
    wait_line(net, instance["id"], f"fetch ok: {PAGE}", after=seen)


def test_running_out_of_addresses_is_a_clear_error_that_leaves_nothing(net: Net) -> None:
    existing = net.client.get("/instances").json()
    made = [create(net, f"idle-{n}", start=False) for n in range(5 - len(existing))]
    before_taps = taps(net.namespace)
    instances_dir = net.data_dir / "instances"
    before_dirs = sorted(p.name for p in instances_dir.iterdir())
    response = net.client.post(
        "/instances",
        json={"name": "one-too-many", "image": "tests/probe:v1", "network": {"enabled": True}},
    )
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "addresses_exhausted"
    assert taps(net.namespace) == before_taps
    assert sorted(p.name for p in instances_dir.iterdir()) == before_dirs
    for instance in made:
        assert net.client.delete(f"/instances/{instance['id']}").status_code == 204
