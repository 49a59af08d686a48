"""Instances on the network, for real: TAP, bridge, addresses, isolation, NAT-free reachability.

The dataplane runs inside a network namespace this test creates (it serves on a Unix socket,
since the namespace's loopback is out of reach), so its bridge, TAPs and nftables rules never
touch the machine's own network. The image arrives by archive import (a registry on the host's
loopback is out of the namespace's reach too). A web server the test starts inside the
namespace answers on the gateway address; guests fetch from it through TAP and bridge.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from managers.network.addressing import tap_name
from tests.support.apps import busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.deploy import as_the_unit
from tests.support.netns import link_namespaces, network_namespace, unavailable_reason
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import RunningServer, import_image, run_server

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
GUEST_PAGE = "hello from the guest's httpd"
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
        busybox_layers({"/app/probe": PROBE, "/app/www/index.html": GUEST_PAGE, "/app/sink": SINK}),
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
            # The isolated run serves with only the systemd unit's capabilities: what the unit
            # allows is enough for bridges, TAPs, nftables, QEMU, standby and restore.
            wrapper = as_the_unit() if request.param == "isolated" else []
            with (
                run_server(tmp / "data", env, netns=namespace, wrapper=wrapper) as server,
                server.client(BOUND) as client,
            ):
                import_image(client, archive, BOUND)
                yield Net(server, client, namespace, request.param == "isolated", tmp / "data")
                for instance in client.get("/instances").json():
                    client.delete(f"/instances/{instance['id']}")
                assert taps(namespace) == [], "every TAP goes with its instance"
        finally:
            web.terminate()
            web.wait(10)


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


def fetch(namespace: str, url: str) -> str:
    """The body at ``url`` fetched from inside ``namespace``, or the error's name."""
    script = (
        "import sys, urllib.request\n"
        "try:\n"
        "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode(), end='')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, end='')\n"
    )
    return subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", script, url],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip


def wait_page(namespace: str, url: str) -> None:
    deadline = time.monotonic() + BOUND
    while (seen := fetch(namespace, url)) != GUEST_PAGE:
        assert time.monotonic() < deadline, f"{url} from {namespace}: {seen}"
        time.sleep(0.3)


@contextmanager
def client_namespace(net: Net) -> Iterator[str]:
    """Another network: a namespace reaching the dataplane's at 10.78.0.1 over a veth."""
    with network_namespace() as client_ns:
        link_namespaces(
            net.namespace, client_ns, "dpt-cl" + client_ns[-6:], "10.78.0.1/24", "10.78.0.2/24"
        )
        yield client_ns


def ingress(net: Net, name: str, instance: str, host_port: int, guest_port: int) -> None:
    made = net.client.post(
        "/ingresses",
        json={"name": name, "instance_id": instance, "host_port": host_port,
              "guest_port": guest_port},
    )  # fmt: skip
    assert made.status_code == 201, made.text


def test_an_ingress_reaches_the_guest_before_and_after_standby(net: Net) -> None:
    instance = create(
        net, "httpd", entrypoint=["/bin/httpd"], cmd=["-f", "-p", "80", "-h", "/app/www"]
    )
    with client_namespace(net) as client_ns:
        ingress(net, "web", "httpd", 8080, 80)
        url = "http://10.78.0.1:8080/index.html"
        wait_page(client_ns, url)
        standby = net.client.post(f"/instances/{instance['id']}/standby")
        assert standby.json()["state"] == "Standby", standby.text
        assert fetch(client_ns, url) != GUEST_PAGE
        restored = net.client.post(f"/instances/{instance['id']}/restore")
        assert restored.json()["state"] == "Running", restored.text
        wait_page(client_ns, url)
        assert net.client.delete(f"/instances/{instance['id']}").status_code == 204
        assert net.client.get("/ingresses").json() == []
        assert fetch(client_ns, url) != GUEST_PAGE


# The guest serves a file of TRANSFER bytes (what it sends) and sinks whatever arrives on
# port 9000 (what it receives), saying "received" once the sender is done, so the sender's
# clock stops when the bytes are in the guest rather than in its own socket buffer.
TRANSFER = 3_000_000
LIMIT_MBPS = 8
SINK = "#!/bin/sh\ncat > /dev/null\necho received\n"
TRAFFIC = f"""head -c {TRANSFER} /dev/zero > /tmp/big
httpd -p 80 -h /tmp
echo serving
exec nc -ll -p 9000 -e /app/sink
"""

# Times one transfer from the client's side: "get URL" reads the whole body, "put HOST PORT"
# sends TRANSFER bytes and waits for the guest's "received". Prints bytes and seconds.
MEASURE = """
import socket, sys, time, urllib.request
start = time.monotonic()
if sys.argv[1] == "get":
    size = len(urllib.request.urlopen(sys.argv[2], timeout=60).read())
else:
    size = int(sys.argv[4])
    with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=60) as s:
        s.sendall(bytes(size))
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
        assert answer == b"received\\n", answer
print(size, time.monotonic() - start)
"""


def measure(client_ns: str, *args: str) -> float:
    """Mbit/s of one transfer, timed in the client's namespace."""
    done = subprocess.run(
        ["ip", "netns", "exec", client_ns, sys.executable, "-c", MEASURE, *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    size, seconds = done.stdout.split()
    assert int(size) == TRANSFER
    return int(size) * 8 / float(seconds) / 1e6


def test_bandwidth_limits_hold_both_ways_and_change_while_running(net: Net) -> None:
    instance = create(
        net,
        "shaped",
        entrypoint=["/bin/sh", "-c", TRAFFIC],
        network={
            "enabled": True,
            "bandwidth": {"ingress_mbps": LIMIT_MBPS, "egress_mbps": LIMIT_MBPS},
        },
    )
    assert instance["network"]["bandwidth"] == {
        "ingress_mbps": LIMIT_MBPS,
        "egress_mbps": LIMIT_MBPS,
    }
    wait_line(net, instance["id"], "serving")
    with client_namespace(net) as client_ns:
        ingress(net, "shaped-http", "shaped", 8081, 80)
        ingress(net, "shaped-sink", "shaped", 9001, 9000)
        # Generous bounds: a limit that holds keeps each direction near LIMIT_MBPS; none
        # would let a loopback-fast transfer through (only the upper bound is asserted: a
        # slow machine may fall short of the limit, never past it).
        sent = measure(client_ns, "get", "http://10.78.0.1:8081/big")
        received = measure(client_ns, "put", "10.78.0.1", "9001", str(TRANSFER))
        assert sent < LIMIT_MBPS * 1.5, f"the guest sent at {sent:.1f} Mbit/s"
        assert received < LIMIT_MBPS * 1.5, f"the guest received at {received:.1f} Mbit/s"
        lifted = net.client.patch(
            f"/instances/{instance['id']}", json={"network": {"bandwidth": {}}}
        )
        assert lifted.status_code == 200, lifted.text
        assert lifted.json()["network"]["bandwidth"] == {"ingress_mbps": None, "egress_mbps": None}
        assert shaping_qdiscs(net.namespace, instance["id"]) == []
        assert measure(client_ns, "get", "http://10.78.0.1:8081/big") > 0
        limited = net.client.patch(
            f"/instances/{instance['id']}",
            json={"network": {"bandwidth": {"ingress_mbps": 4}}},
        )
        assert limited.status_code == 200, limited.text
        assert shaping_qdiscs(net.namespace, instance["id"]) == ["tbf"]
    assert net.client.delete(f"/instances/{instance['id']}").status_code == 204
    assert net.client.get("/ingresses").json() == []
    assert ifbs(net.namespace) == [], "the IFB goes with its instance"


def shaping_qdiscs(namespace: str, instance_id: str) -> list[str]:
    """The kinds of the shaping qdiscs on the instance's TAP (tbf, ingress)."""
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "-j", "qdisc", "show", "dev",
         tap_name(instance_id)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(q["kind"] for q in json.loads(out) if q["kind"] in ("tbf", "ingress"))


def ifbs(namespace: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "ip", "-o", "link", "show", "type", "ifb"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.split(": ")[1] for line in out.splitlines() if line.strip()]


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
