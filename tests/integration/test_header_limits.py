"""A request head over the limit gets a readable 431 in the API's error shape, not a reset.

The server is uvicorn on 127.0.0.1 in its own process, configured by
``dataplane.cli.server_config`` exactly as the ``dataplane`` command is, in front of a
stand-in app: the limit is enforced below any app. The last test does the same
against the real dataplane.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dataplane.cli import LINGER_SECONDS, MAX_HEADER_BYTES
from tests.support.server import ROOT, free_port, run_server

MEBIBYTE = 1 << 20

# A stand-in app that answers every request 200 with the number of headers it got.
SERVER = """
import json, sys
import uvicorn
from dataplane.cli import server_config
from dataplane.settings import Settings

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"headers": len(scope["headers"])}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

settings = Settings(port=int(sys.argv[1]), listen_addr="127.0.0.1")
uvicorn.Server(server_config(app, settings)).run()
"""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("header-limits") / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_listening(port, process, log_path)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _wait_until_listening(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited during start-up:\n{log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not come up:\n{log_path.read_text()}")


def request(head_bytes: int | None = None, *, method: str = "GET", close: bool = True) -> bytes:
    """A request whose head (request line to the blank line) is ``head_bytes`` long."""
    head = f"{method} /health HTTP/1.1\r\nHost: test\r\n"
    if close:
        head += "Connection: close\r\n"
    if head_bytes is None:
        return (head + "\r\n").encode()
    padding = head_bytes - len(head) - len("Authorization: Bearer \r\n\r\n")
    assert padding > 0
    return (head + "Authorization: Bearer " + "a" * padding + "\r\n\r\n").encode()


def parse(raw: bytes) -> Answer:
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response: {raw[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split(" ")[1]), headers, body)


def exchange(port: int, data: bytes) -> Answer:
    """Send ``data`` on a fresh connection and read until the server closes it.

    A reset (the bug this guards against) surfaces as ``ConnectionResetError``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return parse(_read_to_end(sock))


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def assert_431(answer: Answer) -> None:
    assert answer.status == 431
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert answer.json() == {
        "code": "request_header_fields_too_large",
        "message": f"the request line and headers exceed {MAX_HEADER_BYTES} bytes",
    }


def test_a_one_mebibyte_header_gets_431_then_a_clean_close(port: int) -> None:
    assert_431(exchange(port, request(MEBIBYTE)))
    answer = exchange(port, request())
    assert answer.status == 200
    assert answer.json() == {"headers": 2}


def test_httpx_reads_the_431_instead_of_a_reset(port: int) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{port}/instances",
        headers={"Authorization": "Bearer " + "a" * MEBIBYTE},
        timeout=10,
    )
    assert response.status_code == 431
    assert response.json()["code"] == "request_header_fields_too_large"
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


def test_a_head_of_exactly_the_limit_passes_and_one_byte_more_does_not(port: int) -> None:
    # Sent whole, so h11's own check (of incomplete heads) never sees it: the limit
    # must hold for a head that arrives complete in one read too.
    assert exchange(port, request(MAX_HEADER_BYTES)).status == 200
    assert_431(exchange(port, request(MAX_HEADER_BYTES + 1)))


def test_a_head_sent_in_pieces_is_refused_as_soon_as_it_passes_the_limit(port: int) -> None:
    data = request(4 * MAX_HEADER_BYTES)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data[: MAX_HEADER_BYTES + 4096])
        # The answer comes before the head is complete; the rest is still read and dropped.
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 431 ")
        sock.sendall(data[MAX_HEADER_BYTES + 4096 :])
        assert_431(parse(first + _read_to_end(sock)))


def test_a_kept_alive_connection_gets_its_answer_then_the_431(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request(close=False))
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.endswith(b"}"):
            raw += sock.recv(65536)
        assert parse(raw).status == 200
        sock.sendall(request(MEBIBYTE))
        assert_431(parse(_read_to_end(sock)))


def test_a_head_request_gets_431_without_a_body(port: int) -> None:
    answer = exchange(port, request(2 * MAX_HEADER_BYTES, method="HEAD"))
    assert answer.status == 431
    assert answer.body == b""
    assert int(answer.headers["content-length"]) > 0


def test_a_malformed_head_gets_400_in_the_error_shape(port: int) -> None:
    answer = exchange(port, b"GET /health HTTP/1.1\r\nHost: test\r\nBad Header: x\r\n\r\n")
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"code": "invalid_request", "message": "malformed HTTP/1.1 request"}


def test_a_client_that_keeps_sending_is_cut_off_after_the_linger(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request(2 * MAX_HEADER_BYTES)[: 2 * MAX_HEADER_BYTES - 10])
        assert_431(parse(_read_to_end(sock)))
        started = time.monotonic()
        cut_off_after: float | None = None
        while cut_off_after is None and time.monotonic() - started < LINGER_SECONDS + 10:
            try:
                sock.sendall(b"a" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                cut_off_after = time.monotonic() - started
            time.sleep(0.05)
        assert cut_off_after is not None, "the server read a refused request for ever"
        assert cut_off_after >= LINGER_SECONDS - 0.5


def test_the_dataplane_itself_answers_431(tmp_path: Path) -> None:
    with run_server(tmp_path / "data", {"AUTH_TOKEN": "static-token-for-tests-0123456789"}) as s:
        server_port = int(s.url.rsplit(":", 1)[1])
        assert_431(exchange(server_port, request(MEBIBYTE)))
        assert exchange(server_port, request()).status == 200
