"""``python -m managers.guest build --data-dir DIR``: prepare the guest's kernel and initrd."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio

from ..paths import Paths
from .artifacts import build_artifacts
from .errors import GuestError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m managers.guest")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="fetch the kernel and build the initrd if needed")
    build.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DATA_DIR", "/var/lib/dataplane")),
        help="the dataplane's DATA_DIR (default: $DATA_DIR or /var/lib/dataplane)",
    )
    build.add_argument("--kernel-path", type=Path, default=_env_path("KERNEL_PATH"))
    build.add_argument("--initrd-path", type=Path, default=_env_path("INITRD_PATH"))
    return parser


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    system = Paths(args.data_dir.absolute()).system
    try:
        artifacts, actions = anyio.run(
            lambda: build_artifacts(
                system, kernel_path=args.kernel_path, initrd_path=args.initrd_path
            )
        )
    except GuestError as exc:
        print(f"guest build failed: {exc}", file=sys.stderr)
        return 1
    for action in actions:
        print(action)
    print(f"vmlinux {artifacts.vmlinux}")
    print(f"bzImage {artifacts.bzimage}")
    print(f"initrd  {artifacts.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
