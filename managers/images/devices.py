"""Device nodes of an image, put on its disk without ever existing on the host.

A layer may hold character and block devices. Made with ``mknod`` in the unpacked tree they
would be live nodes on the host for the length of a build (a disk's major and minor included),
so the unpacker writes an empty regular file, 0600, in their place and records the node
(:class:`DeviceNode`). Once ``mkfs`` made the disk from the tree (the placeholder's owner,
times and xattrs are already the node's), the placeholder's inode is turned into the device
on the disk itself:

- **erofs:** the inode (found by ``dump.erofs --path``) gets the device's type and mode bits and
  its ``rdev``; when it lies in the superblock's block and the image has a superblock checksum,
  the checksum is recomputed. The directory entry's file type stays "regular file", so
  ``readdir``'s ``d_type`` says regular and ``stat`` says device; tools that trust ``d_type``
  alone (few do for devices) would be misled. mkfs.erofs 1.5 has no device table to do better.
- **ext4:** ``debugfs`` removes the placeholder and makes the node, with its mode and owner.
  A hard link to a device becomes a device of its own there (debugfs makes no links to one);
  on erofs the names share the inode, as in the layer.

An image may hold at most :data:`MAX_DEVICE_NODES` of them (real images hold none, or a few
under ``/dev``).
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BuildFailed

MAX_DEVICE_NODES = 1024
_SUPERBLOCK = 1024
_EROFS_MAGIC = 0xE0F5E1E2
_SB_CHKSUM = 0x1
_INODE_SLOT = 32
_TOOL_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A character or block device the image holds at ``rel`` (relative to its root)."""

    rel: str
    char: bool
    major: int
    minor: int
    mode: int  # permission bits, setuid/setgid/sticky included
    ino: int  # the placeholder's inode in the unpacked tree
    mtime_ns: int  # and its mtime: with the inode, what tells it from a file made later

    @property
    def type_bits(self) -> int:
        return stat.S_IFCHR if self.char else stat.S_IFBLK


def still_there(root: Path, nodes: list[DeviceNode]) -> list[DeviceNode]:
    """The nodes whose placeholder a later layer did not remove or replace, and the other
    names a hard link gave a placeholder (each its own node: a device's links are devices)."""
    kept = []
    linked: set[int] = set()
    for node in nodes:
        try:
            st = os.lstat(root / node.rel)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if (
            st.st_ino == node.ino
            and st.st_mtime_ns == node.mtime_ns
            and stat.S_ISREG(st.st_mode)
            and st.st_size == 0
        ):
            kept.append(node)
            if st.st_nlink > 1:
                linked.add(st.st_ino)
    if linked:
        names = {n.rel for n in kept}
        by_ino = {n.ino: n for n in kept}
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                rel = os.path.relpath(path, root)
                if st.st_ino in linked and rel not in names:
                    kept.append(replace(by_ino[st.st_ino], rel=rel))
    return kept


def apply_to_erofs(disk: Path, nodes: list[DeviceNode]) -> None:
    """Turn each node's placeholder inode on the erofs ``disk`` into the device."""
    if not nodes:
        return
    # Hard-linked names share an inode on erofs: patch each inode once.
    nodes = list({node.ino: node for node in nodes}.values())
    nids = [_erofs_nid(disk, node.rel) for node in nodes]
    with disk.open("r+b") as handle:
        handle.seek(_SUPERBLOCK)
        sb = handle.read(128)
        magic, _checksum, compat, blkszbits = struct.unpack_from("<IIIB", sb, 0)
        if magic != _EROFS_MAGIC:
            raise BuildFailed(f"{disk.name} is not an erofs image")
        (meta_blkaddr,) = struct.unpack_from("<I", sb, 40)
        block = 1 << blkszbits
        touched_first_block = False
        for node, nid in zip(nodes, nids, strict=True):
            offset = meta_blkaddr * block + nid * _INODE_SLOT
            handle.seek(offset)
            head = handle.read(16)
            (mode,) = struct.unpack_from("<H", head, 4)
            (size,) = struct.unpack_from("<I", head, 8)  # the low half, on both inode forms
            if not stat.S_ISREG(mode) or size != 0:
                raise BuildFailed(f"the placeholder of device /{node.rel} is not an empty file")
            handle.seek(offset + 4)
            handle.write(struct.pack("<H", node.type_bits | node.mode))
            handle.seek(offset + 16)
            handle.write(struct.pack("<I", _encode_dev(node.major, node.minor)))
            touched_first_block |= offset < block
        if touched_first_block and compat & _SB_CHKSUM:
            handle.seek(_SUPERBLOCK)
            rest = bytearray(handle.read(block - _SUPERBLOCK))
            rest[4:8] = b"\0\0\0\0"
            handle.seek(_SUPERBLOCK + 4)
            handle.write(struct.pack("<I", _crc32c(bytes(rest))))


def apply_to_ext4(disk: Path, nodes: list[DeviceNode], owners: dict[str, tuple[int, int]]) -> None:
    """Replace each node's placeholder on the ext4 ``disk`` with the device, via debugfs."""
    if not nodes:
        return
    lines = []
    for node in nodes:
        path = "/" + node.rel
        if any(ch in ' "\\' or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
            raise BuildFailed(f"device node path {path!r} cannot be written to an ext4 disk")
        uid, gid = owners[node.rel]
        parent, _, base = path.rpartition("/")
        lines += [
            f"rm {path}",
            # debugfs's mknod takes a name in the current directory, not a path.
            f"cd {parent or '/'}",
            f"mknod {base} {'c' if node.char else 'b'} {node.major} {node.minor}",
            "cd /",
            f"sif {path} mode 0{node.type_bits | node.mode:o}",
            f"sif {path} uid {uid}",
            f"sif {path} gid {gid}",
        ]
    result = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(disk)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=_TOOL_TIMEOUT,
        check=False,
    )
    # debugfs reports a failed command on stderr but exits 0; a line naming the path says so.
    problems = [line for line in result.stderr.splitlines() if ": " in line and "/" in line]
    if result.returncode != 0 or problems:
        raise BuildFailed(f"debugfs could not make the device nodes: {result.stderr.strip()}")


def owners_of(root: Path, nodes: list[DeviceNode]) -> dict[str, tuple[int, int]]:
    """Each placeholder's owner, which is the node's (debugfs makes nodes owned by root)."""
    owners = {}
    for node in nodes:
        st = os.lstat(root / node.rel)
        owners[node.rel] = (st.st_uid, st.st_gid)
    return owners


def _erofs_nid(disk: Path, rel: str) -> int:
    result = subprocess.run(
        ["dump.erofs", f"--path=/{rel}", str(disk)],
        capture_output=True,
        text=True,
        timeout=_TOOL_TIMEOUT,
        check=False,
    )
    match = re.search(r"NID: (\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise BuildFailed(f"dump.erofs cannot find /{rel}: {result.stderr.strip()}")
    return int(match.group(1))


def _encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``, as erofs stores ``rdev``."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """erofs's superblock checksum: crc32c seeded with ~0, not inverted at the end."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
