"""The guest kernel: Debian's ``linux-image-cloud-amd64``, fetched and unpacked once.

Layout under ``system/kernel/`` (see :class:`managers.paths.Paths`): ``bzImage``, ``vmlinux``,
``tree/`` (the unpacked package, with ``lib/modules/<release>/`` indexed by depmod) and
``version`` (the kernel release), written last: its presence means the rest is complete.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..atomic import write_atomic
from ..paths import Paths
from .errors import KernelFetchError, KernelUnpackError
from .process import run_tool
from .vmlinux import extract_vmlinux

KERNEL_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True, slots=True)
class Kernel:
    release: str
    bzimage: Path
    vmlinux: Path
    modules_dir: Path
    """``lib/modules/<release>`` of the unpacked package: modules.dep lives here."""


def _installed(paths: Paths) -> Kernel | None:
    try:
        release = paths.kernel_version.read_text().strip()
    except OSError:
        return None
    kernel = Kernel(
        release,
        paths.kernel_bzimage,
        paths.kernel_vmlinux,
        paths.kernel_tree / "lib" / "modules" / release,
    )
    parts = (kernel.bzimage, kernel.vmlinux, kernel.modules_dir / "modules.dep")
    return kernel if release and all(p.is_file() for p in parts) else None


def image_package(depends: str) -> str:
    """The versioned image package named by the meta package's ``Depends`` field."""
    for alternative in depends.replace("|", ",").split(","):
        name = alternative.strip().split(" ", 1)[0]
        if name.startswith("linux-image-"):
            version = alternative.partition("(=")[2].strip(" )")
            return f"{name}={version}" if version else name
    raise KernelFetchError(f"{KERNEL_PACKAGE} depends on no linux-image package: {depends!r}")


async def _download(package: str, into: Path) -> Path:
    hint = " (is the apt package list present? run 'apt-get update')"
    try:
        await run_tool(
            ["apt-get", "download", package], cwd=into, error=KernelFetchError, what=package
        )
    except KernelFetchError as exc:
        raise KernelFetchError(f"{exc}{hint}") from exc
    name = package.split("=", 1)[0]
    debs = sorted(await anyio.to_thread.run_sync(lambda: list(into.glob(f"{name}_*.deb"))))
    if not debs:
        raise KernelFetchError(f"apt-get download {package} left no .deb in {into}")
    return debs[-1]


async def fetch_kernel(paths: Paths) -> tuple[Kernel, bool]:
    """The installed kernel, fetching and unpacking it first when missing; True if it did."""
    kernel = _installed(paths)
    if kernel is not None:
        return kernel, False
    staging = paths.tmp / f"kernel-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        meta = await _download(KERNEL_PACKAGE, staging)
        depends = await run_tool(
            ["dpkg-deb", "-f", meta, "Depends"],
            error=KernelUnpackError,
            what="reading " + meta.name,
        )
        image_deb = await _download(image_package(depends.decode().strip()), staging)
        tree = staging / "tree"
        await run_tool(
            ["dpkg-deb", "-x", image_deb, tree], error=KernelUnpackError, what="unpacking kernel"
        )
        releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir())
        if len(releases) != 1:
            raise KernelUnpackError(f"{image_deb.name} holds {len(releases)} module trees, not 1")
        release = releases[0]
        await run_tool(["depmod", "-b", tree, release], error=KernelUnpackError, what="depmod")
        bzimage = tree / "boot" / f"vmlinuz-{release}"
        if not bzimage.is_file():
            raise KernelUnpackError(f"{image_deb.name} has no boot/vmlinuz-{release}")
        await extract_vmlinux(bzimage, staging / "vmlinux")
        await anyio.to_thread.run_sync(_install, paths, staging, bzimage, release)
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
    kernel = _installed(paths)
    if kernel is None:
        raise KernelUnpackError(f"kernel install into {paths.kernel_dir} is incomplete")
    return kernel, True


def _install(paths: Paths, staging: Path, bzimage: Path, release: str) -> None:
    paths.kernel_dir.mkdir(parents=True, exist_ok=True)
    paths.kernel_version.unlink(missing_ok=True)
    shutil.rmtree(paths.kernel_tree, ignore_errors=True)
    bzimage.replace(paths.kernel_bzimage)
    (staging / "vmlinux").replace(paths.kernel_vmlinux)
    (staging / "tree").replace(paths.kernel_tree)
    write_atomic(paths.kernel_version, release.encode() + b"\n")
