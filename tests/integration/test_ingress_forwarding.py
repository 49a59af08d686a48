"""Ingresses in the kernel, end to end through the real server, without booting guests.

The dataplane runs in a namespace this test creates, with simulated Cloud Hypervisor VMMs.
A second namespace plays the guest: a veth end on the dataplane's bridge that carries the
instance's address and runs an HTTP server and a UDP echo. A third plays a client on
another network, reaching the dataplane's namespace over a veth. So the packets take the
same path as a real guest's (prerouting DNAT, the bridge, conntrack on the way back), and
what is checked is what a user sees: the page through ``host_port``, from outside and from
the host itself, before and after restarts, a flushed table (a host reboot), and deletes.

The fault cases kill the server at ``ingress.recorded`` and ``ingress.removed`` and check
that the next start makes the table agree with the records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from managers.network.table import NAT_TABLE
from tests.support.apps import COUNTER, busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.ch_simulator import WRAPPER as SIMULATOR
from tests.support.ch_simulator.spec import missing_spec_reason
from tests.support.deploy import as_the_unit
from tests.support.netns import link_namespaces, network_namespace, unavailable_reason
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import import_image, run_server

REASON = unavailable_reason() or missing_spec_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(REASON is not None, reason=REASON or "namespaces and the CH spec"),
]

IMAGE = "tests/ingress:v1"
HOST_SIDE = "10.77.0.1"  # the dataplane's namespace, as the client sees it
CLIENT = "10.77.0.2"
PAGE = "hello from behind the ingress"
BOUND = 60.0

# Answers every datagram with "echo: " + the datagram, until killed.
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo: " + data, peer)
"""


# Appends every datagram it gets to a file, until killed.
UDP_RECORDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, _ = s.recvfrom(2048)
    with open(sys.argv[2], "ab") as out:
        out.write(data + b"\\n")
"""

# From the client's namespace: an Ethernet frame to the dataplane namespace's MAC carrying a
# UDP datagram for 127.0.0.1 (what no ordinary socket sends off-host, and what a forward
# listening on 127.0.0.1 must never take from another interface).
SPOOF = """
import socket, struct, sys
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
source, port, payload = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(source), socket.inet_aton("127.0.0.1"))
header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(("eth0", 0))
own = raw.getsockname()[4]
for _ in range(3):
    raw.send(mac + own + b"\\x08\\x00" + header + udp)
"""


@dataclass
class Site:
    namespace: str  # the dataplane's
    client_ns: str
    guest_ns: str
    data_dir: Path
    env: dict[str, str]
    instance_id: str = ""
    guest_address: str = ""
    received: Path | None = None

    def serve(self, failpoint: str | None = None, wrapper: list[str] | None = None) -> Any:
        env = dict(self.env)
        if failpoint is not None:
            env["DATAPLANE_FAILPOINT"] = failpoint
        return run_server(
            self.data_dir, env, netns=self.namespace, keep_vmms=True, wrapper=wrapper or []
        )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _in(namespace: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fetch(namespace: str, url: str) -> str:
    """The body at ``url`` fetched from inside ``namespace``, or the error's name."""
    script = (
        "import sys, urllib.request\n"
        "try:\n"
        "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode(), end='')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__ + ': ' + str(error), end='')\n"
    )
    return _in(namespace, sys.executable, "-c", script, url).stdout


def udp_echo(namespace: str, host: str, port: int) -> str:
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        "s.sendto(b'ping', (sys.argv[1], int(sys.argv[2])))\n"
        "try:\n"
        "    print(s.recv(2048).decode(), end='')\n"
        "except OSError as error:\n"
        "    print(type(error).__name__, end='')\n"
    )
    return _in(namespace, sys.executable, "-c", script, host, str(port)).stdout


def dnat_rules(namespace: str) -> list[str]:
    """The comments of our table's DNAT rules, prerouting and output (empty: no table)."""
    listed = _in(namespace, "nft", "-j", "list", "table", "ip", NAT_TABLE)
    if listed.returncode != 0:
        return []
    rules = [item["rule"] for item in json.loads(listed.stdout)["nftables"] if "rule" in item]
    return sorted(
        f"{rule['chain']}: {rule.get('comment', '')}"
        for rule in rules
        if rule["chain"] in ("prerouting", "output")
    )


def route_localnet(namespace: str) -> str:
    return _in(namespace, "cat", "/proc/sys/net/ipv4/conf/vmbr0/route_localnet").stdout.strip()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("ingress")
    artifacts = shared_artifacts()
    image = make_image(
        busybox_layers({"/app/counter": COUNTER}),
        config={"Entrypoint": ["/app/counter"], "Env": ["PATH=/bin"]},
    )
    archive = tmp / "app.tar"
    write_oci_archive(archive, image, name=IMAGE)
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text(PAGE)
    env = {
        "HYPERVISOR": "cloud-hypervisor",
        "CLOUD_HYPERVISOR_BIN": str(SIMULATOR),
        "CH_SIMULATOR_VIOLATIONS": str(tmp / "ch-violations.log"),
        "KERNEL_PATH": str(artifacts.bzimage),
        "INITRD_PATH": str(artifacts.initrd),
        "SUBNET_CIDR": "192.168.100.0/28",
        "SUBNET_GATEWAY": "192.168.100.1",
    }
    servers: list[subprocess.Popen[bytes]] = []
    with (
        network_namespace() as namespace,
        network_namespace() as client_ns,
        network_namespace() as guest_ns,
    ):
        found = Site(namespace, client_ns, guest_ns, tmp / "data", env)
        link_namespaces(namespace, client_ns, "dpt-cl0", f"{HOST_SIDE}/24", f"{CLIENT}/24")
        try:
            with found.serve() as server, server.client(BOUND) as client:
                import_image(client, archive, BOUND)
                made = client.post(
                    "/instances",
                    json={"name": "web", "image": IMAGE, "network": {"enabled": True}},
                )
                assert made.status_code == 201, made.text
                found.instance_id = made.json()["id"]
                found.guest_address = made.json()["network"]["ip"].split("/")[0]
            # The guest: the instance's address on a veth end in the dataplane's bridge.
            _ip("link", "add", "dpt-gs0", "netns", namespace, "type", "veth", "peer", "name",
                "eth0", "netns", guest_ns)  # fmt: skip
            _ip("-n", namespace, "link", "set", "dpt-gs0", "master", "vmbr0", "up")
            _ip("-n", guest_ns, "addr", "add", f"{found.guest_address}/28", "dev", "eth0")
            _ip("-n", guest_ns, "link", "set", "eth0", "up")
            _ip("-n", guest_ns, "route", "add", "default", "via", "192.168.100.1")
            web = ["-m", "http.server", "80", "--bind", "0.0.0.0", "--directory", str(www)]
            recorder = ["-c", UDP_RECORDER, "5454", str(tmp / "received.txt")]
            for command in (web, ["-c", UDP_ECHO, "5353"], recorder):
                servers.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", guest_ns, sys.executable, *command],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            deadline = time.monotonic() + BOUND
            while fetch(guest_ns, "http://127.0.0.1:80/") != PAGE:
                assert time.monotonic() < deadline, "the guest's web server did not start"
                time.sleep(0.1)
            found.received = tmp / "received.txt"
            yield found
        finally:
            for process in servers:
                process.kill()
                process.wait(10)
            with found.serve() as server, server.client(BOUND) as client:
                for instance in client.get("/instances").json():
                    client.delete(f"/instances/{instance['id']}")


def ingress(client: httpx.Client, name: str, host_port: int, **extra: Any) -> httpx.Response:
    return client.post(
        "/ingresses",
        json={"name": name, "instance_id": "web", "host_port": host_port, "guest_port": 80} | extra,
    )


def _clean(client: httpx.Client) -> None:
    for item in client.get("/ingresses").json():
        assert client.delete(f"/ingresses/{item['id']}").status_code == 204


def test_a_host_port_reaches_the_guest_from_outside_and_from_the_host(site: Site) -> None:
    with site.serve() as server, server.client(BOUND) as client:
        made = ingress(client, "site", 8080)
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["guest_address"] == site.guest_address
        assert body["instance_id"] == site.instance_id
        assert (body["protocol"], body["listen_address"]) == ("tcp", None)
        echo = ingress(client, "echo", 5353, guest_port=5353, protocol="udp")
        assert echo.status_code == 201, echo.text

        assert fetch(site.client_ns, f"http://{HOST_SIDE}:8080/") == PAGE
        assert fetch(site.namespace, "http://127.0.0.1:8080/") == PAGE
        assert fetch(site.namespace, f"http://{HOST_SIDE}:8080/") == PAGE
        assert udp_echo(site.client_ns, HOST_SIDE, 5353) == "echo: ping"
        assert route_localnet(site.namespace) == "1"
        assert dnat_rules(site.namespace) == sorted(
            f"{chain}: {forward_comment_for(item['id'])}"
            for chain in ("prerouting", "output")
            for item in (body, echo.json())
        )
        # One address of the host: the others do not answer on that port.
        one = ingress(client, "one", 8081, listen_address="127.0.0.1")
        assert one.status_code == 201, one.text
        assert fetch(site.namespace, "http://127.0.0.1:8081/") == PAGE
        assert fetch(site.client_ns, f"http://{HOST_SIDE}:8081/").startswith("URLError")
        _clean(client)
        assert dnat_rules(site.namespace) == []
        assert route_localnet(site.namespace) == "0"
        assert fetch(site.client_ns, f"http://{HOST_SIDE}:8080/").startswith("URLError")


def udp_socket_script(steps: str) -> str:
    return (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "def ask(host, port):\n"
        "    s.sendto(b'ping', (host, port))\n"
        "    try:\n"
        "        return s.recv(2048).decode()\n"
        "    except OSError as error:\n"
        "        return type(error).__name__\n" + steps
    )


def test_flows_follow_the_rules_as_they_change(site: Site) -> None:
    """One UDP socket keeps talking to the host port while the ingress comes and goes: the
    kernel's memory of a flow's NAT (conntrack) must not outlive, or predate, the rule."""
    script = udp_socket_script(
        "import time, json, urllib.request\n"
        "before = ask(sys.argv[1], 5353)\n"
        "print(before, flush=True)\n"
        "sys.stdin.readline()\n"
        "print(ask(sys.argv[1], 5353), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(ask(sys.argv[1], 5353), flush=True)\n"
    )
    with site.serve() as server, server.client(BOUND) as client:
        talker = subprocess.Popen(
            ["ip", "netns", "exec", site.client_ns, sys.executable, "-c", script, HOST_SIDE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert talker.stdin is not None
            assert talker.stdout is not None
            assert talker.stdout.readline().strip() != "echo: ping"  # nothing forwards yet
            made = ingress(client, "echo", 5353, guest_port=5353, protocol="udp")
            assert made.status_code == 201, made.text
            talker.stdin.write("\n")
            talker.stdin.flush()
            assert talker.stdout.readline().strip() == "echo: ping", "a flow begun earlier"
            assert client.delete("/ingresses/echo").status_code == 204
            talker.stdin.write("\n")
            talker.stdin.flush()
            assert talker.stdout.readline().strip() != "echo: ping", "a flow outlived its rule"
        finally:
            talker.kill()
            talker.wait(10)


def test_a_forward_on_127_0_0_1_takes_nothing_from_other_interfaces(site: Site) -> None:
    assert site.received is not None
    with site.serve() as server, server.client(BOUND) as client:
        made = ingress(
            client, "local", 5454, guest_port=5454, protocol="udp", listen_address="127.0.0.1"
        )
        assert made.status_code == 201, made.text
        mac = json.loads(_in(site.namespace, "ip", "-j", "link", "show", "dpt-cl0").stdout)[0][
            "address"
        ]
        spoofed = _in(site.client_ns, sys.executable, "-c", SPOOF, mac, CLIENT, "5454", "spoof")
        assert spoofed.returncode == 0, spoofed.stderr
        local = udp_socket_script("ask('127.0.0.1', 5454)\n")
        _in(site.namespace, sys.executable, "-c", local)
        deadline = time.monotonic() + 10
        while b"ping" not in (site.received.read_bytes() if site.received.exists() else b""):
            assert time.monotonic() < deadline, "the host's own datagram never arrived"
            time.sleep(0.1)
        assert b"spoof" not in site.received.read_bytes()
        _clean(client)


def test_conflicts_and_an_instance_without_a_network_are_refused(site: Site) -> None:
    listener = subprocess.Popen(
        ["ip", "netns", "exec", site.namespace, sys.executable, "-c",
         "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 9000)); s.listen(); "
         "print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline() == b"up\n"
        with site.serve() as server, server.client(BOUND) as client:
            assert ingress(client, "first", 8080).status_code == 201
            before = client.get("/ingresses").json()
            for response, code in [
                (ingress(client, "second", 8080), "port_in_use"),
                (ingress(client, "second", 8080, listen_address=HOST_SIDE), "port_in_use"),
                (ingress(client, "second", 9000), "port_in_use"),
                (ingress(client, "first", 8082), "ingress_exists"),
                (ingress(client, "second", 8082, instance_id="nobody"), "instance_not_found"),
                (ingress(client, "second", 8082, listen_address="203.0.113.7"), "invalid_ingress"),
            ]:
                assert response.status_code in (400, 404, 409), response.text
                assert response.json()["code"] == code, response.text
            offline = client.post("/instances", json={"name": "offline", "image": IMAGE})
            assert offline.status_code == 201, offline.text
            refused = ingress(client, "second", 8082, instance_id="offline")
            assert refused.status_code == 409, refused.text
            assert refused.json()["code"] == "instance_without_network"
            assert client.delete("/instances/offline").status_code == 204
            assert client.get("/ingresses").json() == before
            assert len(dnat_rules(site.namespace)) == 2
            _clean(client)
    finally:
        listener.kill()
        listener.wait(10)


def test_a_privileged_port_needs_the_capability(site: Site) -> None:
    wrapper = as_the_unit(without=("net_bind_service",))
    if not wrapper:
        pytest.skip("setpriv is not installed")
    with site.serve(wrapper=wrapper) as server, server.client(BOUND) as client:
        refused = ingress(client, "web80", 80)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "port_privileged"
        assert "CAP_NET_BIND_SERVICE" in refused.json()["message"]
        assert client.get("/ingresses").json() == []
    with site.serve(wrapper=as_the_unit()) as server, server.client(BOUND) as client:
        made = ingress(client, "web80", 80)
        assert made.status_code == 201, made.text
        assert fetch(site.client_ns, f"http://{HOST_SIDE}:80/") == PAGE
        _clean(client)


def test_rules_hold_across_a_restart_and_come_back_after_a_reboot(site: Site) -> None:
    with site.serve() as server, server.client(BOUND) as client:
        assert ingress(client, "site", 8080).status_code == 201
    # Stopped: the rules stay in the kernel for the guests that keep running.
    assert fetch(site.client_ns, f"http://{HOST_SIDE}:8080/") == PAGE
    # A host reboot empties the kernel's tables; the next start rebuilds ours from records.
    _in(site.namespace, "nft", "delete", "table", "ip", NAT_TABLE)
    assert fetch(site.client_ns, f"http://{HOST_SIDE}:8080/").startswith("URLError")
    with site.serve() as server, server.client(BOUND) as client:
        assert [i["name"] for i in client.get("/ingresses").json()] == ["site"]
        assert fetch(site.client_ns, f"http://{HOST_SIDE}:8080/") == PAGE
        _clean(client)


def test_an_instance_delete_takes_its_ingresses_with_events(site: Site) -> None:
    with site.serve() as server, server.client(BOUND) as client:
        doomed = client.post(
            "/instances", json={"name": "doomed", "image": IMAGE, "network": {"enabled": True}}
        )
        assert doomed.status_code == 201, doomed.text
        made = ingress(client, "doomed-site", 8083, instance_id="doomed")
        assert made.status_code == 201, made.text
        assert client.delete("/instances/doomed").status_code == 204
        assert client.get("/ingresses").json() == []
        assert dnat_rules(site.namespace) == []
        page = client.get("/events", params={"follow": "false", "type": "ingress."}).json()
        seen = [(e["type"], e["ingress_id"]) for e in page["events"]]
        assert seen[-2:] == [
            ("ingress.created", made.json()["id"]),
            ("ingress.deleted", made.json()["id"]),
        ]
        assert page["events"][-1]["data"]["name"] == "doomed-site"


@pytest.mark.parametrize("step", ["ingress.recorded", "ingress.removed"])
def test_sigkill_at_an_ingress_failpoint_leaves_table_and_records_agreeing(
    site: Site, step: str
) -> None:
    if step == "ingress.removed":
        with site.serve() as server, server.client(BOUND) as client:
            assert ingress(client, "victim", 8084).status_code == 201
    with site.serve(step) as server, server.client(BOUND) as client:
        if step == "ingress.recorded":
            with pytest.raises(httpx.TransportError):
                ingress(client, "victim", 8084)
        else:
            with pytest.raises(httpx.TransportError):
                client.delete("/ingresses/victim")
        assert server.process.wait(30) == -9, "the failpoint did not kill the dataplane"
    with site.serve() as server, server.client(BOUND) as client:
        listed = client.get("/ingresses").json()
        rules = dnat_rules(site.namespace)
        if step == "ingress.recorded":
            # Recorded is committed: the start installs what the crash cut short.
            [item] = listed
            assert rules == [
                f"output: {forward_comment_for(item['id'])}",
                f"prerouting: {forward_comment_for(item['id'])}",
            ]
            assert fetch(site.client_ns, f"http://{HOST_SIDE}:8084/") == PAGE
        else:
            assert listed == []
            assert rules == []
            assert fetch(site.client_ns, f"http://{HOST_SIDE}:8084/").startswith("URLError")
        _clean(client)
    assert not list((site.data_dir / "ingresses").glob(".*"))


def forward_comment_for(ingress_id: str) -> str:
    return f"dataplane ingress {ingress_id}"
