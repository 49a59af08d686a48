"""``dataplane`` / ``python -m dataplane``: read settings, configure logs, serve."""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
from types import FrameType

import uvicorn

from dataplane import __version__
from dataplane.app import create_app
from dataplane.logs import configure
from dataplane.settings import Settings, SettingsError

log = logging.getLogger("dataplane")


OPEN_FILES_CAP = 1 << 20


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
    where = (
        f"unix:{settings.listen_socket}"
        if settings.listen_socket
        else f"{settings.listen_addr}:{settings.port}"
    )
    if not settings.auth_enabled:
        log.warning(
            "neither AUTH_TOKEN nor JWT_SECRET is set: the API is unauthenticated "
            "(listening on %s)",
            where,
        )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.listen_addr,
        port=settings.port,
        uds=str(settings.listen_socket) if settings.listen_socket else None,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # SSE followers would otherwise hold a SIGTERM shutdown open forever.
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal
    # with the handlers it found installed; these make that final step a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server.run()
    # uvicorn leaves `started` False when start-up failed (port in use, lifespan error).
    return 0 if server.started else 1


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
