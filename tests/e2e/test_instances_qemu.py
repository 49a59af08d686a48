"""The whole product with a real guest: registry -> image -> VM under QEMU/TCG -> SSE -> standby
-> restore -> delete.

The image's program prints ``count N`` every 200 ms; its count lives only in guest memory,
so after standby and restore the next line must be the next number, not ``count 0``.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_instances_api import Source, gone, pid_alive, wait_ready
from tests.support.apps import COUNTER, push_app
from tests.support.artifacts import shared_artifacts
from tests.support.metrics import Samples, scrape
from tests.support.registry import running_registry
from tests.support.server import RunningServer, run_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
    ),
]

COUNT = re.compile(r"^count (\d+)$")
BOUND = 120.0  # seconds any single wait may take before the test fails


@dataclass
class Live:
    server: RunningServer
    client: httpx.Client
    source: Source
    data_dir: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("qemu-instances")
    artifacts = shared_artifacts()
    with running_registry(tmp / "registry") as registry:
        image = push_app(
            registry.host, "tests/counter", {"/app/counter": COUNTER}, entrypoint=["/app/counter"]
        )
        env = {
            "HYPERVISOR": "qemu",
            "INSECURE_REGISTRIES": registry.host,
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
        }
        data_dir = tmp / "data"
        with (
            run_server(data_dir, env) as server,
            httpx.Client(base_url=server.url, timeout=BOUND) as client,
        ):
            assert client.post("/images", json={"name": image}).status_code == 202
            wait_ready(client, image)
            yield Live(server, client, Source(image, env), data_dir)
            for instance in client.get("/instances").json():
                client.delete(f"/instances/{instance['id']}")


def wait_state(client: httpx.Client, instance_id: str, wanted: str) -> dict[str, object]:
    deadline = time.monotonic() + BOUND
    while True:
        instance: dict[str, object] = client.get(f"/instances/{instance_id}").json()
        if instance["state"] == wanted:
            return instance
        assert time.monotonic() < deadline, f"still {instance['state']}, wanted {wanted}"
        time.sleep(0.1)


class Follower:
    """An SSE client on a real connection, collecting (id, line) events in a thread."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[tuple[int, str]] = []
        self.ended: object = None  # the data of the stream's `end` event, once it came
        self.closed = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(BOUND, read=None))
        self._stream = self._client.stream("GET", url, headers=headers)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        current: dict[str, str] = {}
        try:
            with self._stream as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line == "" and current.get("event") == "end":
                        self.ended = json.loads(current.get("data", "null"))
                        current = {}
                    elif line == "" and "id" in current:
                        self.events.append((int(current["id"]), current.get("data", "")))
                        current = {}
                    elif ": " in line and not line.startswith(":"):
                        key, value = line.split(": ", 1)
                        current[key] = value
        except httpx.HTTPError:
            pass
        finally:
            self.closed.set()

    def counts(self) -> list[int]:
        return [int(m[1]) for _, text in self.events if (m := COUNT.match(text))]

    def wait_for_count(self, at_least: int) -> None:
        deadline = time.monotonic() + BOUND
        while not self.counts() or self.counts()[-1] < at_least:
            assert time.monotonic() < deadline, f"counts so far: {self.counts()[-5:]}"
            assert not self.closed.is_set(), "the stream ended"
            time.sleep(0.05)

    def close(self) -> None:
        self._client.close()
        self.closed.wait(10)


def test_counter_survives_standby_and_restore(live: Live) -> None:
    client = live.client
    response = client.post(
        "/instances", json={"name": "counter", "image": live.source.image, "memory_mb": 256}
    )
    assert response.status_code == 201, response.text
    instance = response.json()
    instance_id = instance["id"]
    pid = instance["pid"]
    running = wait_state(client, instance_id, "Running")
    assert running["program_started_at"] is not None

    logs = f"{live.server.url}/instances/{instance_id}/logs?follow=true"
    before = Follower(logs)
    try:
        before.wait_for_count(5)
    finally:
        before.close()

    standby = client.post(f"/instances/{instance_id}/standby")
    assert standby.status_code == 200, standby.text
    assert standby.json()["state"] == "Standby"
    assert gone(pid), "standby must leave no VMM process"

    # Everything the guest printed before the snapshot is in the log by now.
    last_id, last_count = last_count_in_log(client, instance_id)

    restored = client.post(f"/instances/{instance_id}/restore")
    assert restored.status_code == 200, restored.text
    assert restored.json()["state"] == "Running"
    new_pid = restored.json()["pid"]
    assert pid_alive(new_pid)

    after = Follower(logs, headers={"Last-Event-ID": str(last_id)})
    try:
        after.wait_for_count(last_count + 3)
    finally:
        after.close()
    assert after.counts()[:3] == [last_count + 1, last_count + 2, last_count + 3]
    assert all(event_id > last_id for event_id, _ in after.events)

    assert client.delete(f"/instances/{instance_id}").status_code == 204
    assert gone(new_pid)
    assert not (live.data_dir / "instances" / instance_id).exists()


def last_count_in_log(client: httpx.Client, instance_id: str) -> tuple[int, int]:
    """(event id, count) of the last ``count N`` line in the app log."""
    body = client.get(f"/instances/{instance_id}/logs").text
    last: tuple[int, int] | None = None
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        match = COUNT.match(fields.get("data", ""))
        if match and "id" in fields:
            last = (int(fields["id"]), int(match[1]))
    assert last is not None, body[-500:]
    return last


def wait_count_above(client: httpx.Client, instance_id: str, floor: int) -> int:
    deadline = time.monotonic() + BOUND
    while True:
        body = client.get(f"/instances/{instance_id}/logs").text
        counts = [int(m[1]) for line in body.splitlines() if (m := COUNT.match(line[6:]))]
        if counts and counts[-1] > floor:
            return counts[-1]
        assert time.monotonic() < deadline, body[-300:]
        time.sleep(0.1)


def run_script(live: Live, name: str, script: str, **extra: object) -> dict[str, Any]:
    """Create an instance whose program is ``sh -c script``; the created instance."""
    response = live.client.post(
        "/instances",
        json={
            "name": name,
            "image": live.source.image,
            "entrypoint": ["/bin/sh", "-c", script],
            **extra,
        },
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_program_exit_releases_the_vmm_and_keeps_the_exit_code(live: Live) -> None:
    client = live.client
    created = run_script(live, "exiter", "echo bye; exit 7")
    instance_id, pid = created["id"], created["pid"]
    instance = wait_state(client, instance_id, "Stopped")
    assert instance["exit_code"] == 7
    assert instance["pid"] is None
    assert gone(pid), "the VMM, and the guest memory it holds, is released"
    body = client.get(f"/instances/{instance_id}/logs").text
    assert "data: bye" in body
    assert client.delete(f"/instances/{instance_id}").status_code == 204


def test_a_follow_ends_once_the_program_exited(live: Live) -> None:
    client = live.client
    instance_id = run_script(live, "brief", "echo one; sleep 1; echo two; exit 4")["id"]
    follower = Follower(f"{live.server.url}/instances/{instance_id}/logs?follow=true")
    try:
        assert follower.closed.wait(BOUND), "the follow ended by itself"
    finally:
        follower.close()
    texts = [text for _, text in follower.events]
    assert "one" in texts
    assert "two" in texts
    assert follower.ended == {"state": "Stopped", "exit_code": 4, "error": None}
    assert client.delete(f"/instances/{instance_id}").status_code == 204


def test_keep_on_exit_keeps_the_vmm(live: Live) -> None:
    client = live.client
    instance_id = run_script(live, "keeper", "exit 3", keep_on_exit=True)["id"]
    deadline = time.monotonic() + BOUND
    # The VMM may report the guest off a moment before its exit marker is read.
    while (instance := client.get(f"/instances/{instance_id}").json())["exit_code"] is None:
        assert time.monotonic() < deadline, instance
        time.sleep(0.1)
    assert instance["exit_code"] == 3
    assert instance["state"] == "Shutdown"
    assert instance["keep_on_exit"] is True
    time.sleep(1.0)  # longer than the supervisor's tick: it must still be there
    instance = client.get(f"/instances/{instance_id}").json()
    assert instance["state"] == "Shutdown"
    assert pid_alive(int(str(instance["pid"])))
    assert client.delete(f"/instances/{instance_id}").status_code == 204


def test_on_failure_restarts_until_the_program_succeeds(live: Live) -> None:
    client = live.client
    # The overlay outlives a restart: the first run fails, the second finds its mark and succeeds.
    script = "if [ -e /app/ran ]; then echo second; exit 0; fi; touch /app/ran; echo first; exit 1"
    instance_id = run_script(live, "flaky", script, restart_policy="on-failure")["id"]
    deadline = time.monotonic() + BOUND
    while True:
        instance = client.get(f"/instances/{instance_id}").json()
        if instance["state"] == "Stopped" and instance["exit_code"] == 0:
            break
        assert time.monotonic() < deadline, instance
        time.sleep(0.1)
    assert instance["restarts"] == 1
    assert instance["restart_policy"] == "on-failure"
    time.sleep(1.5)  # past the first back-off: a success is not restarted
    assert client.get(f"/instances/{instance_id}").json()["restarts"] == 1
    lines = client.get(f"/instances/{instance_id}/logs").text
    assert lines.index("data: first") < lines.index("data: second")
    assert client.delete(f"/instances/{instance_id}").status_code == 204


def test_restart_of_the_dataplane_keeps_a_running_guest(live: Live, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = live.source.env
    with run_server(data_dir, env, keep_vmms=True) as first, first.client(BOUND) as client:
        assert client.post("/images", json={"name": live.source.image}).status_code == 202
        wait_ready(client, live.source.image)
        created = client.post("/instances", json={"name": "steady", "image": live.source.image})
        assert created.status_code == 201, created.text
        instance_id = created.json()["id"]
        pid = created.json()["pid"]
        wait_state(client, instance_id, "Running")
        count_before = wait_count_above(client, instance_id, -1)
        assert first.stop() == 0
    assert pid_alive(pid), "the guest must outlive the dataplane"
    with run_server(data_dir, env) as second, second.client(BOUND) as client:
        instance = wait_state(client, instance_id, "Running")
        assert instance["pid"] == pid
        # Output written while no dataplane ran is in the log, and the count goes on.
        wait_count_above(client, instance_id, count_before + 5)
        rebooted = client.post(f"/instances/{instance_id}/reboot")
        assert rebooted.status_code == 200, rebooted.text
        wait_state(client, instance_id, "Running")
        assert client.delete(f"/instances/{instance_id}").status_code == 204
    assert gone(pid)


def test_stop_is_graceful_then_start_boots_again(live: Live) -> None:
    client = live.client
    created = client.post(
        "/instances",
        json={
            "name": "polite",
            "image": live.source.image,
            "entrypoint": [
                "/bin/sh",
                "-c",
                "trap 'echo bye; exit 5' TERM; while :; do sleep 1; done",
            ],
        },
    )
    assert created.status_code == 201, created.text
    instance_id = created.json()["id"]
    wait_state(client, instance_id, "Running")
    stopped = client.post(f"/instances/{instance_id}/stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] == "Stopped"
    assert stopped.json()["exit_code"] == 5, "the program got SIGTERM and exited by itself"
    assert "data: bye" in client.get(f"/instances/{instance_id}/logs").text
    started = client.post(f"/instances/{instance_id}/start")
    assert started.status_code == 200, started.text
    assert wait_state(client, instance_id, "Running")["exit_code"] is None
    assert client.delete(f"/instances/{instance_id}").status_code == 204


def test_metrics_follow_a_real_create_pause_and_delete(live: Live) -> None:
    client = live.client
    before = scrape(client)
    # The module's image was pulled from the registry and built by this server.
    assert before[("dataplane_image_pull_duration_seconds_count", frozenset())] >= 1
    assert before[("dataplane_image_pulled_bytes_total", frozenset())] > 0
    assert before[("dataplane_images", frozenset({("status", "ready")}))] >= 1

    def count(samples: Samples, **labels: str) -> float:
        key = ("dataplane_instance_operation_duration_seconds_count", frozenset(labels.items()))
        return samples.get(key, 0.0)

    running_before = before[("dataplane_instances", frozenset({("state", "Running")}))]
    created = client.post(
        "/instances", json={"name": "metered", "image": live.source.image, "memory_mb": 256}
    )
    assert created.status_code == 201, created.text
    instance_id = created.json()["id"]
    wait_state(client, instance_id, "Running")
    assert client.post(f"/instances/{instance_id}/pause").status_code == 200
    during = scrape(client)
    assert count(during, operation="create") == count(before, operation="create") + 1
    assert count(during, operation="pause") == count(before, operation="pause") + 1
    assert during[("dataplane_instances", frozenset({("state", "Paused")}))] >= 1
    assert during[("dataplane_instances", frozenset({("state", "Running")}))] == running_before
    ours = frozenset({("instance_id", instance_id)})
    assert during[("dataplane_vmm_cpu_seconds_total", ours)] > 0
    # QEMU maps the guest's memory; what it touched is resident.
    assert during[("dataplane_vmm_resident_memory_bytes", ours)] > 16 << 20
    created_key = (
        "dataplane_http_requests_total",
        frozenset({("method", "POST"), ("route", "/instances"), ("status", "201")}),
    )
    assert during[created_key] == before.get(created_key, 0.0) + 1
    assert during[("dataplane_log_written_bytes_total", frozenset({("source", "app")}))] > 0
    assert client.delete(f"/instances/{instance_id}").status_code == 204
    after = scrape(client)
    assert ("dataplane_vmm_cpu_seconds_total", ours) not in after
    assert (
        after[("dataplane_instances", frozenset({("state", "Paused")}))]
        == during[("dataplane_instances", frozenset({("state", "Paused")}))] - 1
    )
    deleted_key = (
        "dataplane_http_requests_total",
        frozenset({("method", "DELETE"), ("route", "/instances/{id}"), ("status", "204")}),
    )
    assert after[deleted_key] == during.get(deleted_key, 0.0) + 1


# Binary, invalid UTF-8, CR LF, NUL, an escape sequence and no final newline.
EXACT = b"text\r\n\x01\xff\xfe bin\x00zero\n\x1b[1mbold\x1b[0m\nlast, unended"


def _printf_octal(data: bytes) -> str:
    return "".join(f"\\{byte:03o}" for byte in data)


def _sse_ids(body: str) -> list[int]:
    return [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]


def test_app_log_is_the_programs_bytes_exactly(live: Live) -> None:
    client = live.client
    created = run_script(live, "exact", f"printf '{_printf_octal(EXACT)}'; exit 3")
    instance_id = created["id"]
    follow = client.get(f"/instances/{instance_id}/logs?format=raw&follow=true")
    assert follow.status_code == 200
    assert follow.content == EXACT, "a raw follow ends with the program, every byte sent"
    wait_state(client, instance_id, "Stopped")
    raw = client.get(f"/instances/{instance_id}/logs?format=raw")
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["log-offset"] == "0"
    assert raw.content == EXACT

    # Each SSE id is where its line ends: a Range between two ids is that line, exactly.
    ids = _sse_ids(client.get(f"/instances/{instance_id}/logs").text)
    assert ids[-1] == len(EXACT)
    second = client.get(
        f"/instances/{instance_id}/logs?format=raw",
        headers={"Range": f"bytes={ids[0]}-{ids[1] - 1}"},
    )
    assert second.status_code == 206
    assert second.headers["content-range"] == f"bytes {ids[0]}-{ids[1] - 1}/{len(EXACT)}"
    assert second.content == b"\x01\xff\xfe bin\x00zero\n"
    beyond = client.get(
        f"/instances/{instance_id}/logs?format=raw", headers={"Range": f"bytes={len(EXACT)}-"}
    )
    assert beyond.status_code == 416
    assert beyond.json()["code"] == "range_not_satisfiable"
    assert beyond.headers["content-range"] == f"bytes */{len(EXACT)}"

    # Only the program's output is in app; the guest's reports are the dataplane's lines and
    # the kernel's are the console's.
    assert b"@@dataplane-guest@@" not in raw.content
    console = client.get(f"/instances/{instance_id}/logs?source=console&format=raw").content
    assert b"@@dataplane-guest@@" not in console
    assert b"reboot: Power down" in console
    dataplane = client.get(f"/instances/{instance_id}/logs?source=dataplane&format=text").text
    assert "guest: the program started" in dataplane
    assert "guest: the program exited with code 3" in dataplane
    assert client.delete(f"/instances/{instance_id}").status_code == 204
