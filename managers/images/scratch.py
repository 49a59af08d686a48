"""Where an image's tree is unpacked before mkfs turns it into a disk.

Creating thousands of inodes on the data disk is the slowest part of a pull here (ext4 spreads new
directories over block groups; ~0.2 ms per file against ~0.02 ms on tmpfs), and the tree is thrown
away once the disk exists. So a tree goes to RAM (``/dev/shm``) when it fits with room to spare,
else under ``DATA_DIR/system/tmp``. In RAM the trees live in a folder of this node's own,
``/dev/shm/dataplane-images-<key of the data dir>/``, made 0700: ``/dev/shm`` is open to every
user and mounted without ``nodev``, and an image's tree may hold device nodes and setuid files
that no one but root must reach. Start-up removes that folder's contents (this node's
leftovers only), and closing the manager removes the folder once it is empty. ``budget`` is
how much a tree may take where it is: half the free RAM, or the disk's free space, less a
headroom; the unpacker counts every byte it writes against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
from pathlib import Path

DEFAULT_SCRATCH = Path("/dev/shm")
_HEADROOM = 64 << 20


def unpacked_estimate(layers: list[tuple[Path, str]]) -> int:
    """Bytes the unpacked layers need: gzip's trailer records it; otherwise assume 4:1."""
    total = 0
    for path, compression in layers:
        size = path.stat().st_size
        if compression == "gzip" and size >= 18:
            with path.open("rb") as handle:
                handle.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", handle.read(4))
            # ISIZE is modulo 2**32 and a multi-member gzip reports its last member only.
            total += max(isize, size)
        elif compression == "none":
            total += size
        else:
            total += size * 4
    return total


class Scratch:
    def __init__(self, scratch_dir: Path | None, data_root: Path, fallback: Path) -> None:
        self.dir = scratch_dir
        key = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:12]
        self.private = scratch_dir / f"dataplane-images-{key}" if scratch_dir else None
        self.fallback = fallback

    def tree_for(self, digest: str, needed: int) -> Path:
        name = f"{digest.partition(':')[2]}.rootfs"
        if self.private is not None and self._fits(needed):
            try:
                self.private.mkdir(mode=0o700, exist_ok=True)
                os.chmod(self.private, 0o700)
            except OSError:
                return self.fallback / name
            return self.private / name
        return self.fallback / name

    def budget(self, tree: Path) -> int:
        """Bytes a tree at ``tree`` may take: half the free RAM there, or the free disk, less
        a headroom (at least nothing)."""
        try:
            st = os.statvfs(tree.parent)
        except OSError:
            return 0
        free = st.f_bavail * st.f_frsize
        in_ram = self.private is not None and tree.parent == self.private
        return max(0, (free // 2 if in_ram else free) - _HEADROOM)

    def on_disk(self, digest: str) -> Path:
        return self.fallback / f"{digest.partition(':')[2]}.rootfs"

    def _fits(self, needed: int) -> bool:
        assert self.dir is not None
        try:
            st = os.statvfs(self.dir)
        except OSError:
            return False
        free = st.f_bavail * st.f_frsize
        return os.access(self.dir, os.W_OK) and free >= 2 * needed + _HEADROOM

    def close(self) -> None:
        """Remove this node's RAM folder once nothing is in it (a build cut short keeps it)."""
        if self.private is not None:
            with contextlib.suppress(OSError):
                self.private.rmdir()

    def remove_leftovers(self) -> None:
        if self.private is None or not self.private.is_dir():
            return
        for entry in self.private.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
