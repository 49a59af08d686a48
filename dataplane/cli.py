"""``dataplane`` / ``python -m dataplane``: read settings, configure logs, serve."""

from __future__ import annotations

import argparse
import asyncio
import http
import logging
import resource
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from dataplane import __version__
from dataplane.app import create_app
from dataplane.errors import JSON, error_body
from dataplane.logsetup import configure
from dataplane.settings import Settings, SettingsError
from dataplane.tls import ReloadableContext

log = logging.getLogger("dataplane")


OPEN_FILES_CAP = 1 << 20

MAX_HEADER_BYTES = 64 * 1024
"""The most a request line plus its header lines may take; a longer head gets 431."""

# How long a refused request may keep arriving after its answer. Closing a socket with
# unread bytes makes the kernel send a reset, and the client then loses the answer.
LINGER_SECONDS = 2.0


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one; returns the new soft limit.

    Each instance holds a few descriptors for as long as it lives (its VMM's API
    connection, a pidfd, the VMM's event file), and distributions start services
    with a soft limit of 1024, which would cap a node at a few hundred instances.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # VMMs inherit it; some hosts' hard limit is about 2**30, more than anything needs.
    target = min(hard, OPEN_FILES_CAP) if hard != resource.RLIM_INFINITY else OPEN_FILES_CAP
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d: %s", soft, error)
    return soft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dataplane",
        description="Serve the dataplane API. Configuration comes from the environment "
        "(see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"dataplane {__version__}")
    parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"dataplane: invalid configuration: {error}", file=sys.stderr)
        return 2

    configure(settings.log_format, settings.log_level)
    open_files = raise_open_file_limit()
    log.debug("open-file limit: %d", open_files)
    scheme = "https" if settings.tls is not None else "http"
    where = (
        f"unix:{settings.listen_socket}"
        if settings.listen_socket
        else f"{scheme}://{settings.listen_addr}:{settings.port}"
    )
    if not settings.auth_enabled:
        log.warning(
            "neither AUTH_TOKEN nor JWT_SECRET is set: the API is unauthenticated "
            "(listening on %s)",
            where,
        )
    tls = ReloadableContext(settings.tls) if settings.tls is not None else None
    config = server_config(create_app(settings), settings, tls)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal
    # with the handlers it found installed; these make that final step a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    if tls is not None:
        # The certificate, key and client CA are read again; open connections are untouched.
        signal.signal(signal.SIGHUP, lambda _signum, _frame: tls.reload())
    server.run()
    # uvicorn leaves `started` False when start-up failed (port in use, lifespan error).
    return 0 if server.started else 1


def server_config(
    app: Callable[..., Any], settings: Settings, tls: ReloadableContext | None = None
) -> uvicorn.Config:
    """How ``dataplane`` serves ``app``: one place, so tests can serve a stand-in app
    exactly as the command serves the real one."""
    config = uvicorn.Config(
        app,
        host=settings.listen_addr,
        port=settings.port,
        uds=str(settings.listen_socket) if settings.listen_socket else None,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # Chosen rather than "auto": httptools, when installed, has no header size limit.
        http=HeadLimitedH11Protocol,
        # wsproto (pure Python, on h11) serves the interactive exec WebSocket.
        ws="wsproto",
        # SSE followers would otherwise hold a SIGTERM shutdown open forever.
        timeout_graceful_shutdown=10,
        # Named so uvicorn knows it serves HTTPS (the scope's scheme); the context it would
        # build from them is replaced below by one that can be reloaded.
        ssl_certfile=str(tls.files.cert) if tls is not None else None,
        ssl_keyfile=str(tls.files.key) if tls is not None else None,
    )
    if tls is not None:
        config.load()
        config.ssl = tls.listening
    return config


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


class _HeadLimitedConnection(h11.Connection):
    """h11 measures only a head that is still incomplete, so one that arrived whole in a
    single read (asyncio reads up to 256 KiB) would pass; this measures complete heads too."""

    def __init__(self) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.refusal: h11.RemoteProtocolError | None = None
        self.refused_head_request = False

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            self.refusal = error
            # An answer to HEAD has no body. A head refused for its size is still in the
            # buffer, unparsed; a malformed one was consumed, so its method is unknown.
            if error.error_status_hint == 431:
                unparsed, _ = self.trailing_data
                self.refused_head_request = unparsed.lstrip().startswith(b"HEAD ")
            raise
        if isinstance(event, h11.Request) and _head_size(event) > MAX_HEADER_BYTES:
            self.refused_head_request = event.method == b"HEAD"
            self.refusal = h11.RemoteProtocolError("request head too large", error_status_hint=431)
            raise self.refusal
        return event


def _head_size(request: h11.Request) -> int:
    # As sent, give or take optional whitespace: "GET /path HTTP/1.1", "name: value", "".
    line = len(request.method) + len(request.target) + len(request.http_version) + 9
    fields = sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items())
    return line + fields + 2


class HeadLimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering a request head it cannot take (too large: 431,
    malformed: 400) with a JSON error in the API's shape and a close the client can read.

    uvicorn answers both with a plain-text 400 and closes at once, so a client still
    sending a large head gets a connection reset instead of the answer.
    """

    conn: _HeadLimitedConnection

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _HeadLimitedConnection()
        self._linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # A request whose handler is running broke its body framing: uvicorn's own
        # answer, as the handler may have started a response of its own.
        if self.cycle is not None and not self.cycle.response_complete:
            super().send_400_response(msg)
            return
        refusal = self.conn.refusal
        if refusal is not None and refusal.error_status_hint == 431:
            status = 431
            body = error_body(
                "request_header_fields_too_large",
                f"the request line and headers exceed {MAX_HEADER_BYTES} bytes",
            )
        else:
            status = 400
            body = error_body("invalid_request", "malformed HTTP/1.1 request")
        self._refuse(status, body)

    def _refuse(self, status: int, body: bytes) -> None:
        # Written directly, not through h11: its state (a peer in ERROR, or one whose
        # request it already took) no longer matters on a connection about to close.
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"content-type: {JSON}\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode("ascii")
        self.transport.write(head if self.conn.refused_head_request else head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Reading goes on (uvicorn may have paused it) so the rest can be drained.
        self.flow.resume_reading()
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._linger is not None:
            self.transport.close()
            return
        super().shutdown()
