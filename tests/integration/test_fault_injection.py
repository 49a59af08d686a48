"""Kill the dataplane (SIGKILL) at every named step of an instance or volume operation, then
restart it.

Each failpoint in ``managers.failpoints.STEPS`` that belongs to instances or volumes is covered
once per run, on real QEMU guests or on the Cloud Hypervisor simulator (the image steps are
covered by ``test_images_recovery.py``). The dataplane runs inside a network namespace this module
creates, with networking on, so TAPs are real. After each kill the restarted dataplane must
account for everything: every VMM process of the data directory is the VMM of a listed
instance, every TAP belongs to an instance with a VMM, no half-written file or partial
snapshot or half-made volume is left, nothing is quarantined, no instance reads ``Unknown``,
a volume is attached exactly when its instance's record says so, and the operation (or the next
one) succeeds when tried again.
"""

from __future__ import annotations

import json
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
from managers.network.table import nat_comment
from tests.support.apps import COUNTER, busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.ch_simulator import WRAPPER as SIMULATOR
from tests.support.ch_simulator.spec import missing_spec_reason
from tests.support.netns import network_namespace, unavailable_reason
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.server import import_image, run_server, wait_agent_ready

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
    # "none", "created" (not started), "running", "standby"; "+volume" adds a detached
    # volume, "+attached" one attached to the running instance
    setup: str
    op: str  # the operation the kill cuts short
    after: frozenset[str] | None  # the states recovery may leave; None: no such instance
    retry: str  # what must work next: the same operation, or the one that follows it
    # the volume after the restart: "absent", "detached" or "attached" (None: no volume)
    volume: str | None = None

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
    Case("volume.formatted", "simulator", "none", "volume_create", None, "volume_create", "absent"),
    Case(
        "volume.committed", "simulator", "none", "volume_create", None, "volume_delete", "detached"
    ),
    Case(
        "volume.resizing",
        "simulator",
        "none+volume",
        "volume_resize",
        None,
        "volume_resize",
        "detached",
    ),
    # A hot attach or detach cut short is carried forward once the guest's agent answers.
    Case("attach.recorded", "qemu", "running+volume", "attach", _AWAKE, "detach", "attached"),
    Case("attach.plugged", "qemu", "running+volume", "attach", _AWAKE, "detach", "attached"),
    Case("detach.recorded", "qemu", "running+attached", "detach", _AWAKE, "attach", "detached"),
    # New limits recorded but not yet on the TAP: the restart applies what the record says.
    Case("bandwidth.recorded", "simulator", "running", "bandwidth", _AWAKE, "bandwidth"),
    Case("detach.unmounted", "qemu", "running+attached", "detach", _AWAKE, "attach", "detached"),
]
VOLUME = "victim-data"


def test_every_instance_failpoint_has_a_case() -> None:
    instance_steps = {
        step for step in STEPS if not step.startswith(("image.", "events.", "ingress."))
    }
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
            import_image(client, archive, BOUND)
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
            if case.volume is not None:
                _assert_volume(client, name, case.volume)
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
            for volume in client.get("/volumes").json():
                client.delete(f"/volumes/{volume['id']}")
            _assert_accounted_for(node, client.get("/instances").json())
            assert client.get("/instances").json() == []
            assert client.get("/volumes").json() == []


def _set_up(client: httpx.Client, name: str, setup: str) -> str | None:
    setup, _, volume = setup.partition("+")
    if volume:
        made = client.post("/volumes", json={"name": VOLUME, "size_mb": 32})
        assert made.status_code == 201, made.text
    if setup == "none":
        return None
    body: dict[str, Any] = {"name": name, "image": IMAGE, "network": {"enabled": True}}
    if volume == "attached":
        body["volumes"] = [{"volume_id": VOLUME, "mount_path": "/data"}]
    if setup == "created":
        body["start"] = False
    created = client.post("/instances", json=body)
    assert created.status_code == 201, created.text
    if setup == "standby":
        standby = client.post(f"/instances/{name}/standby")
        assert standby.status_code == 200, standby.text
    if volume:
        # A hot attach or detach needs the program running and its agent answering.
        wait_agent_ready(client, created.json()["id"])
    return str(created.json()["id"])


def _operate(client: httpx.Client, op: str, name: str, instance_id: str | None) -> httpx.Response:
    if op == "create":
        return client.post(
            "/instances", json={"name": name, "image": IMAGE, "network": {"enabled": True}}
        )
    if op == "delete":
        return client.delete(f"/instances/{instance_id or name}")
    if op == "volume_create":
        return client.post("/volumes", json={"name": VOLUME, "size_mb": 32})
    if op == "volume_delete":
        return client.delete(f"/volumes/{VOLUME}")
    if op == "volume_resize":
        return client.patch(f"/volumes/{VOLUME}", json={"size_mb": 64})
    if op == "attach":
        return client.post(f"/instances/{name}/volumes/{VOLUME}", json={"mount_path": "/data"})
    if op == "detach":
        return client.delete(f"/instances/{name}/volumes/{VOLUME}")
    if op == "bandwidth":
        limits = {"bandwidth": {"ingress_mbps": 100}}
        return client.patch(f"/instances/{name}", json={"network": limits})
    return client.post(f"/instances/{name}/{op}")


def _assert_volume(client: httpx.Client, name: str, expected: str) -> None:
    """The volume is absent, or attached exactly when the instance's record lists it; an
    attach or detach settled at start-up may still be under way (it waits for the agent), so
    the instance is read again until its record carries no intent."""
    answer = client.get(f"/volumes/{VOLUME}")
    if expected == "absent":
        assert answer.status_code == 404, answer.text
        return
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + BOUND
    while True:
        attachments = client.get(f"/volumes/{VOLUME}").json()["attachments"]
        instance = client.get(f"/instances/{name}")
        listed = instance.json()["volumes"] if instance.status_code == 200 else []
        settled = (len(attachments) == 1) == (expected == "attached") == (len(listed) == 1)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(attachments) == (1 if expected == "attached" else 0), attachments
    assert len(listed) == len(attachments), (listed, attachments)


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
    # Every TAP shapes what its instance receives exactly as the record says.
    for item in listed:
        if item["pid"] is not None and item["network"] and item["network"]["enabled"]:
            limit = item["network"]["bandwidth"]["ingress_mbps"]
            expected = limit * 1_000_000 // 8 if limit is not None else None
            assert _tbf_rate(node.namespace, tap_name(item["id"])) == expected, item["name"]
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
    quarantine = node.data_dir / "quarantine"
    assert list(quarantine.glob("*/*")) == []
    # Volumes: nothing half made, half unpacked or half deleted.
    assert list((node.data_dir / "volumes").glob(".*")) == []


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


def _tbf_rate(namespace: str, tap: str) -> int | None:
    """The rate (bytes a second) of the TAP's root token bucket, None when it has none."""
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "-j", "qdisc", "show", "dev", tap],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rates = [q["options"]["rate"] for q in json.loads(out) if q["kind"] == "tbf"]
    return rates[0] if rates else None
