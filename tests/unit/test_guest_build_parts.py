"""Pieces of the artifact build that need no network: modules order, cpio, kernel headers,
and the KERNEL_PATH/INITRD_PATH overrides."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import pytest

from managers.guest import OverridePathError, cpio, ensure_artifacts
from managers.guest.errors import (
    InitrdBuildError,
    KernelFetchError,
    KernelModuleError,
    KernelUnpackError,
)
from managers.guest.initrd import require_static
from managers.guest.kernel import image_package
from managers.guest.modules import grouped_load_order, load_order, read_index
from managers.guest.vmlinux import bzimage_version, elf_version, extract_vmlinux

pytestmark = pytest.mark.anyio


def write_release(root: Path, dep: str, builtin: str = "") -> Path:
    release = root / "lib" / "modules" / "9.9.9-test"
    release.mkdir(parents=True)
    (release / "modules.dep").write_text(dep)
    (release / "modules.builtin").write_text(builtin)
    return release


DEP = """kernel/a/virtio_ring.ko:
kernel/a/virtio.ko: kernel/a/virtio_ring.ko
kernel/a/virtio_pci.ko: kernel/a/virtio_pci-helper.ko kernel/a/virtio.ko kernel/a/virtio_ring.ko
kernel/a/virtio_pci-helper.ko:
kernel/b/virtio_blk.ko: kernel/a/virtio.ko kernel/a/virtio_ring.ko
kernel/c/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/d/other.ko: kernel/lib/libcrc32c.ko
"""


def test_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    index = read_index(write_release(tmp_path, DEP, "kernel/fs/ext4.ko\n"))
    order = load_order(index, ("virtio_blk", "virtio_pci", "erofs", "ext4"))
    assert order == [
        "kernel/a/virtio_ring.ko",
        "kernel/a/virtio.ko",
        "kernel/b/virtio_blk.ko",
        "kernel/a/virtio_pci-helper.ko",
        "kernel/a/virtio_pci.ko",
        "kernel/lib/libcrc32c.ko",
        "kernel/c/erofs.ko",
    ]


def test_groups_carry_their_own_dependencies(tmp_path: Path) -> None:
    index = read_index(write_release(tmp_path, DEP))
    groups = (("core", ("virtio_blk",)), ("fs", ("erofs",)), ("more", ("other",)))
    assert grouped_load_order(index, groups) == [
        ("core", "kernel/a/virtio_ring.ko"),
        ("core", "kernel/a/virtio.ko"),
        ("core", "kernel/b/virtio_blk.ko"),
        ("fs", "kernel/lib/libcrc32c.ko"),
        ("fs", "kernel/c/erofs.ko"),
        ("more", "kernel/lib/libcrc32c.ko"),
        ("more", "kernel/d/other.ko"),
    ]


def test_missing_module_and_missing_index_are_typed_errors(tmp_path: Path) -> None:
    index = read_index(write_release(tmp_path / "k", DEP))
    with pytest.raises(KernelModuleError, match="nope is neither"):
        load_order(index, ("nope",))
    with pytest.raises(KernelModuleError, match="depmod"):
        read_index(tmp_path / "absent")


def test_cpio_archive_lists_with_the_real_tool(tmp_path: Path) -> None:
    data = cpio.archive(
        [
            cpio.directory("bin"),
            cpio.regular("bin/tool", b"#!/bin/sh\n", 0o755),
            cpio.symlink("bin/sh", "tool"),
            cpio.directory("dev"),
            cpio.char_device("dev/console", 5, 1),
        ]
    )
    archive = tmp_path / "a.cpio"
    archive.write_bytes(data)

    def cpio_list(*flags: str) -> list[str]:
        argv = ["cpio", *flags, "--quiet", "-F", str(archive)]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()

    assert cpio_list("-it") == ["bin", "bin/tool", "bin/sh", "dev", "dev/console"]
    verbose = cpio_list("-itv")
    assert verbose[2].endswith("bin/sh -> tool")
    assert verbose[4].startswith("crw-------")


def fake_bzimage(payload: bytes, version: str = "9.9.9-test (builder) #1") -> bytes:
    setup_sects = 1
    image = bytearray(0x400 + 0x100)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<H", image, 0x20E, 0x100)  # version string at 0x300
    image[0x300 : 0x300 + len(version)] = version.encode()
    struct.pack_into("<II", image, 0x248, 0x100, len(payload) + 4)
    return bytes(image) + payload + struct.pack("<I", 0)


async def test_vmlinux_extraction_and_versions(tmp_path: Path) -> None:
    elf = b"\x7fELF" + b"\0" * 60 + b"Linux version 9.9.9-test (someone) #1"
    compressed = gzip.compress(elf)
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(fake_bzimage(compressed))
    await extract_vmlinux(bzimage, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf
    assert bzimage_version(bzimage.read_bytes()) == "9.9.9-test"
    assert elf_version(elf) == "9.9.9-test"

    bzimage.write_bytes(fake_bzimage(b"unknown-compression"))
    with pytest.raises(KernelUnpackError, match="unknown compression"):
        await extract_vmlinux(bzimage, tmp_path / "vmlinux2")
    bzimage.write_bytes(b"not a kernel" * 100)
    with pytest.raises(KernelUnpackError, match="HdrS"):
        await extract_vmlinux(bzimage, tmp_path / "vmlinux3")


async def test_both_overrides_need_no_download(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + b"\0" * 60 + b"Linux version 9.9.9-test (x) #1")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701")
    system = tmp_path / "data" / "system"
    artifacts = await ensure_artifacts(system, kernel_path=kernel, initrd_path=initrd)
    assert (artifacts.vmlinux, artifacts.bzimage, artifacts.initrd) == (kernel, kernel, initrd)
    assert artifacts.kernel_version == "9.9.9-test"
    assert not (system / "kernel" / "version").exists()


async def test_bzimage_override_gets_a_cached_vmlinux(tmp_path: Path) -> None:
    elf = b"\x7fELF" + b"\0" * 60 + b"Linux version 9.9.9-test (someone) #1"
    compressed = gzip.compress(elf)
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(fake_bzimage(compressed))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701")
    system = tmp_path / "data" / "system"
    first = await ensure_artifacts(system, kernel_path=bzimage, initrd_path=initrd)
    assert first.bzimage == bzimage
    assert first.vmlinux.read_bytes() == elf
    assert first.vmlinux.is_relative_to(system)
    second = await ensure_artifacts(system, kernel_path=bzimage, initrd_path=initrd)
    assert second == first


@pytest.mark.parametrize("which", ["kernel_path", "initrd_path"])
async def test_missing_override_is_a_typed_error_and_changes_nothing(
    tmp_path: Path, which: str
) -> None:
    system = tmp_path / "data" / "system"
    with pytest.raises(OverridePathError, match="does not exist"):
        await ensure_artifacts(system, **{which: tmp_path / "absent"})
    assert not (tmp_path / "data").exists()


async def test_override_that_is_no_kernel_is_a_typed_error(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"plain text, not a kernel")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    with pytest.raises(OverridePathError, match="neither a bzImage nor an ELF"):
        await ensure_artifacts(tmp_path / "data" / "system", kernel_path=kernel, initrd_path=initrd)
    assert not (tmp_path / "data").exists()


def test_initrd_refuses_a_dynamic_busybox(tmp_path: Path) -> None:
    with pytest.raises(InitrdBuildError, match="dynamically linked"):
        require_static(Path("/bin/ls"))
    with pytest.raises(InitrdBuildError, match="busybox-static"):
        require_static(tmp_path / "absent")
    assert require_static(Path("/bin/busybox"))[:4] == b"\x7fELF"


@pytest.mark.parametrize(
    ("depends", "package"),
    [
        (
            "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)",
            "linux-image-6.1.0-56-cloud-amd64=6.1.192-2",
        ),
        ("linux-image-6.1.0-9-cloud-amd64", "linux-image-6.1.0-9-cloud-amd64"),
        ("libc6, linux-image-x (= 1) | linux-image-y", "linux-image-x=1"),
    ],
)
def test_meta_package_depends_names_the_image(depends: str, package: str) -> None:
    assert image_package(depends) == package


def test_meta_package_without_image_is_a_typed_error() -> None:
    with pytest.raises(KernelFetchError, match="no linux-image"):
        image_package("libc6")
