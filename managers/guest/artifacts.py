"""Everything a VMM needs to boot a guest, prepared once under ``DATA_DIR/system``."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import anyio

from ..paths import Paths
from .errors import OverridePathError
from .initrd import ensure_initrd
from .kernel import Kernel, fetch_kernel
from .types import GuestArtifacts
from .vmlinux import extract_vmlinux, is_elf, kernel_file_version


async def ensure_artifacts(
    system_dir: Path,
    *,
    kernel_path: Path | None = None,
    initrd_path: Path | None = None,
) -> GuestArtifacts:
    """The guest's kernel and initrd, built into ``system_dir`` when missing or stale.

    ``system_dir`` is ``Paths(DATA_DIR).system``. ``kernel_path`` and ``initrd_path`` are the
    ``KERNEL_PATH``/``INITRD_PATH`` overrides. Idempotent and cheap when everything is current.
    Raises a :class:`~managers.guest.errors.ArtifactError` subclass when it cannot.
    """
    artifacts, _ = await build_artifacts(
        system_dir, kernel_path=kernel_path, initrd_path=initrd_path
    )
    return artifacts


async def build_artifacts(
    system_dir: Path,
    *,
    kernel_path: Path | None = None,
    initrd_path: Path | None = None,
) -> tuple[GuestArtifacts, list[str]]:
    """As :func:`ensure_artifacts`, also returning what was done, for people to read."""
    paths = Paths(system_dir.parent)
    kernel_override = _check_override("KERNEL_PATH", kernel_path)
    initrd_override = _check_override("INITRD_PATH", initrd_path)
    # Read before anything is written: a bad override must leave the disk as it was.
    override_release = (
        None if kernel_override is None else await kernel_file_version(kernel_override)
    )
    await anyio.to_thread.run_sync(paths.ensure)
    actions: list[str] = []
    kernel: Kernel | None = None
    lock = await anyio.to_thread.run_sync(_lock, paths.guest_build_lock)
    try:
        if kernel_override is None or initrd_override is None:
            kernel, fetched = await fetch_kernel(paths)
            verb = "fetched and unpacked" if fetched else "up to date:"
            actions.append(f"kernel {verb} {kernel.release} in {paths.kernel_dir}")
        if initrd_override is None:
            assert kernel is not None
            initrd, built = await ensure_initrd(paths, kernel)
            state = "built" if built else "up to date"
            actions.append(f"initrd {state}: {initrd.path} (inputs {initrd.inputs_hash[:16]})")
            initrd_file, initrd_hash = initrd.path, initrd.inputs_hash
        else:
            actions.append(f"initrd from INITRD_PATH: {initrd_override}")
            initrd_file, initrd_hash = initrd_override, ""
        if kernel_override is None or override_release is None:
            assert kernel is not None
            vmlinux, bzimage, release = kernel.vmlinux, kernel.bzimage, kernel.release
        else:
            release = override_release
            vmlinux, bzimage = await _override_kernel(paths, kernel_override, release, actions)
    finally:
        await anyio.to_thread.run_sync(os.close, lock)
    return GuestArtifacts(vmlinux, bzimage, initrd_file, release, initrd_hash), actions


def _check_override(name: str, path: Path | None) -> Path | None:
    if path is None:
        return None
    resolved = Path(path).absolute()
    if not resolved.is_file():
        raise OverridePathError(f"{name} {resolved} does not exist or is not a regular file")
    if not os.access(resolved, os.R_OK):
        raise OverridePathError(f"{name} {resolved} is not readable")
    return resolved


def _lock(path: Path) -> int:
    """An exclusive lock so that ``make setup`` and a starting dataplane never build at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def _override_kernel(
    paths: Paths, kernel: Path, release: str, actions: list[str]
) -> tuple[Path, Path]:
    if await anyio.to_thread.run_sync(is_elf, kernel):
        # An ELF kernel has no bzImage form: both fields name it, and only PVH loaders fit.
        actions.append(f"kernel from KERNEL_PATH (ELF) {kernel}: {release}")
        return kernel, kernel
    digest = await anyio.to_thread.run_sync(_file_sha256, kernel)
    vmlinux = paths.kernel_overrides / f"{digest}.vmlinux"
    if not vmlinux.is_file():
        vmlinux.parent.mkdir(parents=True, exist_ok=True)
        partial = vmlinux.with_suffix(".partial")
        try:
            await extract_vmlinux(kernel, partial)
            partial.replace(vmlinux)
        except BaseException:
            # A disk that filled up must not stay full of half a kernel.
            partial.unlink(missing_ok=True)
            raise
        actions.append(f"vmlinux extracted from KERNEL_PATH {kernel} into {vmlinux}")
    actions.append(f"kernel from KERNEL_PATH {kernel}: {release}")
    return vmlinux, kernel


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
