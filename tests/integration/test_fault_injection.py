"""Kill the dataplane (SIGKILL) at every named step of an instance operation, then restart it.

Each failpoint in ``managers.failpoints.STEPS`` that belongs to instances is covered once per
run, on real QEMU guests or on the Cloud Hypervisor simulator (the image steps are covered by
``test_images_recovery.py``). The dataplane runs inside a network namespace this module
creates, with networking on, so TAPs are real. After each kill the restarted dataplane must
account for everything: every VMM process of the data directory is the VMM of a listed
instance, every TAP belongs to an instance with a VMM, no half-written file or partial
snapshot is left, nothing is quarantined, no instance reads ``Unknown``, and the operation
(or the next one) succeeds when tried again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from managers.failpoints import STEPS
from managers.network.addressing import tap_name
from managers.network.nat import nat_comment
from tests.support.apps import COUNTER, busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.ch_simulator import WRAPPER as SIMULATOR
from tests.support.ch_simulator.spec import missing_spec_reason
from tests.support.netns import network_namespace, unavailable_reason
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import run_server

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        unavailable_reason() is not None, reason=unavailable_reason() or "netns available"
    ),
]

IMAGE = "tests/counter:v1"
BOUND = 120.0


@dataclass(frozen=True)
class Case:
    step: str
    backend: str  # "qemu" or "simulator"
    setup: str  # "none", "created" (not started), "running", "standby"
    op: str  # the operation the kill cuts short
    after: frozenset[str] | None  # the states recovery may leave; None: the instance is gone
    retry: str  # what must work next: the same operation, or the one that follows it

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.step}"


_AWAKE = frozenset({"Initializing", "Running"})
CASES = [
    Case("create.recorded", "simulator", "none", "create", None, "create"),
    Case("create.overlay", "simulator", "none", "create", None, "create"),
    Case("create.tap", "simulator", "none", "create", None, "create"),
    Case("create.booted", "simulator", "none", "create", None, "create"),
    Case("vmm.forked", "simulator", "created", "start", frozenset({"Created"}), "start"),
    Case("vmm.spawned", "qemu", "none", "create", None, "create"),
    Case("vmm.snapshotting", "qemu", "running", "standby", _AWAKE, "standby"),
    Case("start.tap", "simulator", "created", "start", frozenset({"Created"}), "start"),
    Case("start.booted", "simulator", "created", "start", _AWAKE, "stop"),
    Case("stop.shutdown", "qemu", "running", "stop", frozenset({"Stopped"}), "start"),
    Case("delete.recorded", "simulator", "running", "delete", None, "create"),
    Case("delete.vmm_stopped", "simulator", "running", "delete", None, "create"),
    Case("standby.paused", "qemu", "running", "standby", _AWAKE, "standby"),
    Case("standby.snapshot_written", "qemu", "running", "standby", _AWAKE, "standby"),
    Case("standby.committed", "qemu", "running", "standby", frozenset({"Standby"}), "restore"),
    Case("restore.tap", "qemu", "standby", "restore", frozenset({"Standby"}), "restore"),
    Case("restore.running", "qemu", "standby", "restore", _AWAKE, "standby"),
]


def test_every_instance_failpoint_has_a_case() -> None:
    instance_steps = {step for step in STEPS if not step.startswith(("image.", "events."))}
    assert sorted(case.step for case in CASES) == sorted(instance_steps)


@dataclass
class Node:
    namespace: str
    data_dir: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("faults")
    artifacts = shared_artifacts()
    image = make_image(
        busybox_layers({"/app/counter": COUNTER}),
        config={"Entrypoint": ["/app/counter"], "Env": ["PATH=/bin"]},
    )
    archive = tmp / "counter.tar"
    write_oci_archive(archive, image, name=IMAGE)
    env = {
        "KERNEL_PATH": str(artifacts.bzimage),
        "INITRD_PATH": str(artifacts.initrd),
        "SUBNET_CIDR": "192.168.100.0/28",
        "SUBNET_GATEWAY": "192.168.100.1",
    }
    data_dir = tmp / "data"
    with network_namespace() as namespace:
        found = Node(namespace, data_dir, env)
        with serve(found, "qemu") as server, server.client(BOUND) as client:
            imported = client.post(
                "/images/import",
                content=archive.read_bytes(),
                headers={"content-type": "application/x-tar"},
            )
            assert imported.status_code == 202, imported.text
            deadline = time.monotonic() + BOUND
            digest = imported.json()["digest"]
            while client.get(f"/images/{digest}").json()["status"] != "ready":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield found


def serve(node: Node, backend: str, failpoint: str | None = None) -> Any:
    env = dict(node.env)
    if backend == "qemu":
        env["HYPERVISOR"] = "qemu"
    else:
        env.update(
            HYPERVISOR="cloud-hypervisor",
            CLOUD_HYPERVISOR_BIN=str(SIMULATOR),
            CH_SIMULATOR_VIOLATIONS=str(node.data_dir.parent / "ch-violations.log"),
        )
    if failpoint is not None:
        env["DATAPLANE_FAILPOINT"] = failpoint
    return run_server(node.data_dir, env, netns=node.namespace, keep_vmms=True)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_sigkill_at_failpoint_then_restart_loses_and_leaks_nothing(node: Node, case: Case) -> None:
    if case.backend == "qemu" and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    spec_missing = missing_spec_reason()
    if case.backend == "simulator" and spec_missing is not None:
        pytest.skip(spec_missing)
    name = f"victim-{len(case.step)}"
    try:
        with serve(node, case.backend, case.step) as server, server.client(BOUND) as client:
            instance_id = _set_up(client, name, case.setup)
            with pytest.raises(httpx.TransportError):
                _operate(client, case.op, name, instance_id)
            assert server.process.wait(30) == -9, "the failpoint did not kill the dataplane"

        with serve(node, case.backend) as server, server.client(BOUND) as client:
            listed = client.get("/instances").json()
            _assert_accounted_for(node, listed)
            states = {item["name"]: item["state"] for item in listed}
            if case.after is None:
                assert name not in states
            else:
                assert states.get(name) in case.after, states
            response = _operate(client, case.retry, name, instance_id)
            assert response.status_code in (200, 201, 204), response.text
            if case.retry == "standby":
                restored = client.post(f"/instances/{name}/restore")
                assert restored.status_code == 200, restored.text
            _assert_accounted_for(node, client.get("/instances").json())
    finally:
        with serve(node, case.backend) as server, server.client(BOUND) as client:
            for item in client.get("/instances").json():
                client.delete(f"/instances/{item['id']}")
            _assert_accounted_for(node, client.get("/instances").json())
            assert client.get("/instances").json() == []


def _set_up(client: httpx.Client, name: str, setup: str) -> str | None:
    if setup == "none":
        return None
    body: dict[str, Any] = {"name": name, "image": IMAGE, "network": {"enabled": True}}
    if setup == "created":
        body["start"] = False
    created = client.post("/instances", json=body)
    assert created.status_code == 201, created.text
    if setup == "standby":
        standby = client.post(f"/instances/{name}/standby")
        assert standby.status_code == 200, standby.text
    return str(created.json()["id"])


def _operate(client: httpx.Client, op: str, name: str, instance_id: str | None) -> httpx.Response:
    if op == "create":
        return client.post(
            "/instances", json={"name": name, "image": IMAGE, "network": {"enabled": True}}
        )
    if op == "delete":
        return client.delete(f"/instances/{instance_id or name}")
    return client.post(f"/instances/{name}/{op}")


def _assert_accounted_for(node: Node, listed: list[dict[str, Any]]) -> None:
    """Every VMM, TAP and folder of the data directory belongs to a listed instance."""
    assert all(item["state"] != "Unknown" for item in listed), listed
    ids = {item["id"] for item in listed}
    pids = {item["pid"] for item in listed if item["pid"] is not None}
    assert _vmm_processes(node.data_dir) == pids
    expected_taps = {
        tap_name(item["id"]) for item in listed if item["pid"] is not None and item["network"]
    }
    assert _taps(node.namespace) == expected_taps
    # The one NAT rule of ours, once, wherever the bridge is up: a restart replaces the
    # table, never adds to it. (The bridge, and its rule, come with the first network use.)
    bridge = subprocess.run(
        ["ip", "netns", "exec", node.namespace, "ip", "link", "show", "vmbr0"],
        capture_output=True,
    )
    rules = [f"masquerade {nat_comment('vmbr0')}"] if bridge.returncode == 0 else []
    assert _nat_rules(node.namespace) == rules
    instances = node.data_dir / "instances"
    assert {folder.name for folder in instances.iterdir()} == ids
    assert list(instances.glob("*/standby.partial")) == []
    # A temporary is renamed into place within moments (the log pump of a running guest writes
    # some all the time); one that is still there a moment later was left behind.
    temporaries = list(instances.rglob("*.tmp"))
    if temporaries:
        time.sleep(0.5)
    assert [path for path in temporaries if path.exists()] == []
    quarantine = node.data_dir / "quarantine" / "instances"
    assert not quarantine.exists() or list(quarantine.iterdir()) == []


def _vmm_processes(data_dir: Path) -> set[int]:
    root = str(data_dir / "instances") + "/"
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").startswith(root):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _nat_rules(namespace: str) -> list[str]:
    """Every rule in the namespace's nftables that masquerades, with its comment."""
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "list", "ruleset"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rules = []
    for line in out.splitlines():
        if "masquerade" in line:
            comment = line.split('comment "', 1)[1].rstrip('"') if "comment" in line else ""
            rules.append(f"masquerade {comment}")
    return rules


def _taps(namespace: str) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "ip", "-o", "link", "show", "type", "tun"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if line.strip()}
