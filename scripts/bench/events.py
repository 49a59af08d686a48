"""Events: the outbox's throughput and latency, and the API while 10,000 events drain.

1. Throughput: 10,000 changes reported to the recorder (log append with fsync, then webhook
   delivery, signed, to a receiver on 127.0.0.1), against the same signed bodies POSTed straight
   to the receiver by one client in the same run (no log, no cursor). Events per second, and the
   ratio.
2. Latency from a change being reported to the receiver having it, one change at a time:
   p50 and p99 over 200 changes.
3. The API while 10,000 events drain: a dataplane server started on a data directory whose log
   holds 10,000 undelivered events, ``GET /instances`` p50 while they drain against the p50 on
   the same server once they have drained. Target: ratio <= 1.5.

    .venv/bin/python scripts/bench/events.py [--events 10000]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
from standardwebhooks.webhooks import Webhook

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dataplane.events import Endpoint, Event, EventLog, EventRecorder, EventType, Renderers
from dataplane.events.webhooks import client as webhook_client
from dataplane.events.webhooks import cursor_file, save_cursor
from managers.paths import Paths
from tests.support.server import free_port, run_server

SECRET = "whsec_" + base64.b64encode(b"bench-secret-bench-secret-32byte").decode()
API_RATIO = 1.5


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.arrived: dict[str, float] = {}
        self.count = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.arrived[self.headers["webhook-id"]] = time.perf_counter()
                receiver.count += 1
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def no_render(_: str) -> dict[str, Any] | None:
    return None


DATA = {"id": "0123456789ab", "state": "Running", "name": "bench"}


async def outbox_sections(tmp: Path, count: int, receiver: Receiver) -> None:
    paths = Paths(tmp / "outbox")
    paths.ensure()
    events = EventLog(paths)
    await anyio.to_thread.run_sync(events.open)
    recorder = EventRecorder(events, "NODE_1", Renderers(no_render, no_render))
    cursors = events.root / "cursors"
    cursors.mkdir()
    async with webhook_client() as client, anyio.create_task_group() as tasks:
        endpoint = Endpoint(receiver.url, events, Webhook(SECRET), client, 3600, cursors)
        await anyio.to_thread.run_sync(endpoint.load_cursor)
        tasks.start_soon(recorder.run)
        tasks.start_soon(endpoint.run)

        began = time.perf_counter()
        for _ in range(count):
            recorder.report("instance.paused", DATA["id"], DATA)
        while endpoint.stats.delivered < count:  # noqa: ASYNC110 - counted by the endpoint's task
            await anyio.sleep(0.01)
        outbox = time.perf_counter() - began

        signer = Webhook(SECRET)
        body = json.dumps({"object": "event", "data": DATA}).encode()
        began = time.perf_counter()
        for index in range(count):
            now = datetime.now(UTC)
            headers = {
                "content-type": "application/json",
                "webhook-id": f"raw_{index}",
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signer.sign(f"raw_{index}", now, body),
            }
            await client.post(receiver.url, content=body, headers=headers)
        raw = time.perf_counter() - began
        print(f"\n== outbox throughput ({count} events) ==")
        print(f"recorder -> log (fsync) -> webhook: {count / outbox:8.0f} events/s")
        print(f"signed POSTs straight to receiver:  {count / raw:8.0f} events/s")
        print(f"ratio outbox/raw: {(count / outbox) / (count / raw):.2f}")

        latencies = []
        for _ in range(200):
            start = time.perf_counter()
            recorder.report("instance.resumed", DATA["id"], DATA)
            target = events.event_id(events.next_seq)
            while target not in receiver.arrived:  # noqa: ASYNC110 - set by the receiver's thread
                await anyio.sleep(0.0005)
            latencies.append((receiver.arrived[target] - start) * 1000)
        print("\n== change -> delivery latency (200 changes, one at a time) ==")
        p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
        print(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        tasks.cancel_scope.cancel()


def prefill(data_dir: Path, count: int, url: str) -> None:
    """A data directory whose log holds ``count`` events no endpoint has had."""
    paths = Paths(data_dir)
    paths.ensure()
    events = EventLog(paths)
    events.open()
    for _ in range(count):
        events.append(
            lambda seq, event_id: Event(
                seq, event_id, EventType.INSTANCE_PAUSED, "NODE_1", DATA["id"], DATA,
                datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            )
        )  # fmt: skip
    # The last event is "instance.paused" of an instance the records do not have: start-up
    # reconciliation adds its deletion. The cursor says nothing was delivered.
    cursors = events.root / "cursors"
    cursors.mkdir(exist_ok=True)
    save_cursor(cursor_file(cursors, url), url, 0)


@contextmanager
def draining_server(tmp: Path, count: int, receiver: Receiver) -> Iterator[httpx.Client]:
    data = tmp / "server" / "data"
    prefill(data, count, receiver.url)
    env = {"WEBHOOK_ENDPOINT": receiver.url, "WEBHOOK_SECRET": SECRET, "HYPERVISOR": "qemu"}
    with run_server(data, env) as server, server.client() as client:
        yield client


def api_section(tmp: Path, count: int, receiver: Receiver) -> bool:
    before = receiver.count
    with draining_server(tmp, count, receiver) as client:
        during: list[float] = []
        while receiver.count - before < count:
            began = time.perf_counter()
            assert client.get("/instances").status_code == 200
            during.append((time.perf_counter() - began) * 1000)
            time.sleep(0.005)
        after: list[float] = []
        for _ in range(max(len(during), 50)):
            began = time.perf_counter()
            assert client.get("/instances").status_code == 200
            after.append((time.perf_counter() - began) * 1000)
            time.sleep(0.005)
    ratio = statistics.median(during) / statistics.median(after)
    ok = ratio <= API_RATIO
    print(f"\n== API while {count} events drain ==")
    print(
        f"GET /instances p50 while draining {statistics.median(during):.2f} ms (n={len(during)}),"
    )
    print(f"after {statistics.median(after):.2f} ms; ratio {ratio:.2f}")
    print(f"target ratio <= {API_RATIO}: {'ok' if ok else 'MISSED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    receiver = Receiver()
    try:
        with tempfile.TemporaryDirectory(prefix="events-bench-") as tmp:
            anyio.run(outbox_sections, Path(tmp), args.events, receiver)
            ok = api_section(Path(tmp), args.events, receiver)
    finally:
        receiver.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
