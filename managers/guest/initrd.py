"""The initrd: our init, busybox-static and the guest's kernel modules, in one cpio.

It is rebuilt only when the hash of its inputs changes: the init's sources (the guest agent
among them) and compiler flags, the busybox binary, the kernel release and the bytes of every
module it carries.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..atomic import write_atomic
from ..paths import Paths
from . import cpio
from .errors import InitCompileError, InitrdBuildError
from .kernel import Kernel
from .modules import grouped_load_order, read_index
from .process import run_tool

INIT_DIR = Path(__file__).parent / "init"
# The guest agent is part of the init (a forked child, see init/agent.h); built on its own with
# -DAGENT_STANDALONE it is a host program for tests and the Cloud Hypervisor simulator.
AGENT_SOURCES = ("agent.c", "tar.c", "common.c")
INIT_SOURCES = ("init.c", *AGENT_SOURCES)
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Wno-format-truncation")
BUSYBOX = Path("/bin/busybox")
MODULE_LIST = "etc/dataplane/modules"
# Bump when the archive's layout changes without any input changing.
LAYOUT_VERSION = b"initrd-layout-1"


@dataclass(frozen=True, slots=True)
class Initrd:
    path: Path
    inputs_hash: str


def require_static(busybox: Path) -> bytes:
    try:
        data = busybox.read_bytes()
    except OSError as exc:
        raise InitrdBuildError(
            f"{busybox}: {exc.strerror} (install the busybox-static package)"
        ) from exc
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise InitrdBuildError(f"{busybox} is not a 64-bit ELF executable")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + index * phentsize)
        if p_type == 3:  # PT_INTERP: dynamically linked
            raise InitrdBuildError(
                f"{busybox} is dynamically linked; the initrd needs busybox-static"
            )
    return data


def _inputs_hash(kernel: Kernel, busybox: bytes, modules: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for part in (LAYOUT_VERSION, " ".join(CFLAGS).encode(), kernel.release.encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    # Every file of the init's folder, headers included, by name and content.
    for source in sorted(INIT_DIR.iterdir()):
        if source.is_file():
            digest.update(source.name.encode() + b"\0")
            digest.update(hashlib.sha256(source.read_bytes()).digest())
    digest.update(hashlib.sha256(busybox).digest())
    for group, module in modules:
        digest.update(f"{group} {module}".encode() + b"\0")
        digest.update(hashlib.sha256((kernel.modules_dir / module).read_bytes()).digest())
    return digest.hexdigest()


async def compile_init(workdir: Path) -> Path:
    """Compile the init, statically linked, into ``workdir``."""
    output = workdir / "init"
    sources = [INIT_DIR / name for name in INIT_SOURCES]
    await run_tool(
        ["gcc", *CFLAGS, "-o", output, *sources], error=InitCompileError, what="compiling init"
    )
    return output


async def compile_standalone_agent(output: Path) -> Path:
    """Compile the guest agent as a host program at ``output``.

    It serves the agent protocol on a Unix socket: ``agent --listen-unix PATH [--user U]
    [--workdir D] [--env K=V]...``; SET_TIME is answered without touching the host's clock.
    """
    sources = [INIT_DIR / name for name in AGENT_SOURCES]
    await run_tool(
        ["gcc", *CFLAGS, "-DAGENT_STANDALONE", "-o", output, *sources],
        error=InitCompileError,
        what="compiling the standalone agent",
    )
    return output


def _entries(
    kernel: Kernel, init: bytes, busybox: bytes, modules: list[tuple[str, str]]
) -> list[cpio.Entry]:
    module_root = f"lib/modules/{kernel.release}"
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "etc/dataplane", "mnt")]
    entries += [cpio.directory(d, 0o555) for d in ("proc", "sys")]
    entries += [
        cpio.directory("newroot"),
        cpio.char_device("dev/console", 5, 1),
        cpio.regular("init", init, 0o755),
        cpio.regular("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
    ]
    made: set[str] = set()
    for module in dict.fromkeys(path for _, path in modules):
        parent = f"{module_root}/{module}".rsplit("/", 1)[0]
        missing: list[str] = []
        while parent and parent not in made:
            missing.append(parent)
            made.add(parent)
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
        entries += [cpio.directory(d) for d in reversed(missing)]
        content = (kernel.modules_dir / module).read_bytes()
        entries.append(cpio.regular(f"{module_root}/{module}", content))
    listing = "".join(f"{group} /{module_root}/{path}\n" for group, path in modules).encode()
    entries.append(cpio.regular(MODULE_LIST, listing))
    return entries


async def ensure_initrd(paths: Paths, kernel: Kernel) -> tuple[Initrd, bool]:
    """The initrd for ``kernel``, rebuilt only when its inputs changed; True if it was built."""
    index = await anyio.to_thread.run_sync(read_index, kernel.modules_dir)
    modules = grouped_load_order(index)
    busybox = await anyio.to_thread.run_sync(require_static, BUSYBOX)
    digest = await anyio.to_thread.run_sync(_inputs_hash, kernel, busybox, modules)
    image = paths.initrd_image
    hash_file = paths.initrd_inputs_hash
    try:
        current = hash_file.read_text().strip()
    except OSError:
        current = ""
    if current == digest and image.is_file():
        return Initrd(image, digest), False

    workdir = paths.tmp / f"init-{uuid.uuid4().hex}"
    workdir.mkdir(parents=True)
    try:
        init = (await compile_init(workdir)).read_bytes()
        entries = await anyio.to_thread.run_sync(_entries, kernel, init, busybox, modules)
        data = cpio.archive(entries)
        # The hash goes last: a crash in between leaves a stale hash, so the next run rebuilds.
        await anyio.to_thread.run_sync(write_atomic, image, data)
        # Readable by a VMM that runs as another user; it holds no secret.
        await anyio.Path(image).chmod(0o644)
        await anyio.to_thread.run_sync(write_atomic, hash_file, digest.encode() + b"\n")
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))
    return Initrd(image, digest), True
