"""A graceful stop, for real under QEMU/TCG: an ACPI power-button press (QMP
``system_powerdown``) makes the init send the program SIGTERM, SIGKILL it when it does not
exit in time, report its exit and power the VM off by itself.

Each boot is bounded: QEMU is killed by PID and the test fails after ``STOP_TIMEOUT``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from managers.guest import GuestConfig, create_overlay_disk, program_output, write_config_disk
from managers.guest.types import GuestArtifacts, MarkerKind
from tests.support.artifacts import shared_artifacts
from tests.support.guestboot import (
    QEMU,
    BootResult,
    Disk,
    boot,
    build_busybox_rootfs,
    make_image_disk,
    qmp_command,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]

# Boot (~3 s under TCG), the init's 8 s wait for a program that ignores SIGTERM, power-off.
STOP_TIMEOUT = 30.0

# The init listens for the power button only once the program runs (its modules load after
# the program started), and a press before that is lost, as on real hardware without a
# driver. So the program says "ready" once PID 1 holds an input event device open.
# (ls races with the init opening and closing descriptors, hence 2>/dev/null.)
WAIT_FOR_INIT = """until ls -l /proc/1/fd 2>/dev/null | grep -q /dev/input/event; do sleep 0.1; done
echo ready
while :; do sleep 1; done
"""
TRAPS_TERM = "#!/bin/sh\ntrap 'echo got term; exit 3' TERM\n" + WAIT_FOR_INIT
IGNORES_TERM = "#!/bin/sh\ntrap '' TERM\n" + WAIT_FOR_INIT


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return shared_artifacts()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("poweroff-image")
    try:
        rootfs = build_busybox_rootfs(
            work / "rootfs", programs={"/bin/traps": TRAPS_TERM, "/bin/ignores": IGNORES_TERM}
        )
        yield make_image_disk(rootfs, work / "image.erofs", "erofs")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def qmp_socket() -> Iterator[Path]:
    # A short directory: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    directory = Path(tempfile.mkdtemp(prefix="qmp-"))
    try:
        yield directory / "qmp.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def press_power_button_when_ready(
    artifacts: GuestArtifacts, image: Path, workdir: Path, qmp: Path, program: str, machine: str
) -> BootResult:
    config_disk = workdir / "config.img"
    await write_config_disk(config_disk, GuestConfig(entrypoint=[program]))
    overlay = workdir / "overlay.raw"
    await create_overlay_disk(overlay, 64 << 20)
    disks = [
        Disk(image, "image", readonly=True),
        Disk(overlay, "overlay"),
        Disk(config_disk, "config", readonly=True),
    ]
    pressed: list[object] = []

    async def press() -> None:
        pressed.append(await qmp_command(qmp, "system_powerdown"))

    result = await boot(
        artifacts,
        disks,
        workdir,
        time_limit=STOP_TIMEOUT,
        machine=machine,
        watch=b"ready\n",
        on_watch=press,
        qmp=qmp,
    )
    tail = result.serial.decode("utf-8", "replace")[-3000:]
    assert pressed == [{}], (
        f"the program never got ready (timed out: {result.timed_out}, "
        f"QEMU exit {result.returncode}):\n{tail}"
    )
    assert not result.timed_out, f"guest did not power off within {STOP_TIMEOUT} s:\n{tail}"
    assert result.returncode == 0, f"QEMU exited with {result.returncode}:\n{tail}"
    assert result.kinds() == [
        MarkerKind.INIT_STARTED,
        MarkerKind.PROGRAM_STARTED,
        MarkerKind.PROGRAM_EXITED,
    ], tail
    return result


# pc is the machine the brief's hosts press on (PIIX4's fixed power button); microvm delivers
# the press through ACPI's generic event device, as Cloud Hypervisor does.
@pytest.mark.parametrize("machine", ["pc", "microvm"])
async def test_power_button_sends_sigterm_and_the_vm_powers_off(
    artifacts: GuestArtifacts, image: Path, tmp_path: Path, qmp_socket: Path, machine: str
) -> None:
    result = await press_power_button_when_ready(
        artifacts, image, tmp_path, qmp_socket, "/bin/traps", machine
    )
    output = program_output(result.serial)
    assert output is not None
    # busybox sh also reports its foreground `sleep`, which the group-wide SIGTERM ended.
    assert output.startswith(b"ready\n"), output
    assert output.endswith(b"got term\n"), output
    assert result.exit_code() == 3


async def test_program_ignoring_sigterm_is_killed_and_the_vm_powers_off(
    artifacts: GuestArtifacts, image: Path, tmp_path: Path, qmp_socket: Path
) -> None:
    result = await press_power_button_when_ready(
        artifacts, image, tmp_path, qmp_socket, "/bin/ignores", "pc"
    )
    assert program_output(result.serial) == b"ready\n"
    assert result.exit_code() == 128 + 9
