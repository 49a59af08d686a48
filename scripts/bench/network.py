"""Networking: an ingress against a direct connection to the guest, and bandwidth limits
against what they promise, in one run.

The dataplane runs in a network namespace this script creates, with a QEMU/TCG guest that
serves a file over HTTP (busybox httpd) and sinks whatever arrives on a second port. A
client namespace, on another network, reaches the guest two ways: directly at its address
(routed through the host) and through an ingress on the host's address (DNAT in our
nftables table). TCG bounds the absolute figures; the ratios are what count.

1. Connection setup: a TCP connect and close, ``--connects`` times each way, p50 and p95.
2. Throughput: a download of ``--megabytes`` MB from the guest each way.
3. Bandwidth limits: a second guest limited to a rate well under what the first reached,
   a download (what the guest sends, shaped on its IFB) and an upload (what it receives,
   shaped on its TAP), each as a share of the limit. The target is within 15%.

Exits 1 when a limit is missed by more than 15%.

    .venv/bin/python scripts/bench/network.py [--connects 200] [--megabytes 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.apps import busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.netns import link_namespaces, network_namespace, unavailable_reason
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import import_image, run_server

BOUND = 180.0
HOST = "10.79.0.1"
CLIENT = "10.79.0.2"
SUBNET = "192.168.100.0/24"
TOLERANCE = 0.15

# Serves /tmp/big (SIZE bytes) on port 80 and sinks port 9000, answering "received" once the
# sender is done, so an upload is timed to its last byte in the guest, not in a socket buffer.
TRAFFIC = """head -c SIZE /dev/zero > /tmp/big
httpd -p 80 -h /tmp
echo serving
exec nc -ll -p 9000 -e /app/sink
"""
SINK = "#!/bin/sh\ncat > /dev/null\necho received\n"

# Run in the client's namespace; prints one JSON object.
CLIENT_SCRIPT = """
import json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "connect":
    samples = []
    for _ in range(int(sys.argv[4])):
        start = time.perf_counter()
        socket.create_connection((host, port), timeout=30).close()
        samples.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"ms": samples}))
elif mode == "get":
    with socket.create_connection((host, port), timeout=60) as s:
        start = time.perf_counter()
        s.sendall(b"GET /big HTTP/1.0\\r\\n\\r\\n")
        size = 0
        while chunk := s.recv(1 << 16):
            size += len(chunk)
        seconds = time.perf_counter() - start
    print(json.dumps({"bytes": size, "seconds": seconds}))
else:
    size = int(sys.argv[4])
    with socket.create_connection((host, port), timeout=60) as s:
        start = time.perf_counter()
        s.sendall(bytes(size))
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
        seconds = time.perf_counter() - start
        assert answer == b"received\\n", answer
    print(json.dumps({"bytes": size, "seconds": seconds}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=16)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    size = args.megabytes << 20
    artifacts = shared_artifacts()
    with tempfile.TemporaryDirectory(prefix="network-bench-") as tmp_name:
        tmp = Path(tmp_name)
        archive = tmp / "traffic.tar"
        image = make_image(
            busybox_layers(
                {
                    "/app/traffic": "#!/bin/sh\n" + TRAFFIC.replace("SIZE", str(size)),
                    "/app/sink": SINK,
                }
            ),
            config={"Entrypoint": ["/app/traffic"], "Env": ["PATH=/bin"]},
        )
        write_oci_archive(archive, image, name="bench/traffic:v1")
        env = {
            "HYPERVISOR": "qemu",
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
            "SUBNET_CIDR": SUBNET,
            "LOG_LEVEL": "warning",
        }
        with (
            network_namespace() as namespace,
            client_network(namespace) as client_ns,
            run_server(tmp / "data", env, netns=namespace) as server,
            server.client(BOUND) as client,
        ):
            import_image(client, archive, BOUND)
            plain = boot(client, "plain", {"enabled": True})
            guest = plain["network"]["ip"].split("/")[0]
            ingress(client, "plain-http", "plain", 8080, 80)
            ingress(client, "plain-sink", "plain", 9001, 9000)
            run_client(client_ns, "connect", guest, 80, 5)  # both paths warm
            run_client(client_ns, "connect", HOST, 8080, 5)
            connects(client_ns, guest, args.connects)
            top = throughput(client_ns, guest, size)
            limit = max(1, min(200, int(top / 4)))
            failed = limits(client, client_ns, limit, size)
    return 1 if failed else 0


@contextmanager
def client_network(namespace: str) -> Iterator[str]:
    with network_namespace() as client_ns:
        link_namespaces(namespace, client_ns, "dpt-bench", f"{HOST}/24", f"{CLIENT}/24")
        # The direct path: the guests' subnet through the host, no NAT either way.
        subprocess.run(
            ["ip", "-n", client_ns, "route", "add", SUBNET, "via", HOST],
            check=True,
            capture_output=True,
        )
        yield client_ns


def boot(client: httpx.Client, name: str, network: dict[str, Any]) -> dict[str, Any]:
    made = client.post(
        "/instances", json={"name": name, "image": "bench/traffic:v1", "network": network}
    )
    assert made.status_code == 201, made.text
    deadline = time.monotonic() + BOUND
    while "serving" not in client.get(f"/instances/{name}/logs").text:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start serving")
        time.sleep(0.2)
    return dict(made.json())


def ingress(client: httpx.Client, name: str, instance: str, host_port: int, port: int) -> None:
    body = {"name": name, "instance_id": instance, "host_port": host_port, "guest_port": port}
    made = client.post("/ingresses", json=body)
    assert made.status_code == 201, made.text


def run_client(namespace: str, *args: object) -> dict[str, Any]:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT_SCRIPT,
         *(str(a) for a in args)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the client's {args[0]} failed: {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connects(client_ns: str, guest: str, count: int) -> None:
    direct = run_client(client_ns, "connect", guest, 80, count)["ms"]
    through = run_client(client_ns, "connect", HOST, 8080, count)["ms"]
    print(f"\n== TCP connect + close from another network (n={count}) ==")
    print(f"{'path':<32}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'direct to the guest (routed)':<32}{percentile(direct, 0.5):10.3f}"
          f"{percentile(direct, 0.95):10.3f}")  # fmt: skip
    print(f"{'through the ingress (DNAT)':<32}{percentile(through, 0.5):10.3f}"
          f"{percentile(through, 0.95):10.3f}")  # fmt: skip
    print(f"ingress / direct p50: {percentile(through, 0.5) / percentile(direct, 0.5):.2f}")


def mbits(result: dict[str, Any]) -> float:
    return float(result["bytes"]) * 8 / float(result["seconds"]) / 1e6


def throughput(client_ns: str, guest: str, size: int) -> float:
    direct = mbits(run_client(client_ns, "get", guest, 80))
    through = mbits(run_client(client_ns, "get", HOST, 8080))
    print(f"\n== download of {size >> 20} MB from the guest ==")
    print(f"{'path':<32}{'Mbit/s':>10}")
    print(f"{'direct to the guest (routed)':<32}{direct:10.1f}")
    print(f"{'through the ingress (DNAT)':<32}{through:10.1f}")
    print(f"ingress / direct: {through / direct:.2f}")
    return min(direct, through)


def limits(client: httpx.Client, client_ns: str, limit: int, size: int) -> bool:
    boot(
        client,
        "limited",
        {"enabled": True, "bandwidth": {"ingress_mbps": limit, "egress_mbps": limit}},
    )
    ingress(client, "limited-http", "limited", 8180, 80)
    ingress(client, "limited-sink", "limited", 9101, 9000)
    sent = run_client(client_ns, "get", HOST, 8180)
    received = run_client(client_ns, "put", HOST, 9101, size)
    print(f"\n== bandwidth limit of {limit} Mbit/s each way (tc on the TAP and its IFB) ==")
    print(f"{'direction':<32}{'Mbit/s':>10}{'/ limit':>10}")
    missed = False
    for label, result in (("guest sends (IFB tbf)", sent), ("guest receives (TAP tbf)", received)):
        rate = mbits(result)
        ratio = rate / limit
        missed |= abs(1 - ratio) > TOLERANCE
        print(f"{label:<32}{rate:10.1f}{ratio:10.2f}")
    print(f"target within {TOLERANCE:.0%} of the limit: {'MISSED' if missed else 'ok'}")
    return missed


if __name__ == "__main__":
    sys.exit(main())
