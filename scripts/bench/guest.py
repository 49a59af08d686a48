"""Benchmark: boot to the program-started marker vs a bare kernel + minimal busybox initrd.

Both boot the same kernel with the same command line under QEMU/TCG, alternately, so that
machine noise hits both alike. A third series boots the baseline with our three disks
attached, to separate what the devices cost (PCI probing; on `pc` also the firmware) from
what our init costs. The baseline initrd holds only busybox and a /init that prints
one line; ours loads the modules, mounts an erofs image under an overlay, reads the config disk
and starts the program. Prints medians and the ratio (target: <= 1.3).

    .venv/bin/python scripts/bench/guest.py [--runs 10] [--machine microvm|pc] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from managers.guest import (
    GuestConfig,
    cpio,
    ensure_artifacts,
    write_config_disk,
)
from managers.guest.markers import PREFIX
from tests.support.guestboot import (
    BUSYBOX,
    Disk,
    boot,
    build_busybox_rootfs,
    make_ext4_disk,
    make_image_disk,
)

BASELINE_LINE = b"BASELINE-READY"
STARTED = f"\n{PREFIX}program-started\n".encode()


def baseline_initrd(output: Path) -> Path:
    init = f"#!/bin/sh\necho {BASELINE_LINE.decode()}\nexec /bin/busybox poweroff -f\n"
    entries = [
        cpio.directory("bin"),
        cpio.directory("dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.regular("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.regular("init", init.encode(), 0o755),
    ]
    output.write_bytes(cpio.archive(entries))
    return output


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--machine", choices=("microvm", "pc"), default="microvm")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="guest-bench-") as tmp:
        work = Path(tmp)
        data_dir = args.data_dir or Path(os.environ.get("GUEST_DATA_DIR", work / "data"))
        artifacts = await ensure_artifacts(data_dir / "system")
        base = baseline_initrd(work / "baseline.cpio")
        rootfs = build_busybox_rootfs(work / "rootfs")
        image = make_image_disk(rootfs, work / "image.erofs", "erofs")
        template = make_ext4_disk(work / "overlay-template.raw", 64)
        config = work / "config.img"
        await write_config_disk(config, GuestConfig(entrypoint=["/bin/true"]))

        ours: list[float] = []
        bare: list[float] = []
        bare_disks: list[float] = []
        for run in range(args.runs):
            overlay = work / "overlay.raw"
            await anyio.run_process(["cp", "--sparse=always", template, overlay])
            disks = [
                Disk(image, "image", True),
                Disk(overlay, "overlay"),
                Disk(config, "config", True),
            ]
            result = await boot(
                artifacts, disks, work, machine=args.machine, watch=STARTED, name=f"ours{run}"
            )
            if result.watch_seconds is None:
                print(result.serial.decode("utf-8", "replace")[-2000:], file=sys.stderr)
                print("our guest never reached program-started", file=sys.stderr)
                return 1
            ours.append(result.watch_seconds)
            result = await boot(
                artifacts, [], work, machine=args.machine, initrd=base, watch=BASELINE_LINE,
                name=f"bare{run}",
            )  # fmt: skip
            if result.watch_seconds is None:
                print("the baseline guest never printed its line", file=sys.stderr)
                return 1
            bare.append(result.watch_seconds)
            # The same baseline with our disks attached: what the devices cost the kernel
            # (and on `pc` the firmware) apart from our init.
            result = await boot(
                artifacts, disks, work, machine=args.machine, initrd=base, watch=BASELINE_LINE,
                name=f"bare-disks{run}",
            )  # fmt: skip
            if result.watch_seconds is None:
                print("the baseline guest with disks never printed its line", file=sys.stderr)
                return 1
            bare_disks.append(result.watch_seconds)
            print(
                f"run {run + 1}: ours {ours[-1]:.3f} s, baseline {bare[-1]:.3f} s, "
                f"baseline with disks {bare_disks[-1]:.3f} s",
                flush=True,
            )
        shutil.rmtree(work / "rootfs", ignore_errors=True)

    ours_median, bare_median = statistics.median(ours), statistics.median(bare)
    disks_median = statistics.median(bare_disks)
    ratio = ours_median / bare_median
    print(f"machine {args.machine}, {args.runs} boots each, QEMU TCG")
    print(f"baseline (bare kernel + busybox initrd printing a line): median {bare_median:.3f} s")
    print(f"ours (to program-started):                               median {ours_median:.3f} s")
    print(f"baseline with the same three disks attached:             median {disks_median:.3f} s")
    print(f"ratio ours/baseline: {ratio:.2f} (target <= 1.3)")
    print(f"ratio ours/baseline-with-disks (the init alone): {ours_median / disks_median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
