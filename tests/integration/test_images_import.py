"""Importing OCI image archives: the happy path, and unsafe archives that change nothing."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from managers.images import ImageManager, ImageStatus, InvalidArchive
from managers.paths import Paths
from tests.support.artifacts import shared_artifacts
from tests.support.oci_builder import (
    STANDARD_TREE,
    LayerBuilder,
    make_image,
    read_tree,
    standard_layers,
    write_oci_archive,
)
from tests.support.server import import_image, run_server, wait_guest_settled

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


def _with_sparse_member(archive: Path, tmp: Path, apparent: int) -> Path:
    """``archive`` again, by GNU tar, with a sparse member of ``apparent`` bytes added (a few
    hundred bytes in the archive)."""
    tree = tmp / "sparse-tree"
    with tarfile.open(archive) as source:
        source.extractall(tree, filter="data")
    with (tree / "hole").open("wb") as handle:
        handle.truncate(apparent)
    out = tmp / "sparse.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(out), "-C", str(tree),
         *sorted(p.name for p in tree.iterdir())],
        check=True,
    )  # fmt: skip
    return out


async def test_an_archive_that_would_stage_more_than_it_holds_is_refused(
    manager: ImageManager, tmp_path: Path
) -> None:
    image = make_image([LayerBuilder().file("f", os.urandom(64)).build()])
    data_root = tmp_path / "data"
    before = _snapshot(data_root)

    plain = tmp_path / "plain.tar"
    write_oci_archive(plain, image)
    sparse = _with_sparse_member(plain, tmp_path, 2 << 30)
    assert sparse.stat().st_size < 1 << 20
    with pytest.raises(InvalidArchive, match="sparse"):
        await manager.import_archive(_chunks(sparse))

    # A gzip bomb: 256 MB of zeros in a member of an archive of a few hundred kilobytes.
    bomb = tmp_path / "bomb.tar"
    write_oci_archive(bomb, image, extra=[_zeros("padding", 256 << 20)])
    squeezed = tmp_path / "bomb.tar.gz"
    squeezed.write_bytes(gzip.compress(bomb.read_bytes(), compresslevel=1))
    assert squeezed.stat().st_size < 2 << 20
    with pytest.raises(InvalidArchive, match="more bytes than the whole archive"):
        await manager.import_archive(_chunks(squeezed))
    assert _snapshot(data_root) == before


def _zeros(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, bytes(size)


@pytest.mark.parametrize("kernel", ["vmlinux", "bzimage"])
def test_a_full_disk_during_an_import_is_507_and_leaves_nothing(
    tmp_path: Path, kernel: str
) -> None:
    """With a bzImage the server also unpacks its vmlinux into the small DATA_DIR at start-up,
    which runs out of room too: the guest is then unavailable, the server keeps serving."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the server a small private tmpfs")
    data = tmp_path / "data"
    data.mkdir()
    # The server alone sees a 32 MB tmpfs as its DATA_DIR, in a mount namespace of its own.
    mount = f'mount -t tmpfs -o size=32m,mode=0700 tmpfs "{data}" && exec "$@"'
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]
    artifacts = shared_artifacts()
    env = {
        "KERNEL_PATH": str(getattr(artifacts, kernel)),
        "INITRD_PATH": str(artifacts.initrd),
    }
    big = make_image([LayerBuilder().file("noise", os.urandom(48 << 20)).build()])
    archive = tmp_path / "big.tar"
    write_oci_archive(archive, big)
    small = make_image([LayerBuilder().file("f", os.urandom(64)).build()])
    fits = tmp_path / "small.tar"
    write_oci_archive(fits, small)
    with run_server(data, env, wrapper=wrapper) as server, server.client(60) as client:
        # Extracting a bzImage's vmlinux runs out of room on its own; that must be over before
        # the imports, or it would take the room the small import needs.
        guest = wait_guest_settled(client)
        if kernel == "bzimage":
            assert guest["status"] == "unavailable", guest
            assert "No space left" in guest["error"], guest
        else:
            assert guest == {"status": "ready", "error": None}
        refused = client.post(
            "/images/import",
            content=archive.read_bytes(),
            headers={"content-type": "application/x-tar"},
        )
        assert refused.status_code == 507, refused.text
        assert refused.json()["code"] == "insufficient_storage"
        # What the server sees: nothing of the import is left in its DATA_DIR.
        seen = Path(f"/proc/{server.process.pid}/root") / str(data).lstrip("/")
        assert [p.name for p in (seen / "system" / "tmp").iterdir()] == ["blobs"]
        assert client.get("/images").json() == []
        assert import_image(client, fits, 60) == small.manifest_digest
