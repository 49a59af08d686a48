"""A minimal writer for the ``newc`` cpio format the kernel unpacks as an initramfs.

Written here rather than driving ``cpio`` so that the archive is reproducible (fixed owners,
times and inode numbers) and needs no staging directory.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    mode: int
    """Full st_mode: type bits and permissions."""
    data: bytes = b""
    """File content, or the target of a symlink."""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _record(ino: int, entry: Entry | None) -> bytes:
    name = (entry.name if entry else "TRAILER!!!").encode() + b"\0"
    mode, data, rdev = (entry.mode, entry.data, entry.rdev) if entry else (0, b"", (0, 0))
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    return header + name + _pad(len(header) + len(name)) + data + _pad(len(data))


def archive(entries: list[Entry]) -> bytes:
    """The newc archive of ``entries`` in order; parents must come before children."""
    parts = [_record(index + 1, entry) for index, entry in enumerate(entries)]
    parts.append(_record(0, None))
    return b"".join(parts)
