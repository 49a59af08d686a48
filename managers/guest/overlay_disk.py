"""The per-instance overlay disk: where the guest's writes to its root filesystem land.

The host may hand the guest a bare sparse file: the init formats a disk that has no
filesystem yet (busybox ``mke2fs``, ext2 mounted by the kernel's ext4 driver). Formatting
on the host with :func:`create_overlay_disk` is faster than doing it under emulation and
gives a real ext4 (journal, extents), so prefer it.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from .errors import OverlayDiskError, ToolMissingError

MIN_SIZE = 8 << 20


async def create_overlay_disk(path: Path, size_bytes: int, *, format_ext4: bool = True) -> None:
    """Create ``path`` as a sparse file of ``size_bytes``, formatted ext4 unless told not to."""
    if size_bytes < MIN_SIZE or size_bytes % 4096:
        raise OverlayDiskError(
            f"overlay size {size_bytes} must be a multiple of 4096 and at least {MIN_SIZE}"
        )
    if await anyio.Path(path).exists():
        raise OverlayDiskError(f"overlay disk {path} already exists")

    def allocate() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The guest's writable layer: readable by root alone.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)

    await anyio.to_thread.run_sync(allocate)
    if not format_ext4:
        return
    argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(path)]
    try:
        result = await anyio.run_process(argv, check=False)
    except FileNotFoundError as exc:
        await anyio.Path(path).unlink(missing_ok=True)
        raise ToolMissingError("mkfs.ext4 is not installed (package e2fsprogs)") from exc
    if result.returncode != 0:
        await anyio.Path(path).unlink(missing_ok=True)
        detail = result.stderr.decode("utf-8", "replace").strip()[-400:]
        raise OverlayDiskError(f"mkfs.ext4 {path} exited with {result.returncode}: {detail}")
