"""The real artifact build: Debian's kernel via apt-get, depmod, vmlinux, our initrd."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from managers.guest.artifacts import build_artifacts
from managers.guest.modules import GUEST_MODULES
from managers.guest.types import GuestArtifacts

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, GuestArtifacts]]:
    data_dir = tmp_path_factory.mktemp("guest-artifacts")
    try:
        artifacts, actions = anyio.run(lambda: build_artifacts(data_dir / "system"))
        assert any(a.startswith("kernel fetched") for a in actions), actions
        assert any(a.startswith("initrd built") for a in actions), actions
        yield data_dir, artifacts
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def cpio_names(archive: Path) -> list[str]:
    argv = ["cpio", "-it", "--quiet", "-F", str(archive)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()


def test_layout_and_contents(built: tuple[Path, GuestArtifacts]) -> None:
    data_dir, artifacts = built
    system = data_dir / "system"
    assert artifacts.vmlinux == system / "kernel" / "vmlinux"
    assert artifacts.bzimage == system / "kernel" / "bzImage"
    assert artifacts.initrd == system / "initrd" / "initrd.img"
    assert artifacts.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert artifacts.bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    modules_dir = system / "kernel" / "tree" / "lib" / "modules" / artifacts.kernel_version
    assert (modules_dir / "modules.dep").is_file()

    names = cpio_names(artifacts.initrd)
    for required in ("init", "bin/busybox", "bin/sh", "dev/console", "etc/dataplane/modules"):
        assert required in names
    carried = {Path(n).name.removesuffix(".ko") for n in names if n.endswith(".ko")}
    assert set(GUEST_MODULES) <= carried
    assert {"virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev"} <= carried
    assert {"failover", "net_failover", "libcrc32c", "vsock"} <= carried


def test_second_run_is_a_no_op(built: tuple[Path, GuestArtifacts]) -> None:
    data_dir, artifacts = built
    before = artifacts.initrd.stat().st_mtime_ns, artifacts.vmlinux.stat().st_mtime_ns
    again, actions = anyio.run(lambda: build_artifacts(data_dir / "system"))
    assert again == artifacts
    assert [a.split(" ", 3)[:3] for a in actions] == [
        ["kernel", "up", "to"],
        ["initrd", "up", "to"],
    ]
    assert (artifacts.initrd.stat().st_mtime_ns, artifacts.vmlinux.stat().st_mtime_ns) == before


def test_changed_inputs_hash_rebuilds_the_initrd(built: tuple[Path, GuestArtifacts]) -> None:
    data_dir, artifacts = built
    (data_dir / "system" / "initrd" / "inputs.sha256").write_text("stale\n")
    again, actions = anyio.run(lambda: build_artifacts(data_dir / "system"))
    assert any(a.startswith("initrd built") for a in actions), actions
    assert again.initrd_hash == artifacts.initrd_hash


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KERNEL_PATH", "INITRD_PATH")}
    return subprocess.run(
        [sys.executable, "-m", "managers.guest", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_build_reports_what_it_did(built: tuple[Path, GuestArtifacts]) -> None:
    data_dir, artifacts = built
    result = run_cli("build", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert "kernel up to date" in result.stdout
    assert "initrd up to date" in result.stdout
    assert str(artifacts.vmlinux) in result.stdout


def test_cli_bad_override_fails_with_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("build", "--data-dir", str(tmp_path / "d"), "--kernel-path", "/nonexistent")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "guest build failed: KERNEL_PATH /nonexistent does not exist or is not a regular file"
    ]
    assert not (tmp_path / "d").exists()
