"""Device nodes written onto erofs and ext4 disks (managers/images/devices.py)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from managers.images.devices import DeviceNode, _crc32c, apply_to_erofs


def test_crc32c_is_erofs_superblock_checksum() -> None:
    # The Castagnoli CRC of "123456789", without the final inversion erofs leaves out.
    assert _crc32c(b"123456789") == 0xE3069283 ^ 0xFFFFFFFF


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="mkfs.erofs is not installed")
def test_a_placeholder_in_the_superblock_block_keeps_the_checksum_right(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    placeholder = tree / "null"
    placeholder.touch(0o600)
    disk = tmp_path / "disk.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(disk), str(tree)], check=True)
    st = placeholder.stat()
    node = DeviceNode("null", True, 1, 3, 0o666, st.st_ino, st.st_mtime_ns)
    apply_to_erofs(disk, [node])
    block = disk.read_bytes()[:4096]
    _magic, stored, compat = struct.unpack_from("<III", block, 1024)
    assert compat & 1, "mkfs.erofs wrote a superblock checksum"
    rest = bytearray(block[1024:])
    rest[4:8] = bytes(4)
    assert stored == _crc32c(bytes(rest))
    out = subprocess.run(
        ["dump.erofs", "--path=/null", str(disk)], check=True, capture_output=True, text=True
    ).stdout
    assert "NID" in out
