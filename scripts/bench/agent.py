"""The guest agent: exec and file copies through the API against the raw channel, in one run.

The dataplane runs in this process (uvicorn on 127.0.0.1, its event loop in a blocking portal),
so the raw measurements use the very channel the API uses, on the same event loop:

1. Round trips: a PING/PONG on the channel (nothing runs in the guest), ``run_exec`` of ``true``
   on it (the library, no HTTP), and ``POST /instances/{id}/exec`` of ``true`` (the whole API).
   p50 and p99; target: API exec of ``true`` p50 <= 15 ms on QEMU/TCG.
2. Throughput: ``PUT`` and ``GET /instances/{id}/files`` of a 32 MiB file, against 32 MiB of
   64 KiB PINGs echoed by the agent over the same channel (the channel's own ceiling, both
   directions at once).

One registry, one busybox image, one QEMU/TCG instance. Exits 1 when a target is missed.

    .venv/bin/python scripts/bench/agent.py [--round-trips 200] [--megabytes 32]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import uvicorn
from anyio.from_thread import BlockingPortal, start_blocking_portal

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dataplane.app import create_app
from dataplane.cli import server_config
from dataplane.runtime import Runtime
from dataplane.settings import Settings
from managers.agent import Channel, ExecSpec, run_exec
from tests.support.apps import push_app
from tests.support.artifacts import shared_artifacts
from tests.support.registry import running_registry
from tests.support.server import free_port

EXEC_P50_MS = 15.0
BOUND = 120.0
SLEEPER = "#!/bin/sh\nwhile :; do sleep 1; done\n"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(count: int, work: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        work()
        samples.append((time.perf_counter() - began) * 1000)
    return samples


@contextlib.contextmanager
def served(settings: Settings, portal: BlockingPortal) -> Iterator[tuple[str, Runtime]]:
    app = create_app(settings)
    server = uvicorn.Server(server_config(app, settings))
    future = portal.start_task_soon(server.serve)
    deadline = time.monotonic() + BOUND
    while not server.started:
        if future.done():
            future.result()
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}", app.state.runtime
    finally:
        server.should_exit = True
        future.result(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=32)
    args = parser.parse_args()
    artifacts = shared_artifacts()
    failed = False
    with (
        tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp,
        running_registry(Path(tmp) / "registry") as registry,
        start_blocking_portal() as portal,
    ):
        image = push_app(registry.host, "bench/sleeper", {"/app/s": SLEEPER}, entrypoint=["/app/s"])
        settings = Settings.from_env(
            {
                "DATA_DIR": str(Path(tmp) / "data"),
                "PORT": str(free_port()),
                "LISTEN_ADDR": "127.0.0.1",
                "HYPERVISOR": "qemu",
                "INSECURE_REGISTRIES": registry.host,
                "KERNEL_PATH": str(artifacts.bzimage),
                "INITRD_PATH": str(artifacts.initrd),
            }
        )
        with (
            served(settings, portal) as (url, runtime),
            httpx.Client(base_url=url, timeout=BOUND) as client,
        ):
            assert client.post("/images", json={"name": image}).status_code == 202
            wait(lambda: client.get(f"/images/{quote(image, safe='')}").json()["status"] == "ready")
            created = client.post("/instances", json={"name": "bench", "image": image})
            assert created.status_code == 201, created.text
            instance_id = created.json()["id"]
            try:
                wait(lambda: client.get(f"/instances/{instance_id}").json()["agent"]["ready"])
                channel: Channel = portal.call(runtime.require_instances().agent, instance_id)
                failed |= round_trips(client, portal, channel, instance_id, args.round_trips)
                throughput(client, portal, channel, instance_id, args.megabytes)
            finally:
                client.delete(f"/instances/{instance_id}")
    return 1 if failed else 0


def wait(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def on_loop(portal: BlockingPortal, work: Callable[[], Awaitable[Any]]) -> Callable[[], Any]:
    return lambda: portal.call(work)


def round_trips(
    client: httpx.Client, portal: BlockingPortal, channel: Channel, instance_id: str, count: int
) -> bool:
    true = ExecSpec(command=("true",))

    async def library_exec() -> None:
        result = await run_exec(channel, true, stdin=None, timeout_seconds=30, output_limit=1024)
        assert result.exit_code == 0

    def api_exec() -> None:
        answer = client.post(f"/instances/{instance_id}/exec", json={"command": ["true"]})
        if answer.status_code != 200 or answer.json()["exit_code"] != 0:
            raise RuntimeError(f"exec of true failed: {answer.text}")

    for warm in (on_loop(portal, channel.ping), on_loop(portal, library_exec), api_exec):
        timed(5, warm)
    rows = {
        "raw PING/PONG": timed(count, on_loop(portal, channel.ping)),
        "run_exec(true)": timed(count, on_loop(portal, library_exec)),
        "API exec true": timed(count, api_exec),
    }
    print(f"\n== round trips (n={count}) ==")
    print(f"{'what':<18}{'p50 ms':>10}{'p99 ms':>10}")
    for name, samples in rows.items():
        print(f"{name:<18}{statistics.median(samples):10.2f}{percentile(samples, 0.99):10.2f}")
    p50 = statistics.median(rows["API exec true"])
    raw = statistics.median(rows["raw PING/PONG"])
    ok = p50 <= EXEC_P50_MS
    print(f"API exec p50 {p50:.2f} ms = raw round trip x {p50 / raw:.1f}")
    print(f"target API exec p50 <= {EXEC_P50_MS:.0f} ms: {'ok' if ok else 'MISSED'}")
    return not ok


def throughput(
    client: httpx.Client, portal: BlockingPortal, channel: Channel, instance_id: str, mb: int
) -> None:
    size = mb << 20
    payload = os.urandom(size)
    chunk = 65536

    async def raw_echo() -> None:
        # Pipelined: a window of 32 PINGs in flight, as the file copies keep a window in flight.
        async with anyio.create_task_group() as tasks:
            limiter = anyio.Semaphore(32)

            async def one(offset: int) -> None:
                async with limiter:
                    await channel.ping(payload[offset : offset + chunk])

            for offset in range(0, size, chunk):
                tasks.start_soon(one, offset)

    began = time.perf_counter()
    portal.call(raw_echo)
    raw_seconds = time.perf_counter() - began

    began = time.perf_counter()
    put = client.put(
        f"/instances/{instance_id}/files",
        params={"path": "/tmp/bench.bin"},
        content=payload,
        headers={"Content-Type": "application/octet-stream"},
    )
    put_seconds = time.perf_counter() - began
    assert put.status_code == 200, put.text
    digest = hashlib.sha256()
    began = time.perf_counter()
    where = {"path": "/tmp/bench.bin"}
    with client.stream("GET", f"/instances/{instance_id}/files", params=where) as r:
        for part in r.iter_bytes():
            digest.update(part)
    get_seconds = time.perf_counter() - began
    assert digest.digest() == hashlib.sha256(payload).digest()
    print(f"\n== throughput ({mb} MiB) ==")
    print(f"{'what':<30}{'MB/s':>10}{'vs raw':>10}")
    raw_rate = mb / raw_seconds
    for name, seconds in (("raw PING echo (both ways)", raw_seconds),
                          ("API upload (PUT files)", put_seconds),
                          ("API download (GET files)", get_seconds)):  # fmt: skip
        rate = mb / seconds
        print(f"{name:<30}{rate:10.1f}{rate / raw_rate:10.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
