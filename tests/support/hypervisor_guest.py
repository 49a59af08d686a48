"""A tiny guest for hypervisor tests: Debian's cloud kernel plus a busybox initrd.

The init prints ``HYPERVISOR-TEST-GUEST: up``, then a numbered tick every second (so a restored
guest visibly keeps running), and powers off when the ACPI power button is pressed (busybox has
no acpid wiring by default, so it blocks on the button's evdev node), or by itself ``N`` seconds
after it starts when the command line has ``poweroff_after=N`` (a change no request made). It
needs no disks.

The kernel is the one ``make setup`` builds (``tests.support.artifacts``: Debian's
``linux-image-cloud-amd64``); the initrd is this module's, since the conformance suite needs no
image disks.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.artifacts import SYSTEM_DIR, shared_artifacts

UP_MARKER = "HYPERVISOR-TEST-GUEST: up"
TICK_MARKER = "HYPERVISOR-TEST-GUEST: tick"
BUSYBOX = Path("/bin/busybox")
_APPLETS = ("sh", "mount", "insmod", "sleep", "echo", "dd", "grep", "poweroff", "cat")

_INIT = """#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1 </dev/null
insmod /lib/button.ko
insmod /lib/evdev.ko
for d in /sys/class/input/event*; do
  if grep -q "Power Button" "$d/device/name" 2>/dev/null; then
    ( dd if="/dev/input/${d##*/}" of=/dev/null bs=24 count=1 2>/dev/null
      echo "HYPERVISOR-TEST-GUEST: power button"; poweroff -f ) &
  fi
done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    poweroff_after=*) ( sleep "${arg#*=}"; echo "HYPERVISOR-TEST-GUEST: powering off"
                        poweroff -f ) & ;;
  esac
done
echo "HYPERVISOR-TEST-GUEST: up"
i=0
while true; do echo "HYPERVISOR-TEST-GUEST: tick $i"; i=$((i+1)); sleep 1; done
"""


@dataclass(frozen=True, slots=True)
class GuestKit:
    kernel: Path
    initrd: Path
    cmdline: str = "console=ttyS0 panic=-1 loglevel=3"


def _kernel() -> tuple[Path, Path]:
    """(bzImage, the kernel's module tree) from the guest package's own artifact build."""
    artifacts = shared_artifacts()
    modules = SYSTEM_DIR / "kernel" / "tree" / "lib" / "modules" / artifacts.kernel_version
    return artifacts.bzimage, modules / "kernel" / "drivers"


def _build_initrd(modules: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for folder in ("bin", "lib", "proc", "sys", "dev"):
            (root / folder).mkdir()
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        for applet in _APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        for module in ("acpi/button.ko", "input/evdev.ko"):
            shutil.copy(modules / module, root / "lib" / Path(module).name)
        init = root / "init"
        init.write_text(_INIT)
        init.chmod(0o755)
        os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        archive = subprocess.run(
            "find . | sort | cpio -o -H newc --quiet",
            shell=True,
            cwd=root,
            check=True,
            capture_output=True,
        ).stdout
    out.write_bytes(gzip.compress(archive))


def build_test_guest(workdir: Path) -> GuestKit:
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (/bin/busybox missing)")
    kernel, modules = _kernel()
    initrd = workdir / "initrd.img"
    _build_initrd(modules, initrd)
    return GuestKit(kernel=kernel, initrd=initrd)


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestKit:
    return build_test_guest(tmp_path_factory.mktemp("guest"))
