"""The config disk's encoding: exact bytes in, typed errors for what cannot be delivered."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from managers.guest import GuestConfig, InvalidGuestConfig, NetworkConfig, VolumeMount
from managers.guest.config_disk import (
    BLOCK,
    CONFIG_DISK_BYTES,
    MAGIC,
    encode_config,
    write_config_disk,
)

pytestmark = pytest.mark.anyio


def decode(data: bytes) -> list[tuple[int, bytes]]:
    """An independent reader of the format documented in config_disk.py."""
    assert data[:8] == MAGIC
    length, crc = struct.unpack_from("<II", data, 8)
    payload = data[16 : 16 + length]
    assert zlib.crc32(payload) == crc
    assert len(data) % BLOCK == 0
    assert data[16 + length :] == b"\0" * (len(data) - 16 - length)
    records, offset = [], 0
    while offset < length:
        tag, size = struct.unpack_from("<BI", payload, offset)
        records.append((tag, payload[offset + 5 : offset + 5 + size]))
        offset += 5 + size
    return records


def test_full_config_encodes_every_field_in_order() -> None:
    config = GuestConfig(
        entrypoint=["/bin/app", "--x"],
        cmd=["", "a b"],
        env=[("B", "2"), ("A", "x=y")],
        workdir="/srv",
        user="1000:1000",
        hostname="vm-1",
        network=NetworkConfig(
            "192.168.100.5/24", "192.168.100.1", ("1.1.1.1",), "52:54:00:ab:cd:ef"
        ),
        volumes=[("vol-data", "/data", False), VolumeMount("/dev/vdz", "/ro", True)],
    )
    assert decode(encode_config(config)) == [
        (1, b"/bin/app"),
        (1, b"--x"),
        (1, b""),
        (1, b"a b"),
        (2, b"B=2"),
        (2, b"A=x=y"),
        (3, b"/srv"),
        (4, b"1000:1000"),
        (5, b"vm-1"),
        (6, bytes([192, 168, 100, 5, 24])),
        (7, bytes([192, 168, 100, 1])),
        (8, b"1.1.1.1"),
        (9, bytes.fromhex("525400abcdef")),
        (10, b"\x00" + struct.pack("<H", 8) + b"vol-data/data"),
        (10, b"\x01" + struct.pack("<H", 8) + b"/dev/vdz/ro"),
    ]


@given(
    argv=st.lists(st.text(st.characters(blacklist_characters="\0", codec="utf-8")), max_size=6),
    env=st.dictionaries(
        st.text(st.characters(blacklist_characters="\0=", codec="utf-8"), min_size=1, max_size=8),
        st.text(st.characters(blacklist_characters="\0", codec="utf-8")),
        max_size=6,
    ),
)
def test_any_text_arrives_byte_exact(argv: list[str], env: dict[str, str]) -> None:
    config = GuestConfig(entrypoint=["/bin/x"], cmd=argv, env=env)
    records = decode(encode_config(config))
    assert [v for t, v in records if t == 1] == [b"/bin/x", *(a.encode() for a in argv)]
    assert [v for t, v in records if t == 2] == [f"{k}={v}".encode() for k, v in env.items()]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GuestConfig(), "no program"),
        (GuestConfig(entrypoint=[""]), "program name"),
        (GuestConfig(entrypoint=["/bin/x", "a\0b"]), "NUL"),
        (GuestConfig(entrypoint=["/bin/x"], env={"A=B": "1"}), "name"),
        (GuestConfig(entrypoint=["/bin/x"], env={"": "1"}), "name"),
        (GuestConfig(entrypoint=["/bin/x"], env={"A": "\0"}), "NUL"),
        (GuestConfig(entrypoint=["/bin/x"], workdir="relative"), "absolute"),
        (GuestConfig(entrypoint=["/bin/x"], user="app:"), "empty"),
        (GuestConfig(entrypoint=["/bin/x"], hostname="bad host"), "host name"),
        (GuestConfig(entrypoint=["/bin/x"], network=NetworkConfig("10.0.0.1")), "prefix"),
        (GuestConfig(entrypoint=["/bin/x"], network=NetworkConfig("fe80::1/64")), "IPv4"),
        (GuestConfig(entrypoint=["/bin/x"], network=NetworkConfig("10.0.0.2/8", "x")), "gateway"),
        (
            GuestConfig(entrypoint=["/bin/x"], network=NetworkConfig("10.0.0.2/8", dns=("x",))),
            "DNS",
        ),
        (GuestConfig(entrypoint=["/bin/x"], network=NetworkConfig("10.0.0.2/8", mac="zz")), "MAC"),
        (GuestConfig(entrypoint=["/bin/x"], volumes=[("v" * 21, "/d", False)]), "serial"),
        (GuestConfig(entrypoint=["/bin/x"], volumes=[("v", "rel", False)]), "absolute"),
        (GuestConfig(entrypoint=["/bin/x"], volumes=[("v", "/proc", False)]), "/proc"),
        (
            GuestConfig(entrypoint=["/bin/x"], volumes=[("v", "/d", False), ("w", "/d", True)]),
            "two",
        ),
        (GuestConfig(entrypoint=["/bin/x\udcff"]), "UTF-8"),
    ],
)
async def test_invalid_config_raises_and_writes_nothing(
    tmp_path: Path, config: GuestConfig, message: str
) -> None:
    target = tmp_path / "config.img"
    with pytest.raises(InvalidGuestConfig, match=message):
        await write_config_disk(target, config)
    assert [p async for p in anyio.Path(tmp_path).iterdir()] == []


async def test_write_config_disk_rewrites_the_same_file_at_a_fixed_size(tmp_path: Path) -> None:
    target = anyio.Path(tmp_path / "config.img")
    config = GuestConfig(entrypoint=["/bin/x"], env={"LONG": "x" * 10000})
    await write_config_disk(Path(target), config)
    before = await target.stat()
    # A VMM holds the file open: a rewrite must reach that very file, at the size it saw.
    smaller = GuestConfig(entrypoint=["/bin/y"])
    await write_config_disk(Path(target), smaller)
    after = await target.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, CONFIG_DISK_BYTES)
    data = await target.read_bytes()
    encoded = encode_config(smaller)
    assert data[: len(encoded)] == encoded
    assert after.st_mode & 0o777 == 0o600
    assert after.st_blocks * 512 < 1 << 20  # sparse beyond what was written
    assert [p.name async for p in anyio.Path(tmp_path).iterdir()] == ["config.img"]
