"""The data file of a volume: a sparse file with ext4 on it, made, filled and grown by e2fsprogs.

Every function here runs host tools (``mkfs.ext4``, ``e2fsck``, ``resize2fs``, ``debugfs``) as
subprocesses, so the event loop never waits on them, and a cancelled caller
kills the tool (anyio's ``run_process``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio

from managers.images.devices import DeviceNode, apply_to_ext4, owners_of
from managers.images.errors import BuildFailed
from managers.volumes.errors import InsufficientStorage, VolumeBuildFailed, VolumeTooSmall

_BLOCK = 4096
# What ext4 needs beside the content: inode tables, bitmaps, the journal, directories.
_METADATA_SHARE = 0.08
_MIN_OVERHEAD = 8 << 20
_NO_ROOM = ("Could not allocate block", "No space left", "Could not allocate inode")

# ``-m 0``: no blocks held back for root (a volume is data, not a system disk). Lazy inode
# table and journal initialisation make a 100 GB volume take milliseconds and no space: the
# kernel zeroes the tables in the background on first mount (ext4lazyinit). ``nodiscard``: a
# fresh sparse file has nothing to discard.
_MKFS = ["mkfs.ext4", "-q", "-F", "-b", str(_BLOCK), "-m", "0",
         "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]  # fmt: skip


async def _run(argv: list[str], what: str) -> str:
    """Run a tool; its combined output, or :class:`VolumeBuildFailed` with the tail of it."""
    try:
        result = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError as error:
        raise VolumeBuildFailed(f"{what}: {argv[0]} is not installed") from error
    output = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
    if result.returncode != 0:
        tail = " | ".join(output.splitlines()[-3:])
        raise VolumeBuildFailed(f"{what} failed (exit {result.returncode}): {tail}")
    return output


def free_bytes(folder: Path) -> int:
    """What an unprivileged write could still use on ``folder``'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def check_room(folder: Path, needed: int) -> None:
    """Refuse (507) a size the filesystem under ``folder`` cannot hold."""
    free = free_bytes(folder)
    if needed > free:
        raise InsufficientStorage(needed, free)


def make_sparse(path: Path, size_bytes: int) -> None:
    """The data file, private to root, all holes (worker thread)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


async def format_empty(path: Path) -> None:
    await _run([*_MKFS, str(path)], "mkfs.ext4")


async def format_from_tree(
    path: Path, tree: Path, size_mb: int, devices: Sequence[DeviceNode] = ()
) -> None:
    """ext4 on ``path`` holding a copy of ``tree`` (owners, modes and links kept), whose
    ``devices`` are placeholders made device nodes on the disk."""
    needed = await anyio.to_thread.run_sync(tree_bytes, tree)
    needed_mb = -(-needed // (1 << 20))
    if needed_mb > size_mb:
        raise VolumeTooSmall(size_mb, needed_mb)
    try:
        await _run([*_MKFS, "-d", str(tree), str(path)], "mkfs.ext4 -d")
    except VolumeBuildFailed as error:
        if any(marker in error.message for marker in _NO_ROOM):
            raise VolumeTooSmall(size_mb, detail=error.message) from error
        raise
    if devices:
        nodes = list(devices)
        owners = await anyio.to_thread.run_sync(owners_of, tree, nodes)
        try:
            await anyio.to_thread.run_sync(apply_to_ext4, path, nodes, owners)
        except BuildFailed as error:
            raise VolumeBuildFailed(error.message) from error


def tree_bytes(tree: Path) -> int:
    """What ``tree`` needs on ext4, roughly: content in whole blocks, an inode each, metadata."""
    seen: set[tuple[int, int]] = set()
    content = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            content += -(-st.st_size // _BLOCK) * _BLOCK + 256
    return content + int(content * _METADATA_SHARE) + _MIN_OVERHEAD


async def grow(path: Path, size_mb: int) -> None:
    """Grow the file to ``size_mb`` and the filesystem with it; safe to run again after a crash.

    ``e2fsck -f`` first: resize2fs refuses a filesystem not checked since it was last
    changed, and after a crash mid-resize it repairs what the resize left half done.
    """
    await check_filesystem(path)
    size = size_mb << 20
    if os.stat(path).st_size < size:
        await anyio.to_thread.run_sync(os.truncate, path, size)
    await _run(["resize2fs", str(path), f"{size // _BLOCK}"], "resize2fs")


async def check_filesystem(path: Path) -> None:
    """``e2fsck -fy``: exit 0 (clean) and 1 (fixed) are both fine."""
    result = await anyio.run_process(
        ["e2fsck", "-f", "-y", str(path)], check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode not in (0, 1):
        tail = " | ".join(result.stdout.decode("utf-8", "replace").strip().splitlines()[-3:])
        raise VolumeBuildFailed(f"e2fsck failed (exit {result.returncode}): {tail}")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
