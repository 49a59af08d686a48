"""Logs: how fast a chatty program runs with its output followed, and how soon a line arrives.

1. Throughput: a QEMU/TCG guest prints ``--lines`` lines of 100 bytes (busybox awk) to its
   stdout, an SSE follower attached from the create to the ``end`` event, against the same
   program writing to ``/dev/null`` in the same guest image, in the same run, alternated
   ``--rounds`` times (medians). Each run times itself inside the guest (``/proc/uptime``
   before and after). Target: the followed run at
   >= 0.7 of the ``/dev/null`` speed. The follower must receive every line.
2. Latency: an ``echo`` into the program's stdout (``/proc/PID/fd/1``, through an exec) until
   its SSE event reaches a follower, p50 and p99, beside the round trip of an exec of ``true``
   (what the exec itself costs) measured in the same run.

Exits 1 when the throughput target is missed.

    .venv/bin/python scripts/bench/logs.py [--lines 200000] [--echoes 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent import BOUND, SLEEPER, percentile, wait

from tests.support.apps import push_app
from tests.support.artifacts import shared_artifacts
from tests.support.registry import running_registry
from tests.support.server import run_server, wait_agent_ready

SPEED_TARGET = 0.7
LINE = 100  # bytes, newline included
# Times the work inside the guest; the timing line goes to the console in both runs.
PROGRAM = (
    "read a _ < /proc/uptime; "
    "awk 'BEGIN {{ for (i = 0; i < {lines}; i++) printf \"%099d\\n\", i }}' {redirect}; "
    'read b _ < /proc/uptime; echo "took $a $b"'
)


class Follower:
    """An SSE follower in a thread: each ``log`` event's data and when it arrived."""

    def __init__(self, url: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with (
            httpx.Client(timeout=httpx.Timeout(BOUND, read=None)) as client,
            client.stream("GET", url) as response,
        ):
            event = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "log":
                    self.lines.append((time.perf_counter(), line[6:]))
                elif line.startswith("data: ") and event == "end":
                    break
        self.ended.set()


class Counter:
    """An SSE follower in a thread that only counts ``log`` events, scanning the bytes as they
    come, and keeps the lines that say ``took``: cheap, so the follower's own CPU does not
    stand between the guest and the host's cores."""

    def __init__(self, url: str) -> None:
        self.events = 0
        self.took: list[str] = []
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        tail = b""
        with (
            httpx.Client(timeout=httpx.Timeout(BOUND, read=None)) as client,
            client.stream("GET", url) as response,
        ):
            for chunk in response.iter_raw():
                # Every event is whole once its blank line came: count only those.
                data = tail + chunk
                cut = data.rfind(b"\n\n") + 2
                whole, tail = data[:cut], data[cut:]
                self.events += whole.count(b"event: log\n")
                self.took += [
                    line[6:].decode()
                    for line in whole.split(b"\n")
                    if line.startswith(b"data: took")
                ]
                if b"event: end\n" in whole:
                    break
        self.ended.set()


def followed_run(client: httpx.Client, url: str, image: str, lines: int, redirect: str) -> float:
    """Seconds the guest took to print ``lines`` lines (to its console, or ``redirect``)."""
    script = PROGRAM.format(lines=lines, redirect=redirect)
    created = client.post(
        "/instances",
        json={"name": "chatty", "image": image, "entrypoint": ["/bin/sh", "-c", script]},
    )
    assert created.status_code == 201, created.text
    instance_id = created.json()["id"]
    try:
        follower = Counter(f"{url}/instances/{instance_id}/logs?follow=true")
        if not follower.ended.wait(BOUND * 10):
            raise RuntimeError("the follow did not end")
        took = follower.took
        printed = follower.events - len(took)
        expected = 0 if redirect else lines
        if printed != expected or len(took) != 1:
            raise RuntimeError(f"the follower got {printed} lines, not {expected}: {took}")
        _, start, end = took[0].split()
        return float(end) - float(start)
    finally:
        client.delete(f"/instances/{instance_id}")


def arrival(follower: Follower, seen: int, word: str) -> float:
    """When the follower got ``word``, looking past its first ``seen`` lines."""
    deadline = time.monotonic() + BOUND
    while True:
        for at, text in follower.lines[seen:]:
            if text == word:
                return at
        if time.monotonic() > deadline:
            raise RuntimeError(f"{word} never arrived")
        time.sleep(0.001)


def latency(client: httpx.Client, url: str, image: str, echoes: int) -> None:
    created = client.post("/instances", json={"name": "quiet", "image": image})
    assert created.status_code == 201, created.text
    instance_id = created.json()["id"]
    try:
        wait_agent_ready(client, instance_id)
        follower = Follower(f"{url}/instances/{instance_id}/logs?follow=true")
        exec_url = f"/instances/{instance_id}/exec"
        # The program (the sleeper script, whose process is named for it) and so its stdout.
        find = 'for p in /proc/[0-9]*; do [ "$(cat $p/comm)" = s ] && echo ${p#/proc/}; done'
        found = client.post(exec_url, json={"command": ["/bin/sh", "-c", find]}).json()
        pid = int(found["stdout"].split()[0])
        delays: list[float] = []
        trips: list[float] = []
        for n in range(echoes):
            # At a random moment, not in step with the pump's polls (the last arrival came
            # right after one).
            time.sleep(random.uniform(0, 0.1))
            began = time.perf_counter()
            answer = client.post(exec_url, json={"command": ["true"]})
            trips.append((time.perf_counter() - began) * 1000)
            assert answer.status_code == 200, answer.text
            word = f"echo-{n}"
            seen = len(follower.lines)
            began = time.perf_counter()
            command = ["/bin/sh", "-c", f"echo {word} > /proc/{pid}/fd/1"]
            answer = client.post(exec_url, json={"command": command})
            assert answer.status_code == 200, answer.text
            arrived = arrival(follower, seen, word)
            delays.append((arrived - began) * 1000)
        print(f"\n== latency, echo -> SSE event (n={echoes}) ==")
        print(f"{'what':<28}{'p50 ms':>10}{'p99 ms':>10}")
        for name, samples in (("echo to the SSE follower", delays), ("exec of true", trips)):
            p50, p99 = statistics.median(samples), percentile(samples, 0.99)
            print(f"{name:<28}{p50:10.1f}{p99:10.1f}")
    finally:
        client.delete(f"/instances/{instance_id}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--echoes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    artifacts = shared_artifacts()
    with (
        tempfile.TemporaryDirectory(prefix="logs-bench-") as tmp,
        running_registry(Path(tmp) / "registry") as registry,
    ):
        image = push_app(registry.host, "bench/chatty", {"/app/s": SLEEPER}, entrypoint=["/app/s"])
        env = {
            "HYPERVISOR": "qemu",
            "INSECURE_REGISTRIES": registry.host,
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
        }
        with (
            run_server(Path(tmp) / "data", env) as server,
            httpx.Client(base_url=server.url, timeout=BOUND) as client,
        ):
            assert client.post("/images", json={"name": image}).status_code == 202
            wait(lambda: client.get(f"/images/{quote(image, safe='')}").json()["status"] == "ready")
            nulls: list[float] = []
            consoles: list[float] = []
            for _ in range(args.rounds):  # alternated, so drift on the host hits both alike
                nulls.append(followed_run(client, server.url, image, args.lines, "> /dev/null"))
                consoles.append(followed_run(client, server.url, image, args.lines, ""))
            null, console = statistics.median(nulls), statistics.median(consoles)
            megabytes = args.lines * LINE / 1e6
            print(
                f"\n== throughput, {args.lines} lines of {LINE} bytes ({megabytes:.0f} MB), "
                f"median of {args.rounds} ==",
            )
            print(f"{'where':<24}{'seconds':>10}{'MB/s':>10}")
            for name, seconds in (("/dev/null", null), ("console, followed", console)):
                print(f"{name:<24}{seconds:10.2f}{megabytes / seconds:10.1f}")
            ratio = null / console
            ok = ratio >= SPEED_TARGET
            print(f"followed console at {ratio:.2f} of the /dev/null speed")
            print(f"target >= {SPEED_TARGET}: {'ok' if ok else 'MISSED'}")
            latency(client, server.url, image, args.echoes)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
