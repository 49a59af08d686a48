"""Unpack a tar (or tar.gz, tar.xz, tar.bz2) into a private folder, refusing anything unsafe.

The rules are those of image archives, made stricter because a volume's tree is plain data:

* every entry stays inside the tree: absolute names and ``..`` are refused, and no entry is
  ever written through a symlink (a parent that is a symlink makes the archive invalid), so a
  link in the archive can point anywhere without reaching the host;
* a hard link must name a regular file the archive already holds;
* device nodes are refused (a tar of data has none; one in a volume import is a mistake or an
  attack); fifos and regular files, directories and symlinks are kept with mode, owner (as
  root) and mtime;
* the sizes of the entries are summed as they come, and the unpack stops the moment they
  pass ``limit`` bytes, so a small compressed bomb never fills the disk.

It runs in a worker thread and checks ``stop`` between entries and between chunks.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import threading
from pathlib import Path

from managers.volumes.errors import InvalidVolumeArchive, VolumeTooSmall

_CHUNK = 1 << 20
# What an entry costs on ext4 beyond its content: an inode and part of a directory block.
_ENTRY_COST = 512
_IS_ROOT = os.geteuid() == 0


class Stopped(Exception):
    """The unpack was cancelled."""


def unpack(archive: Path, tree: Path, limit: int, size_mb: int, stop: threading.Event) -> None:
    """Unpack ``archive`` into ``tree`` (an existing empty folder); see the module's rules."""
    used = 0
    directories: list[tuple[Path, tarfile.TarInfo]] = []
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                if stop.is_set():
                    raise Stopped
                used += max(member.size, 0) + _ENTRY_COST
                if used > limit:
                    detail = f"the archive holds more, at {member.name!r}"
                    raise VolumeTooSmall(size_mb, detail=detail)
                path = _place(tree, member.name)
                if path is None:
                    continue  # the archive's own root folder
                if member.isdir():
                    _make_dir(path)
                    directories.append((path, member))
                    continue
                _clear(path)
                if member.isreg():
                    _copy(tar, member, path, stop)
                elif member.issym():
                    os.symlink(member.linkname, path)
                elif member.islnk():
                    target = _place(tree, member.linkname)
                    if target is None or not _is_file(target):
                        raise InvalidVolumeArchive(
                            f"hard link {member.name!r} names {member.linkname!r}, which is not "
                            "a file the archive holds before it"
                        )
                    os.link(target, path, follow_symlinks=False)
                    continue
                elif member.isfifo():
                    os.mkfifo(path, 0o600)
                elif member.ischr() or member.isblk():
                    raise InvalidVolumeArchive(
                        f"entry {member.name!r} is a device node; a volume takes none"
                    )
                else:
                    raise InvalidVolumeArchive(f"entry {member.name!r} is of an unknown kind")
                _finish(path, member)
    except (tarfile.TarError, EOFError, UnicodeError) as error:
        raise InvalidVolumeArchive(f"not a readable tar archive: {error}") from error
    # Deepest first, after every child is in: a read-only folder still received its entries.
    for path, member in sorted(directories, key=lambda item: len(item[0].parts), reverse=True):
        _finish(path, member)


def _place(tree: Path, name: str) -> Path | None:
    """Where entry ``name`` goes: inside ``tree``, its parents real folders (made if missing)."""
    if name.startswith("/"):
        raise InvalidVolumeArchive(f"entry {name!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidVolumeArchive(f"entry {name!r} climbs out of the tree")
    if not parts:
        return None
    current = tree
    for part in parts[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(mode):
            raise InvalidVolumeArchive(
                f"entry {name!r} goes through {part!r}, which is not a folder (a symlink?)"
            )
    return current / parts[-1]


def _make_dir(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        return
    if not stat.S_ISDIR(mode):
        _clear(path)
        os.mkdir(path, 0o700)


def _clear(path: Path) -> None:
    """A later entry replaces an earlier one of the same name (as tar itself does)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise InvalidVolumeArchive(f"entry {path.name!r} would replace a folder")
    os.unlink(path)


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, stop: threading.Event) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise InvalidVolumeArchive(f"entry {member.name!r} has no content")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with source, os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            if stop.is_set():
                raise Stopped
            out.write(chunk)


def _finish(path: Path, member: tarfile.TarInfo) -> None:
    if _IS_ROOT:
        with contextlib.suppress(OSError):
            os.lchown(path, member.uid, member.gid)
    if not member.issym():
        os.chmod(path, stat.S_IMODE(member.mode))
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
