"""Importing OCI image archives: the happy path, and unsafe archives that change nothing."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from managers.images import ImageManager, ImageStatus, InvalidArchive
from managers.paths import Paths
from tests.support.oci_builder import (
    STANDARD_TREE,
    LayerBuilder,
    make_image,
    read_tree,
    standard_layers,
    write_oci_archive,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)"),
    pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs)"),
]


async def _chunks(path: Path, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    data = await anyio.Path(path).read_bytes()
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ImageManager]:
    async with ImageManager(Paths(tmp_path / "data"), docker_config=None) as running:
        yield running


async def test_import_builds_the_image(manager: ImageManager, tmp_path: Path) -> None:
    image = make_image(
        [layer.build() for layer in standard_layers()], config={"Cmd": ["/bin/tool"]}
    )
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, image, name="example.com/team/app:1.0")
    requested = await manager.import_archive(_chunks(archive), "ext4")
    assert requested.name == "example.com/team/app:1.0"
    assert requested.digest == image.manifest_digest
    with anyio.fail_after(120):
        async for ready in manager.subscribe(requested.digest):  # noqa: B007 (the last one counts)
            pass
    assert ready.status == ImageStatus.READY, ready.error
    assert ready.config is not None
    assert ready.config.cmd == ("/bin/tool",)
    assert await manager.get("example.com/team/app:1.0") == ready
    assert ready.disk_path is not None
    out = tmp_path / "out"
    out.mkdir()
    await anyio.run_process(["debugfs", "-R", f"rdump / {out}", str(ready.disk_path)])
    tree = read_tree(out)
    assert {p: (k, c) for p, (k, _m, _u, _g, c) in tree.items() if p != "lost+found"} == {
        p: (k, c) for p, (k, _m, _u, _g, c) in STANDARD_TREE.items()
    }


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    data = b"evil" if kind == tarfile.REGTYPE else None
    info.size = len(data) if data else 0
    return info, data


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([_member("../escape")], "climbs out"),
        ([_member("/etc/evil")], "absolute"),
        ([_member("blobs/link", tarfile.SYMTYPE, "../../etc/passwd")], "out of the tree"),
        ([_member("blobs/abs", tarfile.SYMTYPE, "/etc/passwd")], "out of the tree"),
        ([_member("hard", tarfile.LNKTYPE, "../outside")], "out of the tree"),
        ([_member("dev", tarfile.CHRTYPE)], "not a regular file"),
    ],
)
async def test_unsafe_archives_are_refused_and_change_nothing(
    manager: ImageManager,
    tmp_path: Path,
    extra: list[tuple[tarfile.TarInfo, bytes | None]],
    reason: str,
) -> None:
    image = make_image([LayerBuilder().file("f", os.urandom(64)).build()])
    archive = tmp_path / "evil.tar"
    write_oci_archive(archive, image, extra=extra)
    data_root = tmp_path / "data"
    before = _snapshot(data_root)
    with pytest.raises(InvalidArchive, match=reason):
        await manager.import_archive(_chunks(archive))
    assert _snapshot(data_root) == before
    assert await manager.list() == []


async def test_corrupt_or_incomplete_archives_are_refused(
    manager: ImageManager, tmp_path: Path
) -> None:
    data_root = tmp_path / "data"
    before = _snapshot(data_root)

    tampered = make_image([LayerBuilder().file("f", b"content").build()])
    bad = tmp_path / "tampered.tar"
    write_oci_archive(bad, tampered)
    with tarfile.open(bad) as source:
        members = []
        for member in source:
            handle = source.extractfile(member) if member.isreg() else None
            members.append((member, handle.read() if handle else None))
    with tarfile.open(bad, "w") as out:
        for info, data in members:
            if data is not None and info.name.startswith("blobs/") and data == tampered.layers[0]:
                data = bytes(len(data))  # same size, wrong content
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    with pytest.raises(InvalidArchive, match="does not match its digest"):
        await manager.import_archive(_chunks(bad))

    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(os.urandom(1000))
    with pytest.raises(InvalidArchive):
        await manager.import_archive(_chunks(not_tar))

    no_index = tmp_path / "noindex.tar"
    with tarfile.open(no_index, "w") as out:
        info = tarfile.TarInfo("oci-layout")
        out.addfile(info, io.BytesIO(b""))
    with pytest.raises(InvalidArchive, match=r"index\.json"):
        await manager.import_archive(_chunks(no_index))
    assert _snapshot(data_root) == before
