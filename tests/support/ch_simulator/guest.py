"""The simulator's stand-in guest: hybrid vsock as Cloud Hypervisor serves it, and an agent.

Cloud Hypervisor's vsock device listens on ``vsock.socket``; a host client connects, writes
``CONNECT <port>\\n``, and gets ``OK <host port>\\n`` once the guest accepted on that port, after
which the connection carries the stream. A guest with no listener on the port makes the VMM close
the connection. This module keeps those semantics.

The guest behind it (only when ``CH_SIMULATOR_AGENT`` names the standalone build of our guest
agent, ``managers.guest.initrd.compile_standalone_agent``) is that agent run as a host process:
it listens on a private Unix socket for guest port 1024, and is stopped (SIGSTOP) while the VM
is paused, as a paused guest's agent would be. Our init's markers are written to the serial file
on boot, so an instance reads Running. Its commands run on the host, as ``nobody``: test only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path

AGENT_PORT = 1024
_MARKER = "@@dataplane-guest@@ "
# Cloud Hypervisor numbers host-side ports of host-initiated connections from here.
_FIRST_HOST_PORT = 1 << 30
_PR_SET_PDEATHSIG = 1


class SimulatedGuest:
    def __init__(self, agent_binary: str | None) -> None:
        self.agent_binary = agent_binary
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_socket: Path | None = None
        self.listener: asyncio.Server | None = None
        self.vsock_path: Path | None = None
        self.connections: set[asyncio.StreamWriter] = set()
        self.next_port = _FIRST_HOST_PORT
        self.restored = False

    @property
    def enabled(self) -> bool:
        return self.agent_binary is not None

    # -- lifecycle, called by the VMM state machine ----------------------------------------
    def boot(self, config: dict[str, object], serial: Path | None) -> None:
        """Start the devices and the guest; raises OSError when the vsock socket cannot be made."""
        vsock = config.get("vsock")
        if isinstance(vsock, dict) and self.vsock_path is None:
            self._listen(Path(str(vsock["socket"])))
        if not self.enabled:
            return
        if serial is not None and not self.restored:
            with serial.open("a") as handle:
                handle.write(f"\n{_MARKER}init-started\n\n{_MARKER}program-started\n")
        if self.vsock_path is not None:
            self._start_agent(self.vsock_path.with_name(self.vsock_path.name + ".guest"))

    def pause(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGCONT)

    def power_off(self) -> None:
        self._stop_agent()
        for writer in list(self.connections):
            writer.close()
        self.connections.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.vsock_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.vsock_path.unlink()
            self.vsock_path = None

    # -- internals -------------------------------------------------------------------------
    def _listen(self, path: Path) -> None:
        # Bound now, as the device is made during the request; connections wait in the backlog
        # until the server task runs. Like the real device, an existing path is refused.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self.vsock_path = path
        asyncio.get_running_loop().create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        self.listener = await asyncio.start_unix_server(self._connection, sock=sock)

    def _start_agent(self, socket: Path) -> None:
        assert self.agent_binary is not None
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()
        self.agent_socket = socket
        self.agent = subprocess.Popen(
            [
                self.agent_binary,
                "--listen-unix", str(socket),
                "--user", "65534:65534",
                "--workdir", "/",
                "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ],
            cwd="/",
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # The guest ends with its VMM, even one killed by SIGKILL (fault-injection tests).
            preexec_fn=_die_with_parent,
        )  # fmt: skip

    def _stop_agent(self) -> None:
        agent, self.agent = self.agent, None
        if agent is None:
            return
        if agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        if self.agent_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.agent_socket.unlink()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        try:
            line = await reader.readline()
            parts = line.decode("latin-1").split()
            if len(parts) != 2 or parts[0] != "CONNECT" or not parts[1].isdigit():
                return
            target = self._guest_listener(int(parts[1]))
            if target is None:
                return  # nothing listens on that port in the guest: the VMM drops the stream
            try:
                guest_reader, guest_writer = await asyncio.open_unix_connection(str(target))
            except OSError:
                return
            self.next_port += 1
            writer.write(f"OK {self.next_port}\n".encode())
            await writer.drain()
            await _splice(reader, writer, guest_reader, guest_writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections.discard(writer)
            writer.close()

    def _guest_listener(self, port: int) -> Path | None:
        if port != AGENT_PORT or self.agent is None or self.agent.poll() is not None:
            return None
        if self.agent_socket is None or not self.agent_socket.exists():
            return None
        return self.agent_socket


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(125)


async def _splice(
    host_reader: asyncio.StreamReader,
    host_writer: asyncio.StreamWriter,
    guest_reader: asyncio.StreamReader,
    guest_writer: asyncio.StreamWriter,
) -> None:
    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    await asyncio.gather(copy(host_reader, guest_writer), copy(guest_reader, host_writer))
