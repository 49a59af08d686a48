"""API overhead: contract validation on vs off, against real servers, in one run.

Starts two dataplane servers on 127.0.0.1 (CONTRACT_VALIDATION=true and false),
sends the same sequential keep-alive requests to each, interleaved in rounds so
that machine noise hits both alike, and prints requests/s, p50 and p99 latency,
the on/off ratio, and the validation cost per request at p50 (target < 1 ms).

Then, in this process, the response check of a ``GET /instances`` body of 20 and
of 200 instances: the contract as served (jsonschema-rs first) against the same
contract with every schema left to jsonschema (``Contract(fast=False)``), and the
ratio.

Last, the node endpoints on a server running 20 and then 200 instances on the Cloud Hypervisor
simulator: p50 and p99 of ``GET /metrics`` and ``GET /resources`` (target: p50 under 10 ms
with 200 instances), each against ``GET /health`` and ``GET /instances`` measured in the same
rounds. Skipped, with the reason, when the simulator's reference spec is absent.

    .venv/bin/python scripts/bench/api.py [--requests N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from openapi_core.datatypes import RequestParameters

from dataplane.contract import Contract, _HeaderDict, _MultiDict, _Request, _Response
from dataplane.representations import instance_json
from dataplane.spec import Spec
from managers.instances.types import (
    GuestStatus,
    ImageRef,
    Instance,
    InstanceRecord,
    InstanceState,
    NetworkRecord,
)
from tests.support.apps import COUNTER, push_app
from tests.support.artifacts import shared_artifacts
from tests.support.ch_simulator import WRAPPER as SIMULATOR
from tests.support.ch_simulator.spec import missing_spec_reason
from tests.support.registry import running_registry
from tests.support.server import run_server

ENDPOINTS = ("/health", "/spec.json")
NODE_ENDPOINTS = ("/health", "/instances", "/metrics", "/resources")
NODE_TARGET_MS = 10.0


def measure(client: httpx.Client, path: str, count: int) -> list[float]:
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        samples.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"{path} answered {response.status_code}: {response.text[:200]}")
    return samples


def sample_instance() -> dict[str, Any]:
    """One instance as the API serves it, made by the API's own serializer so it cannot drift."""
    record = InstanceRecord(
        id="0123456789ab",
        name="web-0",
        created_at="2026-11-23T10:00:00.000Z",
        image=ImageRef(
            name="registry.example:5000/team/web:1.4",
            digest="sha256:" + "ab" * 32,
            format="erofs",
            disk="/var/lib/dataplane/images/ab/rootfs.erofs",
        ),
        hypervisor="cloud-hypervisor",
        vcpus=2,
        memory_mb=512,
        memory_max_mb=1024,
        overlay_size_mb=1024,
        env={"PORT": "8080", "MODE": "production"},
        entrypoint=None,
        cmd=("/app/web", "--port", "8080"),
        workdir="/app",
        network=NetworkRecord(
            enabled=True, address="10.100.0.7/24", mac="02:00:0a:64:00:07", gateway="10.100.0.1"
        ),
        booted=True,
    )
    guest = GuestStatus(boot=1, program_started_at="2026-11-23T10:00:01.250Z")
    return instance_json(
        Instance(
            id=record.id,
            name=record.name,
            state=InstanceState.RUNNING,
            guest=guest,
            record=record,
            pid=4242,
        )
    )


def list_check_ms(contract: Contract, count: int, rounds: int = 60) -> float:
    """Median time to check one GET /instances answer of ``count`` instances."""
    instance = sample_instance()
    body = json.dumps([dict(instance, name=f"web-{n}") for n in range(count)]).encode()
    request = _Request(
        method="get",
        path="/instances",
        path_pattern="/instances",
        parameters=RequestParameters(query=_MultiDict(), header=_HeaderDict(), cookie={}, path={}),
        content_type="",
        body=None,
    )
    response = _Response(200, "application/json", _HeaderDict(), body)
    if contract.response_errors(request, response):
        raise SystemExit("the benchmark's instance list does not match the spec")
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        contract.response_errors(request, response)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def node_section(counts: tuple[int, ...], requests: int) -> bool:
    """/metrics and /resources with ``counts`` simulator instances; True when over target."""
    reason = missing_spec_reason()
    if reason is not None:
        print(f"\nnode endpoints: skipped ({reason})")
        return False
    failed = False
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        root = Path(tmp)
        artifacts = shared_artifacts()
        with running_registry(root / "registry") as registry:
            image = push_app(
                registry.host,
                "bench/counter",
                {"/app/counter": COUNTER},
                entrypoint=["/app/counter"],
            )
            env = {
                "HYPERVISOR": "cloud-hypervisor",
                "CLOUD_HYPERVISOR_BIN": str(SIMULATOR),
                "CH_SIMULATOR_VIOLATIONS": str(root / "ch-violations.log"),
                "INSECURE_REGISTRIES": registry.host,
                "KERNEL_PATH": str(artifacts.bzimage),
                "INITRD_PATH": str(artifacts.initrd),
                "LOG_LEVEL": "warning",
                # 200 one-vCPU instances on a small host: room for all of them.
                "CPU_OVERSUB_RATIO": "1000",
            }
            with (
                run_server(root / "data", env) as server,
                httpx.Client(base_url=server.url, timeout=120) as client,
            ):
                client.post("/images", json={"name": image}).raise_for_status()
                deadline = time.monotonic() + 300
                while client.get(f"/images/{image.replace('/', '%2F')}").json()["status"] != (
                    "ready"
                ):
                    if time.monotonic() > deadline:
                        raise SystemExit("the benchmark image did not build")
                    time.sleep(0.2)
                made = 0
                print("\nnode endpoints on the Cloud Hypervisor simulator (ms)")
                print(f"{'instances':>9} {'endpoint':<11} {'p50':>7} {'p99':>7} "
                      f"{'/health':>8} {'/instances':>11}")  # fmt: skip
                for count in counts:
                    while made < count:
                        answer = client.post(
                            "/instances",
                            json={"name": f"sim-{made}", "image": image, "memory_mb": 64,
                                  "overlay_size_mb": 64},
                        )  # fmt: skip
                        if answer.status_code != 201:
                            raise SystemExit(f"create answered {answer.status_code}: {answer.text}")
                        made += 1
                    samples: dict[str, list[float]] = {path: [] for path in NODE_ENDPOINTS}
                    for path in NODE_ENDPOINTS:
                        measure(client, path, 20)  # warm-up
                    for _ in range(10):
                        for path in NODE_ENDPOINTS:
                            samples[path].extend(measure(client, path, max(1, requests // 10)))
                    p50 = {path: percentile(s, 0.5) * 1e3 for path, s in samples.items()}
                    for path in ("/metrics", "/resources"):
                        p99 = percentile(samples[path], 0.99) * 1e3
                        over = count >= 200 and p50[path] >= NODE_TARGET_MS
                        failed |= over
                        verdict = ""
                        if count >= 200:
                            verdict = "  (target p50 < 10 ms: " + ("OVER" if over else "ok") + ")"
                        print(
                            f"{count:>9} {path:<11} {p50[path]:7.2f} {p99:7.2f} "
                            f"{p50[path] / p50['/health']:7.1f}x "
                            f"{p50[path] / p50['/instances']:10.2f}x{verdict}"
                        )
                    print(
                        f"{count:>9} {'(baseline)':<11} /health p50 {p50['/health']:.2f}, "
                        f"/instances p50 {p50['/instances']:.2f}"
                    )
                for instance in client.get("/instances").json():
                    client.delete(f"/instances/{instance['id']}")
    return failed


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="per endpoint and mode")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--node-requests", type=int, default=200, help="per node endpoint")
    args = parser.parse_args()
    per_round = max(1, args.requests // args.rounds)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {
            mode: stack.enter_context(
                run_server(
                    Path(tmp) / mode / "data",
                    {
                        "CONTRACT_VALIDATION": "true" if mode == "on" else "false",
                        "LOG_LEVEL": "warning",
                    },
                )
            )
            for mode in ("on", "off")
        }
        clients = {
            mode: stack.enter_context(httpx.Client(base_url=s.url)) for mode, s in servers.items()
        }
        samples: dict[tuple[str, str], list[float]] = {}
        for path in ENDPOINTS:
            for mode in clients:
                measure(clients[mode], path, 200)  # warm-up: caches, connections
            for _ in range(args.rounds):
                for mode in clients:
                    samples.setdefault((path, mode), []).extend(
                        measure(clients[mode], path, per_round)
                    )

    print(f"{'endpoint':<12} {'mode':<4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    failed = False
    for path in ENDPOINTS:
        for mode in ("off", "on"):
            s = samples[(path, mode)]
            print(
                f"{path:<12} {mode:<4} {len(s) / sum(s):8.0f} "
                f"{percentile(s, 0.5) * 1e3:8.3f} {percentile(s, 0.99) * 1e3:8.3f}"
            )
        on, off = samples[(path, "on")], samples[(path, "off")]
        cost_ms = (statistics.median(on) - statistics.median(off)) * 1e3
        ratio = statistics.median(on) / statistics.median(off)
        verdict = "ok" if cost_ms < 1.0 else "OVER TARGET"
        failed |= cost_ms >= 1.0
        print(
            f"{path:<12} validation on/off p50 ratio {ratio:.2f}; "
            f"cost {cost_ms:.3f} ms per request (target < 1 ms: {verdict})"
        )

    spec = Spec.load()
    served, reference = Contract(spec), Contract(spec, fast=False)
    print("\nresponse check of GET /instances, in process (median of 60)")
    print(f"{'instances':>9} {'jsonschema ms':>14} {'served ms':>10} {'ratio':>7}")
    for count in (20, 200):
        slow, fast = list_check_ms(reference, count), list_check_ms(served, count)
        print(f"{count:>9} {slow:14.3f} {fast:10.3f} {fast / slow:7.3f}")
    failed |= node_section((20, 200), args.node_requests)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
