"""A real dataplane server for tests: ``python -m dataplane`` under uvicorn on 127.0.0.1.

The fixture starts it on a free port with the environment a test asks for, waits
until ``/livez`` answers, and stops it by PID with SIGTERM (then SIGKILL if it
hangs). At teardown it fails the test if the server logged a contract violation.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from managers.hypervisors import terminate_recorded
from tests.support.ch_simulator import WRAPPER as SIMULATOR
from tests.support.ch_simulator.spec import require_spec

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    uds: Path | None = None
    # For an HTTPS server: the client context (trusted CA, and a client certificate for mTLS).
    tls: ssl.SSLContext | None = None

    def client(self, timeout: float = 60.0) -> httpx.Client:
        """An HTTP client for this server, over TCP or over its Unix socket."""
        transport = httpx.HTTPTransport(uds=str(self.uds)) if self.uds else None
        return httpx.Client(
            base_url=self.url, transport=transport, timeout=timeout, verify=self.tls or True
        )

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
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    check_contract: bool = True,
    netns: str | None = None,
    keep_vmms: bool = False,
    tls: ssl.SSLContext | None = None,
    wrapper: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Serve on a free TCP port, or, inside the network namespace ``netns``, on a Unix
    socket (a namespace's loopback is out of this process's reach; a socket file is not).

    VMMs outlive the dataplane by design, so at exit every VMM recorded under
    ``data_dir`` is ended (by its recorded pid). ``keep_vmms`` spares them when the
    block ends normally, for a test that starts a second server on the same data;
    when the block fails they are ended all the same.

    A server whose ``CLOUD_HYPERVISOR_BIN`` is the Cloud Hypervisor simulator skips the
    test when the simulator's reference spec is absent (a plain clone).
    """
    port = free_port()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    uds = data_dir.parent / f"api-{port}.sock" if netns else None
    full_env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("AUTH_TOKEN", "JWT_SECRET", "LISTEN_ADDR", "PORT", "DATA_DIR")
    }
    full_env.update({"PORT": str(port), "DATA_DIR": str(data_dir), "LOG_FORMAT": "json"})
    if uds is not None:
        full_env["LISTEN_SOCKET"] = str(uds)
    full_env.update(env or {})
    binary = full_env.get("CLOUD_HYPERVISOR_BIN")
    if binary and Path(binary).resolve() == SIMULATOR:
        require_spec(full_env)
        # A simulated guest takes no host CPU or memory, so admission against a small CI
        # machine's cores would refuse tests about something else; a test about admission
        # sets the ratios itself.
        for ratio in ("CPU_OVERSUB_RATIO", "MEMORY_OVERSUB_RATIO"):
            if ratio not in (env or {}):
                full_env[ratio] = "64"
    # ``wrapper`` runs the server under another command (setpriv, to drop capabilities).
    prefix = (["ip", "netns", "exec", netns] if netns else []) + list(wrapper)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "dataplane"],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    scheme = "https" if tls is not None else "http"
    url = f"{scheme}://dataplane" if uds else f"{scheme}://127.0.0.1:{port}"
    server = RunningServer(url, process, log_path, uds, tls)
    try:
        _wait_until_live(server)
        yield server
    except BaseException:
        server.stop()
        reap_vmms(data_dir)
        raise
    server.stop()
    if not keep_vmms:
        reap_vmms(data_dir)
    if check_contract:
        violations = [line for line in server.log().splitlines() if "contract violation" in line]
        assert not violations, "the server broke its contract:\n" + "\n".join(violations)


def wait_agent_ready(
    client: httpx.Client, instance_id: str, bound: float = 120.0
) -> dict[str, Any]:
    """Poll the instance until it is Running and its guest agent answers; its last body."""
    deadline = time.monotonic() + bound
    while True:
        body: dict[str, Any] = client.get(f"/instances/{instance_id}").json()
        if body["state"] == "Running" and body["agent"]["ready"]:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def wait_guest_settled(client: httpx.Client, bound: float = 120.0) -> dict[str, Any]:
    """Poll /health until start-up has prepared the guest or given up on it; its ``guest``."""
    deadline = time.monotonic() + bound
    while (guest := client.get("/health").json()["guest"])["status"] == "preparing":
        assert time.monotonic() < deadline, "the guest is still being prepared"
        time.sleep(0.05)
    return dict(guest)


def import_image(client: httpx.Client, archive: Path, bound: float = 120.0) -> str:
    """Import an OCI archive through the API, wait until its image is ready; its digest."""
    imported = client.post(
        "/images/import",
        content=archive.read_bytes(),
        headers={"content-type": "application/x-tar"},
    )
    assert imported.status_code == 202, imported.text
    digest = str(imported.json()["digest"])
    deadline = time.monotonic() + bound
    while (image := client.get(f"/images/{digest}").json())["status"] != "ready":
        assert image["status"] != "failed", image
        assert time.monotonic() < deadline, f"the import is still {image['status']}"
        time.sleep(0.1)
    return digest


def reap_vmms(data_dir: Path) -> None:
    """End every VMM whose record is under ``data_dir`` (none is left after a clean test)."""
    instances = data_dir / "instances"
    if not instances.is_dir():
        return
    for folder in instances.iterdir():
        if folder.is_dir():
            anyio.run(terminate_recorded, folder)


def _wait_until_live(server: RunningServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited during start-up:\n{server.log()}")
        try:
            with server.client(timeout=1.0) as client:
                if client.get("/livez").status_code == 200:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server did not come up in {timeout} s:\n{server.log()}")
