"""``python -m tests.support.ch_simulator --api-socket path=… [--event-monitor path=…]``.

Started with ``cloud-hypervisor``'s own flags and serving HTTP/1.1 on the API socket. Test only:
it refuses to start unless ``CH_SIMULATOR_VIOLATIONS`` names the file where it records every
request the reference rejects (the test fixture fails the test when that file is not empty).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from .guest import SimulatedGuest
from .spec import ApiSpec, default_spec_path, missing_spec_reason
from .vmm import ApiFailure, SimulatedVmm

_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}
_PREFIX = "/api/v1/"


def _path_option(value: str) -> Path:
    """``path=/x`` (or a bare path, as v53 also accepts for ``--api-socket``)."""
    options = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    if "path" in options:
        return Path(options["path"])
    if "=" not in value:
        return Path(value)
    raise argparse.ArgumentTypeError(f"no path= in {value!r}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor (simulator)")
    parser.add_argument("--api-socket", type=_path_option, required=True)
    parser.add_argument("--event-monitor", type=_path_option)
    parser.add_argument("--serial")
    parser.add_argument("--console")
    parser.add_argument("--log-file")
    parser.add_argument("--no-shutdown", action="store_true")
    parser.add_argument("-v", action="count", default=0)
    return parser.parse_args(argv)


class Server:
    def __init__(self, vmm: SimulatedVmm, violations: Path) -> None:
        self.vmm = vmm
        self.violations = violations

    def record_violation(self, method: str, target: str, failure: ApiFailure) -> None:
        entry = {
            "method": method,
            "path": target,
            "status": failure.status,
            "errors": failure.chain,
        }
        with self.violations.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(f"ch-simulator: REJECTED {method} {target}: {failure.chain}", file=sys.stderr)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self.vmm.exit_requested.is_set():
                request = await self._read_request(reader)
                if request is None:
                    break
                method, target, body = request
                status, payload = await self._answer(method, target, body)
                data = b"" if payload is None else json.dumps(payload).encode()
                head = [
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
                    "Server: Cloud Hypervisor API",
                    "Connection: keep-alive",
                ]
                if data:
                    head.append("Content-Type: application/json")
                head.append(f"Content-Length: {len(data)}")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
        line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            return "BAD", line.decode("latin-1").strip(), b""
        headers: dict[str, str] = {}
        while True:
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        return parts[0], parts[1], body

    async def _answer(self, method: str, target: str, body: bytes) -> tuple[int, object]:
        try:
            if not target.startswith(_PREFIX):
                raise ApiFailure(404, [f"unknown path {target}"], violation=True)
            return self.vmm.handle(method, target[len(_PREFIX) :], body)
        except ApiFailure as failure:
            if failure.violation:
                self.record_violation(method, target, failure)
            return failure.status, failure.chain


async def serve(args: argparse.Namespace, violations: Path) -> int:
    spec = ApiSpec(default_spec_path())
    vmm = SimulatedVmm(
        spec=spec,
        events_path=args.event_monitor,
        no_shutdown=args.no_shutdown,
        guest_behaviour=os.environ.get("CH_SIMULATOR_GUEST", "acpi"),
        guest=SimulatedGuest(os.environ.get("CH_SIMULATOR_AGENT") or None),
    )
    server = Server(vmm, violations)
    socket_path: Path = args.api_socket
    listener = await asyncio.start_unix_server(server.connection, path=str(socket_path))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, vmm.exit_requested.set)
    vmm.event("vmm", "starting")
    async with listener:
        await vmm.exit_requested.wait()
        # Let the answer to vmm.shutdown reach the client before the socket goes.
        await asyncio.sleep(0.05)
    vmm.guest.power_off()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    violations = os.environ.get("CH_SIMULATOR_VIOLATIONS")
    if not violations:
        print(
            "ch-simulator: refusing to run outside tests (CH_SIMULATOR_VIOLATIONS is not set)",
            file=sys.stderr,
        )
        return 2
    arguments = sys.argv[1:] if argv is None else argv
    if arguments == ["--version"]:
        print("cloud-hypervisor v53.0 (simulator)")
        return 0
    args = parse_args(arguments)
    missing = missing_spec_reason()
    if missing is not None:
        print(f"ch-simulator: {missing}", file=sys.stderr)
        return 2
    if args.api_socket.exists():
        print(f"Error: API socket {args.api_socket} already exists", file=sys.stderr)
        return 1
    print("cloud-hypervisor simulator v53.0 (tests only, runs no guest)", flush=True)
    return asyncio.run(serve(args, Path(violations)))


if __name__ == "__main__":
    sys.exit(main())
