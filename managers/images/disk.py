"""Build the bootable root disk from an unpacked tree: erofs (default) or ext4.

The disk is written under a temporary name beside its final path and renamed into place only
when mkfs succeeded, so a crash or failure never leaves a half-made disk under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import anyio

from .devices import DeviceNode, apply_to_erofs, apply_to_ext4, owners_of
from .errors import BuildFailed
from .types import DiskFormat

_EXT4_MIN_BYTES = 32 << 20
_EXT4_BLOCK = 4096


def _tree_usage(root: Path) -> tuple[int, int]:
    """(bytes rounded to 4 KiB blocks, inode count) of a tree; hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    total, inodes = 0, 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            total += -(-st.st_size // _EXT4_BLOCK) * _EXT4_BLOCK
    return total, inodes


async def _run(argv: list[str], what: str) -> None:
    result = await anyio.run_process(argv, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or b"").decode(errors="replace").strip()
        tail = " | ".join(detail.splitlines()[-3:])
        raise BuildFailed(f"{what} failed (exit {result.returncode}): {tail}")


def chain_id(layer_digests: Sequence[str], fmt: DiskFormat) -> str:
    """What a disk is made of: its layers in order and its format. Images that differ only in
    their config (entrypoint, env, user…) have the same chain, so one disk serves them all."""
    text = "\n".join([fmt, *layer_digests])
    return hashlib.sha256(text.encode()).hexdigest()


def link_disk(shared: Path, dest: Path) -> int:
    """Make ``dest`` a second name of the disk ``shared`` (a hard link: the filesystem counts
    the names, and the blocks go with the last); return the disk's size in bytes."""
    # Named like every temporary (``.*.tmp``), so start-up removes one a crash left behind.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.link(shared, tmp)
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest.stat().st_size


async def build_disk(
    tree: Path, dest: Path, fmt: DiskFormat, devices: Sequence[DeviceNode] = ()
) -> int:
    """Make ``dest`` from ``tree``, whose ``devices`` are placeholders (devices.py); return the
    disk's size in bytes."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    nodes = list(devices)
    try:
        if fmt == "erofs":
            # Uncompressed: lz4 halved the disk but the guest read every file 17% slower
            # (scripts/bench/images.py; the package README has the figures).
            await _run(["mkfs.erofs", "--quiet", str(tmp), str(tree)], "mkfs.erofs")
            await anyio.to_thread.run_sync(apply_to_erofs, tmp, nodes)
        else:
            await _build_ext4(tree, tmp)
            owners = await anyio.to_thread.run_sync(owners_of, tree, nodes)
            await anyio.to_thread.run_sync(apply_to_ext4, tmp, nodes, owners)
        await anyio.to_thread.run_sync(_fsync_file, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return (await anyio.Path(dest).stat()).st_size


async def _build_ext4(tree: Path, tmp: Path) -> None:
    content, inodes = await anyio.to_thread.run_sync(_tree_usage, tree)
    inode_count = inodes + inodes // 4 + 256
    # ext4 metadata (inode tables, bitmaps, directories) on top of content, then a margin.
    size = content + inode_count * 256 + content // 10 + _EXT4_MIN_BYTES
    size = -(-size // _EXT4_BLOCK) * _EXT4_BLOCK
    with tmp.open("wb") as handle:
        handle.truncate(size)
    await _run(
        [
            "mkfs.ext4", "-q", "-F", "-b", str(_EXT4_BLOCK), "-N", str(inode_count), "-m", "0",
            "-O", "^has_journal", "-E", "lazy_itable_init=0", "-d", str(tree), str(tmp),
        ],
        "mkfs.ext4",
    )  # fmt: skip


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
