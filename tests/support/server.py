"""A real dataplane server for tests: ``python -m dataplane`` under uvicorn on 127.0.0.1.

The fixture starts it on a free port with the environment a test asks for, waits
until ``/livez`` answers, and stops it by PID with SIGTERM (then SIGKILL if it
hangs). At teardown it fails the test if the server logged a contract violation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def run_server(
    data_dir: Path, env: Mapping[str, str] | None = None, *, check_contract: bool = True
) -> Iterator[RunningServer]:
    port = free_port()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    full_env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("AUTH_TOKEN", "JWT_SECRET", "LISTEN_ADDR", "PORT", "DATA_DIR")
    }
    full_env.update({"PORT": str(port), "DATA_DIR": str(data_dir), "LOG_FORMAT": "json"})
    full_env.update(env or {})
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dataplane"],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_live(server)
        yield server
    finally:
        server.stop()
    if check_contract:
        violations = [line for line in server.log().splitlines() if "contract violation" in line]
        assert not violations, "the server broke its contract:\n" + "\n".join(violations)


def _wait_until_live(server: RunningServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited during start-up:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/livez", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server did not come up in {timeout} s:\n{server.log()}")
