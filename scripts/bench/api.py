"""API overhead: contract validation on vs off, against real servers, in one run.

Starts two dataplane servers on 127.0.0.1 (CONTRACT_VALIDATION=true and false),
sends the same sequential keep-alive requests to each, interleaved in rounds so
that machine noise hits both alike, and prints requests/s, p50 and p99 latency,
the on/off ratio, and the validation cost per request at p50 (target < 1 ms).

    .venv/bin/python scripts/bench/api.py [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.server import run_server

ENDPOINTS = ("/health", "/spec.json")


def measure(client: httpx.Client, path: str, count: int) -> list[float]:
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        samples.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"{path} answered {response.status_code}: {response.text[:200]}")
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="per endpoint and mode")
    parser.add_argument("--rounds", type=int, default=6)
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
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
