"""Booting the guest under QEMU directly, for tests and benchmarks that need no dataplane.

Builds tiny busybox root filesystems, turns them into erofs/ext4 image disks, and boots
kernel + initrd + disks under TCG with a hard bound on time: the QEMU process is killed by
its PID when the bound passes, and the boot reports that it timed out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from managers.guest import kernel_cmdline, parse_markers
from managers.guest.cmdline import qemu_extra
from managers.guest.types import GuestArtifacts, Marker, MarkerKind

QEMU = os.environ.get("QEMU_BIN", "qemu-system-x86_64")
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "cat", "echo", "printf", "ls", "id", "hostname", "ip", "mkdir", "rm", "sync",
    "env", "sleep", "true", "false", "pwd", "touch", "grep",
)  # fmt: skip

# Prints the exact argv and environment the kernel gave this process: NUL-separated, as
# /proc has them, so any byte the init got wrong shows up in a byte-for-byte comparison.
SHOW_PROGRAM = """#!/bin/sh
cat /proc/$$/cmdline
printf '\\n--env--\\n'
cat /proc/$$/environ
"""


@dataclass(frozen=True, slots=True)
class Disk:
    path: Path
    serial: str
    readonly: bool = False


@dataclass(slots=True)
class BootResult:
    serial: bytes
    returncode: int | None
    timed_out: bool
    seconds: float
    markers: list[Marker] = field(default_factory=list)
    watch_seconds: float | None = None
    """When ``watch`` was given: seconds from QEMU's start until those bytes appeared."""

    def kinds(self) -> list[MarkerKind]:
        return [m.kind for m in self.markers]

    def exit_code(self) -> int | None:
        codes = [m.exit_code for m in self.markers if m.kind is MarkerKind.PROGRAM_EXITED]
        return codes[-1] if codes else None

    def error(self) -> Marker | None:
        errors = [m for m in self.markers if m.kind is MarkerKind.ERROR]
        return errors[-1] if errors else None


def build_busybox_rootfs(root: Path, *, programs: dict[str, str] | None = None) -> Path:
    """A minimal root: busybox and its links, passwd/group, and ``programs`` (path -> script)."""
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    (root / "etc" / "motd").write_text("image file\n")
    for path, script in {"/bin/show": SHOW_PROGRAM, **(programs or {})}.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(script)
        target.chmod(0o755)
    return root


def make_image_disk(rootfs: Path, output: Path, fmt: str) -> Path:
    """An image disk of ``rootfs``: ``erofs`` (lz4hc) or ``ext4``."""
    if fmt == "erofs":
        argv = ["mkfs.erofs", "--quiet", "-zlz4hc", str(output), str(rootfs)]
    elif fmt == "ext4":
        size_mb = max(16, math.ceil(_tree_size(rootfs) / (1 << 20)) * 2 + 8)
        argv = ["mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(output), f"{size_mb}M"]
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    subprocess.run(argv, check=True, capture_output=True)
    return output


def make_ext4_disk(output: Path, size_mb: int = 16, *, content: Path | None = None) -> Path:
    argv = ["mkfs.ext4", "-q", "-F"]
    if content is not None:
        argv += ["-d", str(content)]
    subprocess.run([*argv, str(output), f"{size_mb}M"], check=True, capture_output=True)
    return output


def sparse_file(output: Path, size_mb: int) -> Path:
    with output.open("wb") as handle:
        handle.truncate(size_mb << 20)
    return output


def debugfs_cat(disk: Path, path: str) -> bytes | None:
    """A file's bytes inside an ext2/3/4 image, read without mounting it; None if absent."""
    result = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, check=False
    )
    if result.returncode != 0 or b"File not found" in result.stderr:
        return None
    return result.stdout


def _tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*"))


def qemu_argv(
    artifacts: GuestArtifacts,
    disks: Sequence[Disk],
    serial_log: Path,
    *,
    machine: str = "microvm",
    memory_mb: int = 256,
    initrd: Path | None = None,
    append: Sequence[str] = (),
    mac: str | None = None,
    qmp: Path | None = None,
) -> list[str]:
    if machine == "microvm":
        argv = [QEMU, "-machine", "microvm,pcie=on,acpi=on", "-kernel", str(artifacts.vmlinux)]
    elif machine == "pc":
        argv = [QEMU, "-machine", "pc", "-kernel", str(artifacts.bzimage)]
    else:
        raise ValueError(f"unknown machine {machine!r}")
    extra = [*qemu_extra(machine), *append]
    argv += [
        "-cpu", "max", "-smp", "1", "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-initrd", str(initrd or artifacts.initrd),
        "-append", kernel_cmdline(extra=extra),
        "-serial", f"file:{serial_log}",
    ]  # fmt: skip
    for index, disk in enumerate(disks):
        drive = f"file={disk.path},if=none,id=d{index},format=raw"
        if disk.readonly:
            drive += ",readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-pci,drive=d{index},serial={disk.serial}"]
    if mac is not None:
        # restrict=on: the user-mode network reaches nothing outside the guest.
        argv += [
            "-netdev",
            "user,id=n0,restrict=on",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={mac}",
        ]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv


QMP_TIMEOUT = 10.0


async def qmp_command(socket: Path, command: str) -> object:
    """Runs one QMP command on a fresh connection and returns its ``return`` value.

    Raises ``RuntimeError`` with QEMU's error, ``TimeoutError`` when no answer comes in
    ``QMP_TIMEOUT`` seconds.
    """
    with anyio.fail_after(QMP_TIMEOUT):
        async with await anyio.connect_unix(str(socket)) as stream:
            reader = BufferedByteReceiveStream(stream)

            async def reply() -> object:
                while True:
                    message = json.loads(await reader.receive_until(b"\n", 1 << 20))
                    if "error" in message:
                        raise RuntimeError(f"QMP {command}: {message['error']}")
                    if "return" in message:
                        return message["return"]
                    # Anything else is the greeting or an asynchronous event.

            await reader.receive_until(b"\n", 1 << 20)  # the greeting
            for name in ("qmp_capabilities", command):
                await stream.send(json.dumps({"execute": name}).encode() + b"\n")
                result = await reply()
            return result


async def boot(
    artifacts: GuestArtifacts,
    disks: Sequence[Disk],
    workdir: Path,
    *,
    time_limit: float = 60.0,
    machine: str = "microvm",
    initrd: Path | None = None,
    append: Sequence[str] = (),
    mac: str | None = None,
    name: str = "boot",
    watch: bytes | None = None,
    on_watch: Callable[[], Awaitable[None]] | None = None,
    qmp: Path | None = None,
) -> BootResult:
    """Boot until QEMU exits (the guest powered off) or ``time_limit`` passes, then kill it.

    With ``watch``, the serial log is polled and the time the bytes first appear is kept;
    ``on_watch`` then runs once (e.g. a :func:`qmp_command` on the ``qmp`` socket).
    """
    serial_log = workdir / f"{name}.serial.log"
    serial_log.unlink(missing_ok=True)
    argv = qemu_argv(
        artifacts,
        disks,
        serial_log,
        machine=machine,
        initrd=initrd,
        append=append,
        mac=mac,
        qmp=qmp,
    )
    started = time.monotonic()
    with (workdir / f"{name}.qemu.log").open("wb") as qemu_log:
        process = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log
        )
    timed_out = False
    watch_seconds: float | None = None

    async def poll_serial() -> None:
        nonlocal watch_seconds
        assert watch is not None
        while watch_seconds is None:
            if serial_log.exists() and watch in serial_log.read_bytes():
                watch_seconds = time.monotonic() - started
                if on_watch is not None:
                    await on_watch()
                return
            await anyio.sleep(0.005)

    try:
        with anyio.move_on_after(time_limit) as scope:
            async with anyio.create_task_group() as tasks:
                if watch is not None:
                    tasks.start_soon(poll_serial)
                await process.wait()
                tasks.cancel_scope.cancel()
        timed_out = scope.cancelled_caught
    finally:
        if process.returncode is None:
            with anyio.CancelScope(shield=True):
                os.kill(process.pid, signal.SIGKILL)
                await process.wait()
        await process.aclose()
    seconds = time.monotonic() - started
    serial = serial_log.read_bytes() if serial_log.exists() else b""
    markers = parse_markers(serial)
    return BootResult(serial, process.returncode, timed_out, seconds, markers, watch_seconds)
