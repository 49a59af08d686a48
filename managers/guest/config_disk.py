"""The per-instance config disk: how the host hands the instance's config to the init.

The disk is a raw image with no filesystem (nothing to mount, nothing to format)::

    offset 0   8 bytes   magic  b"DPGCFG01"
    offset 8   u32 LE    payload length
    offset 12  u32 LE    CRC-32 (zlib's) of the payload
    offset 16  payload   records: u8 tag, u32 LE length, value bytes
    padding with zeros to a multiple of 4096 bytes (block devices come in whole sectors)

The file is always :data:`CONFIG_DISK_BYTES` long (sparse beyond the payload) and is rewritten
in place, never replaced: a VMM holds the file open and fixed its size when it opened it, so a
change made while it runs (a volume attached) is what the guest reads at its next boot, and it
always fits.

Records, in order: ARG (1, one per argv item), ENV (2, ``NAME=value``), WORKDIR (3), USER (4),
HOSTNAME (5), NET_ADDRESS (6: 4 address bytes + prefix length), NET_GATEWAY (7: 4 bytes),
NET_DNS (8, text), NET_MAC (9: 6 bytes), VOLUME (10: u8 readonly, u16 LE source length, source,
mount path), AGENT (11, text: the guest agent's transport, ``virtio-serial:NAME`` or
``vsock:PORT``), OUTPUT (12, text: where the init relays the program's output, ``console`` for
the virtio console or ``virtio-serial:NAME``; absent, the program writes to the serial port).
Strings are UTF-8 and carried as bytes, so they arrive exactly as given; the only byte they
cannot hold is NUL, which ``execve`` cannot pass either.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
import zlib
from pathlib import Path

import anyio

from .errors import InvalidGuestConfig
from .types import GuestConfig, NetworkConfig

MAGIC = b"DPGCFG01"
BLOCK = 4096
MAX_PAYLOAD = 16 << 20
CONFIG_DISK_BYTES = MAX_PAYLOAD + BLOCK
# virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES).
MAX_SERIAL = 20

TAG_ARG, TAG_ENV, TAG_WORKDIR, TAG_USER, TAG_HOSTNAME = 1, 2, 3, 4, 5
TAG_NET_ADDRESS, TAG_NET_GATEWAY, TAG_NET_DNS, TAG_NET_MAC, TAG_VOLUME = 6, 7, 8, 9, 10
TAG_AGENT, TAG_OUTPUT = 11, 12
_AGENT_TRANSPORT = re.compile(r"^(virtio-serial:[A-Za-z0-9_.-]{1,64}|vsock:[0-9]{1,10})$")
_OUTPUT_TRANSPORT = re.compile(r"^(virtio-serial:[A-Za-z0-9_.-]{1,64}|console)$")

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")


def _text(value: str, what: str) -> bytes:
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidGuestConfig(f"{what} is not valid UTF-8 text: {value!r}") from exc
    if b"\0" in data:
        raise InvalidGuestConfig(f"{what} contains a NUL byte, which a program cannot receive")
    return data


def _record(tag: int, value: bytes) -> bytes:
    return struct.pack("<BI", tag, len(value)) + value


def _absolute(path: str, what: str) -> bytes:
    if not path.startswith("/"):
        raise InvalidGuestConfig(f"{what} {path!r} must be an absolute path")
    return _text(path, what)


def _network(net: NetworkConfig) -> list[bytes]:
    try:
        iface = ipaddress.IPv4Interface(net.address)
    except ValueError as exc:
        raise InvalidGuestConfig(
            f"network address {net.address!r} is not an IPv4 address with prefix"
        ) from exc
    if "/" not in net.address:
        raise InvalidGuestConfig(f"network address {net.address!r} needs a prefix, e.g. /24")
    records = [_record(TAG_NET_ADDRESS, iface.ip.packed + bytes([iface.network.prefixlen]))]
    if net.gateway is not None:
        try:
            gateway = ipaddress.IPv4Address(net.gateway)
        except ValueError as exc:
            raise InvalidGuestConfig(f"gateway {net.gateway!r} is not an IPv4 address") from exc
        records.append(_record(TAG_NET_GATEWAY, gateway.packed))
    for server in net.dns:
        try:
            ipaddress.ip_address(server)
        except ValueError as exc:
            raise InvalidGuestConfig(f"DNS server {server!r} is not an IP address") from exc
        records.append(_record(TAG_NET_DNS, server.encode()))
    if net.mac is not None:
        if not _MAC.fullmatch(net.mac):
            raise InvalidGuestConfig(
                f"MAC address {net.mac!r} is not of the form 52:54:00:12:34:56"
            )
        records.append(_record(TAG_NET_MAC, bytes.fromhex(net.mac.replace(":", ""))))
    return records


def encode_config(config: GuestConfig) -> bytes:
    """The config disk's bytes for ``config``; raises InvalidGuestConfig, never writes."""
    argv = config.argv
    if not argv:
        raise InvalidGuestConfig("entrypoint and cmd are both empty: there is no program to run")
    if argv[0] == "":
        raise InvalidGuestConfig("the program name (argv[0]) is empty")
    records = [_record(TAG_ARG, _text(arg, f"argv[{i}]")) for i, arg in enumerate(argv)]
    for name, value in config.env_pairs:
        if not name or "=" in name:
            raise InvalidGuestConfig(f"environment variable name {name!r} is empty or has '='")
        records.append(_record(TAG_ENV, _text(f"{name}={value}", f"environment {name!r}")))
    if config.workdir:
        records.append(_record(TAG_WORKDIR, _absolute(config.workdir, "workdir")))
    if config.user:
        if ":" in config.user and "" in config.user.split(":", 1):
            raise InvalidGuestConfig(f"user {config.user!r} has an empty user or group part")
        records.append(_record(TAG_USER, _text(config.user, "user")))
    if config.hostname:
        if not _HOSTNAME.fullmatch(config.hostname):
            raise InvalidGuestConfig(f"hostname {config.hostname!r} is not a valid host name")
        records.append(_record(TAG_HOSTNAME, config.hostname.encode()))
    if config.network is not None:
        records += _network(config.network)
    seen: set[str] = set()
    for volume in config.volume_mounts:
        source = _text(volume.source, "volume source")
        if not source or (not volume.source.startswith("/dev/") and len(source) > MAX_SERIAL):
            raise InvalidGuestConfig(
                f"volume source {volume.source!r} must be a /dev/ path or a virtio serial of "
                f"1 to {MAX_SERIAL} bytes"
            )
        path = _absolute(volume.mount_path, "volume mount path")
        if volume.mount_path.rstrip("/") in ("", "/proc", "/sys", "/dev"):
            raise InvalidGuestConfig(f"a volume cannot be mounted on {volume.mount_path!r}")
        if volume.mount_path in seen:
            raise InvalidGuestConfig(f"two volumes are mounted on {volume.mount_path!r}")
        seen.add(volume.mount_path)
        flag = 1 if volume.readonly else 0
        records.append(_record(TAG_VOLUME, struct.pack("<BH", flag, len(source)) + source + path))
    if config.agent_transport:
        if not _AGENT_TRANSPORT.fullmatch(config.agent_transport):
            raise InvalidGuestConfig(
                f"agent transport {config.agent_transport!r} is not virtio-serial:NAME or "
                "vsock:PORT"
            )
        records.append(_record(TAG_AGENT, config.agent_transport.encode()))
    if config.output_transport:
        if not _OUTPUT_TRANSPORT.fullmatch(config.output_transport):
            raise InvalidGuestConfig(
                f"output {config.output_transport!r} is not console or virtio-serial:NAME"
            )
        records.append(_record(TAG_OUTPUT, config.output_transport.encode()))
    payload = b"".join(records)
    if len(payload) > MAX_PAYLOAD:
        raise InvalidGuestConfig(f"config of {len(payload)} bytes exceeds {MAX_PAYLOAD} bytes")
    header = MAGIC + struct.pack("<II", len(payload), zlib.crc32(payload))
    data = header + payload
    return data + b"\0" * (-len(data) % BLOCK)


async def write_config_disk(path: Path, config: GuestConfig) -> None:
    """Write the config disk for ``config`` to ``path`` in place (see the module's docstring).

    Raises :class:`InvalidGuestConfig` before touching the disk when ``config`` cannot be
    delivered byte-exact. A write cut short leaves a payload whose CRC fails, which the init
    refuses; the instance manager writes the disk again whenever that can have happened.
    """
    data = encode_config(config)
    await anyio.to_thread.run_sync(_write_in_place, path, data)


def _write_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, len(data) - len(view))
            view = view[written:]
        os.ftruncate(fd, CONFIG_DISK_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)
