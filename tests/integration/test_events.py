"""Events end to end: a real server on the Cloud Hypervisor simulator, a real registry, and a
real HTTP receiver on 127.0.0.1 that checks every signature with the ``standardwebhooks``
package (an independent implementation of the Standard Webhooks scheme).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.integration.test_instances_api import server_env, wait_ready
from tests.support.apps import COUNTER, push_app
from tests.support.metrics import scrape
from tests.support.oci_builder import Pusher, make_image
from tests.support.registry import running_registry
from tests.support.server import free_port, run_server

SECRET = "whsec_" + base64.b64encode(b"events-test-secret-32-bytes-long").decode()
BOUND = 60.0


@dataclass
class Receiver:
    """Records every delivery; answers 500 to the first ``refuse`` requests."""

    port: int
    refuse: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self
        verifier = Webhook(SECRET)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.refuse:
                    self.send_response(500)
                    self.end_headers()
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                payload = verifier.verify(body, headers)  # raises on a bad signature
                assert payload["id"] == headers["webhook-id"]
                receiver.received.append(payload)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + BOUND
        while len(self.received) < count:
            assert time.monotonic() < deadline, " ".join(e["type"] for e in self.received)
            time.sleep(0.05)
        return self.received


@dataclass
class Source:
    env: dict[str, str]
    image: str
    missing: str


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    tmp = tmp_path_factory.mktemp("events")
    with running_registry(tmp / "registry") as registry:
        image = push_app(
            registry.host, "tests/counter", {"/app/counter": COUNTER}, entrypoint=["/app/counter"]
        )
        # Pulls fine, then fails to unpack: its one layer is not a tar.
        broken = make_image([(b"not a tar at all", "application/vnd.oci.image.layer.v1.tar+gzip")])
        pusher = Pusher(registry.host)
        try:
            pusher.image("tests/broken", "v1", broken)
        finally:
            pusher.close()
        yield Source(server_env(tmp, registry.host), image, f"{registry.host}/tests/broken:v1")


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def act(client: httpx.Client, method: str, url: str, **kwargs: Any) -> Any:
    response = client.request(method, url, **kwargs)
    assert response.status_code < 300, response.text
    return response.json() if response.content else None


def lifecycle(client: httpx.Client, source: Source) -> str:
    """Every kind of change once; returns the instance's id."""
    act(client, "POST", "/images", json={"name": source.image})
    wait_ready(client, source.image)
    act(client, "POST", "/images", json={"name": source.missing})
    wait_status(client, source.missing, "failed")
    body = {"name": "ev", "image": source.image}
    instance_id: str = act(client, "POST", "/instances", json=body)["id"]
    for action in ("pause", "resume", "reboot", "standby", "restore", "stop", "start"):
        act(client, "POST", f"/instances/{instance_id}/{action}")
    # A VMM that dies under the instance: noticed at the next read, announced as a failure.
    pid = act(client, "GET", f"/instances/{instance_id}")["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + BOUND
    while act(client, "GET", f"/instances/{instance_id}")["state"] != "Stopped":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    act(client, "POST", f"/instances/{instance_id}/start")
    act(client, "DELETE", f"/instances/{instance_id}")
    act(client, "DELETE", f"/images/{quote(source.image, safe='')}")
    return instance_id


INSTANCE_TYPES = [
    "instance.created", "instance.started", "instance.paused", "instance.resumed",
    "instance.rebooted", "instance.standby", "instance.restored", "instance.stopped",
    "instance.started", "instance.failed", "instance.started", "instance.deleted",
]  # fmt: skip


def wait_status(client: httpx.Client, name: str, wanted: str) -> None:
    deadline = time.monotonic() + BOUND
    while act(client, "GET", f"/images/{quote(name, safe='')}")["status"] != wanted:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_every_change_is_delivered_signed_in_order_and_streamed(
    source: Source, tmp_path: Path
) -> None:
    receiver = Receiver(free_port(), refuse=2)  # two refusals first: retried, nothing lost
    receiver.start()
    env = {**source.env, "WEBHOOK_ENDPOINT": receiver.url, "WEBHOOK_SECRET": SECRET}
    try:
        with run_server(tmp_path / "data", env) as server, server.client() as client:
            instance_id = lifecycle(client, source)
            delivered = receiver.wait_for(len(INSTANCE_TYPES) + 3)
            mine = [e for e in delivered if e.get("instance_id") == instance_id]
            assert types_of(mine) == INSTANCE_TYPES
            assert mine[2]["data"]["state"] == "Paused"
            assert {e["node_id"] for e in delivered} == {"NODE_1"}
            images = [e for e in delivered if e["type"].startswith("image.")]
            assert ("image.failed", source.missing) in [(e["type"], e["image"]) for e in images]
            assert types_of([e for e in images if e["image"] == source.image]) == [
                "image.ready",
                "image.deleted",
            ]
            # /events has the same ids in the same order, as a page and as a resumed stream.
            page = act(client, "GET", "/events", params={"follow": "false", "limit": 1000})
            assert [e["id"] for e in page["events"]] == [e["id"] for e in delivered]
            assert page["webhooks"][0]["delivered"] == len(delivered)
            assert page["webhooks"][0]["failed_attempts"] == 2
            # The same counts in /metrics, with the receiver's URL as the endpoint label.
            endpoint = ("endpoint", receiver.url)
            deliveries = "dataplane_webhook_deliveries_total"
            metrics = scrape(client)
            assert metrics[(deliveries, frozenset({endpoint, ("result", "delivered")}))] == len(
                delivered
            )
            assert metrics[(deliveries, frozenset({endpoint, ("result", "failed")}))] == 2
            assert metrics[(deliveries, frozenset({endpoint, ("result", "dropped")}))] == 0
            depth = ("dataplane_webhook_outbox_depth", frozenset({endpoint}))
            deadline = time.monotonic() + BOUND
            while scrape(client)[depth] != 0:  # the cursor moves just after each delivery
                assert time.monotonic() < deadline
                time.sleep(0.05)
            resume_from = delivered[2]["id"]
            streamed = read_stream(server.url, {"Last-Event-ID": resume_from}, len(delivered) - 3)
            assert [e["id"] for e in streamed] == [e["id"] for e in delivered[3:]]
            only = act(
                client,
                "GET",
                "/events",
                params={"follow": "false", "type": "instance.st", "instance_id": instance_id},
            )
            assert types_of(only["events"]) == [
                "instance.started", "instance.standby", "instance.stopped", "instance.started",
                "instance.started",
            ]  # fmt: skip
    finally:
        receiver.stop()


def read_stream(url: str, headers: dict[str, str], count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with (
        httpx.Client(timeout=httpx.Timeout(BOUND, read=BOUND)) as client,
        client.stream("GET", f"{url}/events", headers=headers) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("retry: ")
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == count:
                    break
    return events


def test_a_receiver_down_across_a_restart_gets_everything(source: Source, tmp_path: Path) -> None:
    receiver = Receiver(free_port())
    env = {**source.env, "WEBHOOK_ENDPOINT": receiver.url, "WEBHOOK_SECRET": SECRET}
    data = tmp_path / "data"
    with run_server(data, env) as server, server.client() as client:
        lifecycle(client, source)
        page = act(client, "GET", "/events", params={"follow": "false", "limit": 1000})
        expected = [e["id"] for e in page["events"]]
        assert page["webhooks"][0]["delivered"] == 0
    receiver.start()
    try:
        with run_server(data, env):
            delivered = receiver.wait_for(len(expected))
            assert [e["id"] for e in delivered][: len(expected)] == expected
    finally:
        receiver.stop()


@pytest.mark.parametrize("step", ["events.reported", "events.delivered"])
def test_a_crash_around_an_event_loses_nothing(source: Source, tmp_path: Path, step: str) -> None:
    """Killed after the image became ready but before its event was written (reported), or
    after a receiver took the event but before its cursor moved (delivered)."""
    receiver = Receiver(free_port())
    receiver.start()
    env = {**source.env, "WEBHOOK_ENDPOINT": receiver.url, "WEBHOOK_SECRET": SECRET}
    data = tmp_path / "data"
    try:
        with run_server(data, {**env, "DATAPLANE_FAILPOINT": step}) as dying:
            with dying.client() as client:
                act(client, "POST", "/images", json={"name": source.image})
            wait_dead(dying.process)
        with run_server(data, env) as server, server.client() as client:
            page = act(client, "GET", "/events", params={"follow": "false", "limit": 1000})
            assert types_of(page["events"]) == ["image.ready"]
            (event,) = page["events"]
            assert event["data"]["status"] == "ready"
            delivered = receiver.wait_for(2 if step == "events.delivered" else 1)
            # At least once: the delivery the crash cut short is made again, same id.
            assert {e["id"] for e in delivered} == {event["id"]}
    finally:
        receiver.stop()


def wait_dead(process: Any) -> None:
    deadline = time.monotonic() + BOUND
    while process.poll() is None:
        assert time.monotonic() < deadline, "the failpoint never fired"
        time.sleep(0.05)
