"""The guest booted for real under QEMU/TCG: kernel, initrd, init, config disk, image disks.

Each boot is bounded in time (the QEMU process is killed by PID and the test fails) and must
end with the VM powering itself off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from managers.guest import (
    GuestConfig,
    NetworkConfig,
    VolumeMount,
    create_overlay_disk,
    program_output,
    write_config_disk,
)
from managers.guest.types import GuestArtifacts, MarkerKind
from tests.support.artifacts import shared_artifacts
from tests.support.guestboot import (
    QEMU,
    BootResult,
    Disk,
    boot,
    build_busybox_rootfs,
    debugfs_cat,
    make_ext4_disk,
    make_image_disk,
    sparse_file,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]

BOOT_TIMEOUT = 60.0
AWKWARD_ARGS = [
    "two words",
    "",
    "'single' \"double\" `back` $HOME \\",
    "line one\nline two\n",
    "tab\there\r",
    "key=value=more",
    "utf-8: héllo wörld ✓ 日本",
    "-",
    "--flag=x",
]
AWKWARD_ENV = [
    ("PATH", "/bin"),
    ("EMPTY", ""),
    ("SPACES", "a b  c "),
    ("EQUALS", "a=b=c"),
    ("NEWLINE", "first\nsecond"),
    ("QUOTES", 'it\'s "quoted"'),
    ("UNICODE", "ünïcødé ✓"),
]
WRITER = """#!/bin/sh
echo written-by-program > /newfile
rm /etc/motd
mkdir -p /var/lib/app && echo state > /var/lib/app/state
echo to-stderr >&2
exit 7
"""
REPORTER = """#!/bin/sh
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "pwd=$(pwd)"
echo "hostname=$(hostname)"
ip -4 -o addr show dev eth0 | grep -o 'inet [0-9./]*'
ip route | grep default
cat /etc/resolv.conf
grep guest-one /etc/hosts
echo from-guest > /data/out
echo "ro-volume=$(cat /ro/marker)"
if touch /ro/denied 2>/dev/null; then echo ro-writable; else echo ro-readonly; fi
"""


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    """The real kernel and initrd, as ``make setup`` builds them."""
    return shared_artifacts()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    work = tmp_path_factory.mktemp("guest-images")
    try:
        rootfs = build_busybox_rootfs(
            work / "rootfs", programs={"/bin/writer": WRITER, "/bin/reporter": REPORTER}
        )
        yield {
            fmt: make_image_disk(rootfs, work / f"image.{fmt}", fmt) for fmt in ("erofs", "ext4")
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def assert_powered_off(result: BootResult) -> None:
    tail = result.serial.decode("utf-8", "replace")[-3000:]
    assert not result.timed_out, f"guest did not power off within {BOOT_TIMEOUT} s:\n{tail}"
    assert result.returncode == 0, f"QEMU exited with {result.returncode}:\n{tail}"


async def standard_boot(
    artifacts: GuestArtifacts,
    image: Path,
    workdir: Path,
    config: GuestConfig,
    *,
    overlay: Path | None = None,
    extra_disks: tuple[Disk, ...] = (),
    machine: str = "microvm",
    mac: str | None = None,
) -> BootResult:
    config_disk = workdir / "config.img"
    await write_config_disk(config_disk, config)
    if overlay is None:
        overlay = workdir / "overlay.raw"
        await create_overlay_disk(overlay, 64 << 20)
    disks = [
        Disk(image, "image", readonly=True),
        Disk(overlay, "overlay"),
        Disk(config_disk, "config", readonly=True),
        *extra_disks,
    ]
    result = await boot(
        artifacts, disks, workdir, time_limit=BOOT_TIMEOUT, machine=machine, mac=mac
    )
    assert_powered_off(result)
    return result


async def test_argv_and_env_arrive_byte_exact_on_erofs(
    artifacts: GuestArtifacts, images: dict[str, Path], tmp_path: Path
) -> None:
    # A bare sparse overlay: the init must format it itself.
    overlay = sparse_file(tmp_path / "blank-overlay.raw", 64)
    config = GuestConfig(entrypoint=["/bin/show"], cmd=AWKWARD_ARGS, env=AWKWARD_ENV)
    result = await standard_boot(artifacts, images["erofs"], tmp_path, config, overlay=overlay)

    assert result.kinds() == [
        MarkerKind.INIT_STARTED,
        MarkerKind.PROGRAM_STARTED,
        MarkerKind.PROGRAM_EXITED,
    ]
    assert result.exit_code() == 0
    # A script's argv as the kernel builds it: interpreter, script path, then our arguments.
    argv = [b"/bin/sh", b"/bin/show", *(a.encode() for a in AWKWARD_ARGS)]
    env = [f"{k}={v}".encode() for k, v in AWKWARD_ENV] + [b"HOME=/root"]
    expected = b"".join(a + b"\0" for a in argv) + b"\n--env--\n"
    expected += b"".join(e + b"\0" for e in env)
    assert program_output(result.serial) == expected


async def test_exit_code_overlay_writes_and_image_unchanged_on_ext4(
    artifacts: GuestArtifacts, images: dict[str, Path], tmp_path: Path
) -> None:
    image = tmp_path / "image.ext4"
    shutil.copyfile(images["ext4"], image)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    overlay = tmp_path / "overlay.raw"
    await create_overlay_disk(overlay, 64 << 20)

    result = await standard_boot(
        artifacts, image, tmp_path, GuestConfig(entrypoint=["/bin/writer"]), overlay=overlay
    )

    assert result.exit_code() == 7
    assert result.error() is None
    assert program_output(result.serial) == b"to-stderr\n"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert debugfs_cat(overlay, "/upper/newfile") == b"written-by-program\n"
    assert debugfs_cat(overlay, "/upper/var/lib/app/state") == b"state\n"
    assert debugfs_cat(image, "/etc/motd") == b"image file\n"


async def test_bzimage_on_pc_machine_boots_and_reports_signal_exit(
    artifacts: GuestArtifacts, images: dict[str, Path], tmp_path: Path
) -> None:
    config = GuestConfig(entrypoint=["/bin/sh", "-c", "echo dying; kill -9 $$"])
    result = await standard_boot(artifacts, images["erofs"], tmp_path, config, machine="pc")
    assert program_output(result.serial) == b"dying\n"
    assert result.exit_code() == 128 + 9


@pytest.fixture
def volume_disks(tmp_path: Path) -> tuple[Path, Path]:
    """A writable ext4 volume owned by the image's uid 1000, and a read-only one with a file."""
    data = tmp_path / "data.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=1000:1000", str(data), "16M"],
        check=True,
        capture_output=True,
    )
    ro_content = tmp_path / "ro-content"
    ro_content.mkdir()
    (ro_content / "marker").write_text("read-only volume\n")
    return data, make_ext4_disk(tmp_path / "ro.ext4", content=ro_content)


async def test_user_workdir_hostname_network_and_volumes(
    artifacts: GuestArtifacts,
    images: dict[str, Path],
    tmp_path: Path,
    volume_disks: tuple[Path, Path],
) -> None:
    data, ro_disk = volume_disks
    mac = "52:54:00:12:34:56"
    config = GuestConfig(
        entrypoint=["reporter"],
        env={"PATH": "/bin"},
        workdir="/work/dir",
        user="app",
        hostname="guest-one",
        network=NetworkConfig(
            address="10.0.2.15/24", gateway="10.0.2.2", dns=("10.0.2.3", "1.1.1.1"), mac=mac
        ),
        volumes=[("vol-data", "/data", False), VolumeMount("vol-ro", "/ro", readonly=True)],
    )
    result = await standard_boot(
        artifacts,
        images["erofs"],
        tmp_path,
        config,
        extra_disks=(Disk(data, "vol-data"), Disk(ro_disk, "vol-ro", readonly=True)),
        mac=mac,
    )
    output = program_output(result.serial)
    assert result.exit_code() == 0, result.serial.decode("utf-8", "replace")[-2000:]
    assert output is not None
    assert output.decode().splitlines() == [
        "uid=1000 gid=1000 groups=1000 2000",
        "pwd=/work/dir",
        "hostname=guest-one",
        "inet 10.0.2.15/24",
        "default via 10.0.2.2 dev eth0 ",
        "nameserver 10.0.2.3",
        "nameserver 1.1.1.1",
        "10.0.2.15\tguest-one",
        "ro-volume=read-only volume",
        "ro-readonly",
    ]
    assert debugfs_cat(data, "/out") == b"from-guest\n"


FAILURES = {
    "missing-entrypoint": (GuestConfig(entrypoint=["/bin/does-not-exist"]), "program-not-found"),
    "not-executable": (GuestConfig(entrypoint=["/etc/motd"]), "exec-failed"),
    "unknown-user": (GuestConfig(entrypoint=["/bin/show"], user="nobody-here"), "bad-user"),
    "unreadable-config": (GuestConfig(entrypoint=["/bin/show"]), "bad-config"),
    "missing-image-disk": (GuestConfig(entrypoint=["/bin/show"]), "no-image-disk"),
    "missing-config-disk": (GuestConfig(entrypoint=["/bin/show"]), "no-config-disk"),
}


@pytest.mark.parametrize("case", FAILURES)
async def test_failures_print_an_error_marker_and_power_off(
    artifacts: GuestArtifacts, images: dict[str, Path], tmp_path: Path, case: str
) -> None:
    config, reason = FAILURES[case]
    config_disk = tmp_path / "config.img"
    await write_config_disk(config_disk, config)
    if case == "unreadable-config":
        config_disk.write_bytes(os.urandom(8192))
    overlay = sparse_file(tmp_path / "overlay.raw", 64)
    disks = [Disk(overlay, "overlay")]
    if case != "missing-image-disk":
        disks.append(Disk(images["erofs"], "image", readonly=True))
    if case != "missing-config-disk":
        disks.append(Disk(config_disk, "config", readonly=True))

    result = await boot(artifacts, disks, tmp_path, time_limit=BOOT_TIMEOUT)

    assert_powered_off(result)
    error = result.error()
    assert error is not None, result.serial.decode("utf-8", "replace")[-2000:]
    assert error.reason == reason
    assert error.detail
    assert MarkerKind.PROGRAM_EXITED not in result.kinds()
