"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1, plain HTTP.

Started with a temporary storage directory and a generated config, waited for, and stopped by PID.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = "docker-registry"


@dataclass(frozen=True)
class LocalRegistry:
    host: str  # 127.0.0.1:PORT, the name images are pushed and pulled under
    storage: Path
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def registry_available() -> bool:
    return shutil.which(REGISTRY_BIN) is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(path: Path, storage: Path, port: int) -> None:
    path.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited early with code {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/v2/", timeout=1) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError("docker-registry did not become ready in time")


@contextlib.contextmanager
def running_registry(workdir: Path) -> Iterator[LocalRegistry]:
    """Start a registry storing under ``workdir``; stop it (by PID) and clean up on exit."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        port = _free_port()
        config = workdir / "config.yml"
        _write_config(config, storage, port)
        log = (workdir / "registry.log").open("ab")
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc)
        except RuntimeError:
            _stop(proc)
            log.close()
            continue  # most likely the port was taken between probing and binding
        try:
            yield LocalRegistry(host=f"127.0.0.1:{port}", storage=storage, pid=proc.pid)
        finally:
            _stop(proc)
            log.close()
        return
    raise RuntimeError(f"docker-registry failed to start; see {workdir / 'registry.log'}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass(frozen=True)
class AuthProxy:
    host: str  # 127.0.0.1:PORT, a registry that demands bearer tokens
    username: str
    password: str


@contextlib.contextmanager
def token_auth_proxy(
    upstream: LocalRegistry, username: str, password: str, *, scheme: str = "bearer"
) -> Iterator[AuthProxy]:
    """A registry front that demands authentication, relaying to ``upstream``.

    ``scheme="bearer"`` speaks the Docker token protocol: ``/v2/*`` without a valid bearer
    token answers 401 with a ``WWW-Authenticate: Bearer`` challenge naming ``/token``, and
    ``/token`` hands out a token for the right Basic credentials only. ``scheme="basic"`` wants
    those credentials on every request (an htpasswd-protected registry).
    """
    tokens: set[str] = set()
    where: list[str] = []  # our own host:port, known once the server is bound
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            address = where[0]
            if self.path.startswith("/token"):
                if self.headers.get("Authorization") != expected:
                    self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {})
                    return
                token = secrets.token_hex(16)
                tokens.add(token)
                self._send(200, json.dumps({"token": token}).encode(), {})
                return
            auth = self.headers.get("Authorization", "")
            if scheme == "basic" and auth != expected:
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
                self._send(401, body, {"WWW-Authenticate": 'Basic realm="test-registry"'})
                return
            if scheme == "bearer" and (not auth.startswith("Bearer ") or auth[7:] not in tokens):
                repo = self.path.split("/")[2:-2]
                challenge = (
                    f'Bearer realm="http://{address}/token",service="test-registry",'
                    f'scope="repository:{"/".join(repo)}:pull"'
                )
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
                self._send(401, body, {"WWW-Authenticate": challenge})
                return
            connection = http.client.HTTPConnection(upstream.host, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() == "accept"}
                connection.request(self.command, self.path, headers=headers)
                response = connection.getresponse()
                body = response.read()
                relay = {
                    k: v
                    for k, v in response.getheaders()
                    if k.lower() in ("content-type", "docker-content-digest", "etag")
                }
                self._send(response.status, body, relay)
            finally:
                connection.close()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = int(server.server_address[1])
    where.append(f"127.0.0.1:{port}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield AuthProxy(host=where[0], username=username, password=password)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
