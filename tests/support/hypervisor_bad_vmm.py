"""A misbehaving VMM, started in place of ``cloud-hypervisor`` or ``qemu-system-x86_64``.

``python -m tests.support.hypervisor_bad_vmm MODE PIDFILE -- <the VMM's own arguments>``:

- ``hang``: never creates its socket;
- ``die``: prints an error and exits 3;
- ``garbage``: listens on the socket the arguments name and answers any connection with bytes
  that are neither HTTP nor QMP;
- ``old-version``: a Cloud Hypervisor API that reports version 41.0 on ``vmm.ping``.

It writes its pid to PIDFILE first, so the test can check, by pid, that nothing outlived it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

GARBAGE = b"\x00\xffSSH-2.0-not-a-vmm\r\n\x1b[31m{{{{\r\n\r\n"


def socket_path(args: list[str]) -> Path:
    for index, arg in enumerate(args):
        if arg == "--api-socket":
            return Path(args[index + 1].split("path=", 1)[1].split(",", 1)[0])
        if arg == "-qmp":
            return Path(args[index + 1].removeprefix("unix:").split(",", 1)[0])
    raise SystemExit("no socket in arguments")


def serve(path: Path, answer: bytes) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                if answer.startswith(b"HTTP"):
                    conn.recv(65536)
                conn.sendall(answer)
                time.sleep(0.2)


def main() -> None:
    mode, pidfile = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    pidfile.write_text(str(os.getpid()))
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "die":
        print("bad-vmm: failed to open /dev/kvm: Permission denied", file=sys.stderr, flush=True)
        raise SystemExit(3)
    path = socket_path(args)
    if mode == "garbage":
        serve(path, GARBAGE)
    if mode == "old-version":
        body = b'{"version":"41.0","build_version":"v41.0","pid":1}'
        serve(
            path,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
        )
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
