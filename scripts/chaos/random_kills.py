"""Kill the dataplane with SIGKILL at random instants of real operations, restart it, count leaks.

The by-hand counterpart of ``tests/integration/test_fault_injection.py``: no failpoints, just a
timer. Each round starts the dataplane inside a network namespace of its own (networking on, so
TAPs are real), starts one operation (create, start, stop, standby, restore or delete, cycling),
kills the dataplane after a random delay of up to ``--window`` seconds, restarts it and counts:

- orphan VMMs: processes working in an instance folder that no listed instance owns;
- orphan TAPs: TAP devices in the namespace that belong to no instance with a VMM;
- stuck or lost: instances reading ``Unknown``, partial snapshots, quarantined folders;
- failed retries: the operation (or the one after it) answering an error after the restart.

Usage (root, QEMU installed)::

    .venv/bin/python scripts/chaos/random_kills.py --rounds 40 --window 2.5
    .venv/bin/python scripts/chaos/random_kills.py --ops create,standby --window 1.0

It prints one line a round and a summary; every count should be zero (the exit code is 1
otherwise).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from managers.network.addressing import tap_name
from tests.support.apps import COUNTER, busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.netns import network_namespace
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import RunningServer, run_server

IMAGE = "chaos/counter:v1"
OPERATIONS = ("create", "start", "stop", "standby", "restore", "delete")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--window", type=float, default=2.5, help="longest delay before the kill")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--ops",
        default=",".join(OPERATIONS),
        help=f"operations to cut short, in turn (default {','.join(OPERATIONS)})",
    )
    args = parser.parse_args()
    operations = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(operations) - set(OPERATIONS))
    if unknown or not operations:
        parser.error(f"--ops takes some of {', '.join(OPERATIONS)}, not {', '.join(unknown)}")
    rng = random.Random(args.seed)
    artifacts = shared_artifacts()
    totals: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch, network_namespace() as netns:
        tmp = Path(scratch)
        data_dir = tmp / "data"
        env = {
            "HYPERVISOR": "qemu",
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
        }
        archive = tmp / "counter.tar"
        image = make_image(
            busybox_layers({"/app/counter": COUNTER}),
            config={"Entrypoint": ["/app/counter"], "Env": ["PATH=/bin"]},
        )
        write_oci_archive(archive, image, name=IMAGE)
        with run_server(data_dir, env, netns=netns, keep_vmms=True) as server:
            _import(server, archive)
        for round_number in range(args.rounds):
            op = operations[round_number % len(operations)]
            delay = rng.uniform(0.0, args.window)
            found = _round(data_dir, env, netns, op, delay)
            totals.update(found)
            summary = " ".join(f"{k}={v}" for k, v in sorted(found.items())) or "clean"
            print(f"round {round_number + 1:3d}  {op:8s} kill after {delay:5.2f} s: {summary}")
        with run_server(data_dir, env, netns=netns) as server, server.client(120) as client:
            for item in client.get("/instances").json():
                client.delete(f"/instances/{item['id']}")
    print("totals:", dict(totals) or "all zero")
    return 1 if totals else 0


def _import(server: RunningServer, archive: Path) -> None:
    with server.client(120) as client:
        answer = client.post(
            "/images/import",
            content=archive.read_bytes(),
            headers={"content-type": "application/x-tar"},
        )
        answer.raise_for_status()
        digest = answer.json()["digest"]
        while client.get(f"/images/{digest}").json()["status"] != "ready":
            time.sleep(0.1)


def _round(data_dir: Path, env: dict[str, str], netns: str, op: str, delay: float) -> Counter[str]:
    name = "victim"
    with run_server(data_dir, env, netns=netns, keep_vmms=True) as server:
        with server.client(120) as client:
            _prepare(client, name, op)
        pid = server.process.pid
        _start_op(server, name, op)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        server.process.wait(10)
    found: Counter[str] = Counter()
    with (
        run_server(data_dir, env, netns=netns, keep_vmms=True) as server,
        server.client(120) as client,
    ):
        listed = client.get("/instances").json()
        found.update(_leaks(data_dir, netns, listed))
        retry = _retry(client, name, op, listed)
        if retry is not None and retry.status_code >= 400:
            found["failed_retry"] += 1
    return found


def _prepare(client: httpx.Client, name: str, op: str) -> None:
    """Bring the victim to the state ``op`` starts from."""
    items = {item["name"]: item for item in client.get("/instances").json()}
    if op == "create":
        if name in items:
            client.delete(f"/instances/{name}")
        return
    if name not in items:
        client.post("/instances", json=_body(name)).raise_for_status()
    state = client.get(f"/instances/{name}").json()["state"]
    wanted = {"start": "Stopped", "restore": "Standby"}.get(op)
    if wanted == "Stopped" and state != "Stopped":
        client.post(f"/instances/{name}/stop")
    elif wanted == "Standby" and state != "Standby":
        if state in ("Stopped", "Created"):
            client.post(f"/instances/{name}/start")
        client.post(f"/instances/{name}/standby")
    elif wanted is None and op in ("stop", "standby") and state in ("Stopped", "Created"):
        client.post(f"/instances/{name}/start")
    elif wanted is None and op in ("stop", "standby") and state == "Standby":
        client.post(f"/instances/{name}/restore")


def _start_op(server: RunningServer, name: str, op: str) -> None:
    """Send the request without waiting for its answer: the kill may come first."""

    def send() -> None:
        try:
            with server.client(120) as client:
                if op == "create":
                    client.post("/instances", json=_body(name))
                elif op == "delete":
                    client.delete(f"/instances/{name}")
                else:
                    client.post(f"/instances/{name}/{op}")
        except httpx.HTTPError:
            pass

    threading.Thread(target=send, daemon=True).start()


def _body(name: str) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "network": {"enabled": True}}


def _retry(
    client: httpx.Client, name: str, op: str, listed: list[dict[str, Any]]
) -> httpx.Response | None:
    states = {item["name"]: item["state"] for item in listed}
    if op in ("create", "delete"):
        if name in states:
            return client.delete(f"/instances/{name}")
        return client.post("/instances", json=_body(name))
    state = states.get(name)
    follow = {
        "Created": "start",
        "Stopped": "start",
        "Standby": "restore",
        "Initializing": "standby",
        "Running": "standby",
        "Paused": "resume",
        "Shutdown": "stop",
    }.get(state or "")
    if follow is None:
        return None
    return client.post(f"/instances/{name}/{follow}")


def _leaks(data_dir: Path, netns: str, listed: list[dict[str, Any]]) -> Counter[str]:
    found: Counter[str] = Counter()
    owned = {item["pid"] for item in listed if item["pid"] is not None}
    root = str(data_dir / "instances") + "/"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").startswith(root) and int(entry.name) not in owned:
                    found["orphan_vmm"] += 1
            except OSError:
                continue
    expected = {tap_name(item["id"]) for item in listed if item["pid"] is not None}
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ip", "-o", "link", "show", "type", "tun"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    taps = {line.split(": ")[1].split("@")[0] for line in out.splitlines() if line.strip()}
    found["orphan_tap"] += len(taps - expected)
    found["unknown"] += sum(1 for item in listed if item["state"] == "Unknown")
    found["partial_snapshot"] += len(list((data_dir / "instances").glob("*/standby.partial")))
    quarantine = data_dir / "quarantine" / "instances"
    found["quarantined"] += len(list(quarantine.iterdir())) if quarantine.exists() else 0
    return +found


if __name__ == "__main__":
    sys.exit(main())
