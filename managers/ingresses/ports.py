"""Whether the host could hand a port to an ingress: asked of the kernel by binding it once.

A DNAT rule takes packets before any socket sees them, so an ingress on a port a host
service listens on would silently steal that service's traffic. Binding the port (and
closing it at once) is the kernel's own answer to "is it taken?", and the same bind tells
whether the port is privileged for this process and whether ``listen`` is an address of
this host.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address

from managers.ingresses.errors import InvalidIngressSpec, PortInUse, PrivilegedPort
from managers.network import Protocol

UNPRIVILEGED_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


def check_free(protocol: Protocol, listen: IPv4Address | None, port: int) -> None:
    """Raise unless a socket of ``protocol`` could be bound to ``listen``:``port`` right now."""
    kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
    address = str(listen) if listen is not None else "0.0.0.0"
    where = f"{address}:{port}/{protocol.value}"
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # A connection in TIME_WAIT is no one's port; a listening socket still is. (Not
            # for UDP, where two sockets with SO_REUSEADDR may share a port: the probe would
            # miss a service that set it.)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"host port {where} is in use by a process on the host",
                    {"host_port": port, "protocol": protocol.value},
                ) from error
            if error.errno == errno.EACCES and port < _unprivileged_start():
                raise PrivilegedPort(
                    f"host port {port} is privileged (below {_unprivileged_start()}) and the "
                    "dataplane lacks CAP_NET_BIND_SERVICE; grant it (deploy/dataplane.service "
                    "does) or use a higher port",
                    {"host_port": port},
                ) from error
            if error.errno == errno.EACCES:
                raise PrivilegedPort(
                    f"the kernel refused the dataplane host port {port}: {error.strerror} "
                    "(a security module's policy, not the port's number)",
                    {"host_port": port},
                ) from error
            if error.errno == errno.EADDRNOTAVAIL:
                raise InvalidIngressSpec(
                    f"listen_address {address} is not an address of this host",
                    {"listen_address": address},
                ) from error
            raise


def _unprivileged_start() -> int:
    try:
        with open(UNPRIVILEGED_START) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return 1024
