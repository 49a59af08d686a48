"""The volume manager with real e2fsprogs and erofs-utils: create, fill, grow, delete, claims,
and what bad input or a crash leaves (nothing)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from managers.images.devices import DeviceNode
from managers.images.errors import ImageNotFound
from managers.paths import Paths
from managers.volumes import (
    CreateVolume,
    InsufficientStorage,
    InvalidVolumeArchive,
    InvalidVolumeSpec,
    SourceImageMissing,
    VolumeExists,
    VolumeInUse,
    VolumeManager,
    VolumeNotFound,
    VolumeQuarantined,
    VolumeTooSmall,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)"),
    pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs)"),
    pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="needs erofs-utils"),
]


@dataclass(frozen=True)
class _Image:
    name: str
    digest: str
    format: str
    disk_path: Path | None


class _Images:
    """The images port: one image, the tree it was made from, and how often it is held."""

    def __init__(self, image: _Image, tree: Path | None = None) -> None:
        self.image = image
        self.tree = tree
        self.held = 0

    def acquire(self, name_or_digest: str) -> _Image:
        if name_or_digest not in (self.image.name, self.image.digest):
            raise ImageNotFound(f"no image {name_or_digest!r}")
        self.held += 1
        return self.image

    def release(self, digest: str) -> None:
        self.held -= 1

    async def unpack(self, name_or_digest: str, tree: Path) -> list[DeviceNode]:
        """The image's tree, as the image manager unpacks it: a copy of the tree its disk was
        made from."""
        assert self.held > 0, "unpacked while held"
        source = self.tree
        assert source is not None
        await anyio.to_thread.run_sync(
            lambda: shutil.copytree(source, tree, symlinks=True, dirs_exist_ok=True)
        )
        return []


def _files(disk: Path, path: str = "/") -> dict[str, str]:
    """What an ext4 disk holds (``debugfs``): file name -> content, for a quick look."""
    out = subprocess.run(
        ["debugfs", "-R", f"ls -p {path}", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6]
    found = {}
    for name in names:
        if name in (".", "..", "lost+found"):
            continue
        cat = subprocess.run(
            ["debugfs", "-R", f"cat {path.rstrip('/')}/{name}", str(disk)],
            capture_output=True,
            text=True,
            check=False,
        )
        found[name] = cat.stdout
    return found


def _tar(entries: list[tarfile.TarInfo], contents: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for entry in entries:
            data = contents.get(entry.name)
            if data is not None:
                entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    for key, value in fields.items():
        setattr(info, key, value)
    return info


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def image(tmp_path: Path) -> _Images:
    tree = tmp_path / "tree"
    (tree / "srv" / "app").mkdir(parents=True)
    (tree / "srv" / "app" / "hello.txt").write_text("hello from the image\n")
    (tree / "srv" / "app" / "link").symlink_to("/etc/passwd")
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("motd\n")
    (tree / "big").mkdir()
    (tree / "big" / "blob").write_bytes(os.urandom(12 << 20))
    disk = tmp_path / "rootfs.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(disk), str(tree)], check=True)
    return _Images(_Image("registry.test/app:1", "sha256:" + "a" * 64, "erofs", disk), tree)


@pytest.fixture
async def manager(tmp_path: Path, image: _Images) -> AsyncIterator[VolumeManager]:
    async with VolumeManager(Paths(tmp_path / "data"), images=image) as running:
        yield running


async def test_an_empty_volume_is_sparse_ext4_private_to_root(
    manager: VolumeManager, tmp_path: Path
) -> None:
    volume = await manager.create(CreateVolume("data", 10240))
    data = manager.data_path(volume.id)
    st = data.stat()
    assert st.st_size == 10240 << 20
    assert st.st_blocks * 512 < 64 << 20  # sparse: the lazy tables are not written
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(data.parent.stat().st_mode) == 0o700
    dumpe2fs = await anyio.run_process(["dumpe2fs", "-h", str(data)])
    assert "Reserved block count:     0" in dumpe2fs.stdout.decode()
    assert volume.record.format == "ext4"
    again = await manager.get("data")
    assert again.id == volume.id
    assert [v.id for v in await manager.list()] == [volume.id]


async def test_a_volume_from_an_image_holds_its_tree_or_a_folder_of_it(
    manager: VolumeManager, image: _Images
) -> None:
    whole = await manager.create(CreateVolume("whole", 64, image.image.name))
    assert _files(manager.data_path(whole.id), "/etc") == {"motd": "motd\n"}
    part = await manager.create(CreateVolume("part", 64, image.image.name, "/srv/app"))
    files = _files(manager.data_path(part.id))
    assert files["hello.txt"] == "hello from the image\n"
    assert part.record.source.digest == image.image.digest
    assert image.held == 0


async def test_an_archive_fills_a_volume(manager: VolumeManager) -> None:
    archive = _tar(
        [
            _entry("data", tarfile.DIRTYPE),
            _entry("data/a.txt"),
            _entry("data/b.txt", tarfile.LNKTYPE, linkname="data/a.txt"),
            _entry("data/up", tarfile.SYMTYPE, linkname="../../etc/passwd"),
        ],
        {"data/a.txt": b"alpha\n"},
        mode="w:gz",
    )
    volume = await manager.import_archive("imported", 16, _chunks(archive))
    files = _files(manager.data_path(volume.id), "/data")
    assert files["a.txt"] == "alpha\n"
    assert files["b.txt"] == "alpha\n"
    assert volume.record.source.kind == "archive"


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ([_entry("/abs")], "absolute"),
        ([_entry("../up")], "climbs out"),
        ([_entry("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)], "device node"),
        ([_entry("l", tarfile.SYMTYPE, linkname="/etc"), _entry("l/passwd")], "not a folder"),
        ([_entry("h", tarfile.LNKTYPE, linkname="missing")], "hard link"),
    ],
)
async def test_unsafe_archives_are_refused_and_leave_nothing(
    manager: VolumeManager, tmp_path: Path, entries: list[tarfile.TarInfo], problem: str
) -> None:
    root = tmp_path / "data" / "volumes"
    before = _listing(root)
    with pytest.raises(InvalidVolumeArchive, match=problem):
        await manager.import_archive("bad", 16, _chunks(_tar(entries, {})))
    assert _listing(root) == before
    assert await manager.list() == []
    # The name was not kept: a good import under it works.
    await manager.import_archive("bad", 16, _chunks(_tar([_entry("ok")], {"ok": b"1"})))


async def test_a_bomb_stops_at_the_volume_size(manager: VolumeManager, tmp_path: Path) -> None:
    big = tarfile.TarInfo("zeros")
    big.size = 64 << 20
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    compressed = buffer.getvalue()
    assert len(compressed) < 1 << 20
    with pytest.raises(VolumeTooSmall):
        await manager.import_archive("bomb", 16, _chunks(compressed))
    assert _listing(tmp_path / "data" / "volumes") == []


async def test_content_larger_than_the_volume_is_refused(
    manager: VolumeManager, image: _Images, tmp_path: Path
) -> None:
    with pytest.raises(VolumeTooSmall, match="needs at least"):
        await manager.create(CreateVolume("small", 8, image.image.name, "/big"))
    assert _listing(tmp_path / "data" / "volumes") == []
    assert image.held == 0
    roomy = await manager.create(CreateVolume("roomy", 32, image.image.name, "/big"))
    assert roomy.record.size_mb == 32


async def test_bad_requests_change_nothing(manager: VolumeManager, tmp_path: Path) -> None:
    await manager.create(CreateVolume("taken", 16))
    before = _listing(tmp_path / "data" / "volumes")
    with pytest.raises(VolumeExists):
        await manager.create(CreateVolume("taken", 16))
    for body in (
        {"name": "x", "size_mb": 1},
        {"name": "Bad Name", "size_mb": 16},
        {"name": "x", "size_mb": 16.0},
        {"name": "x"},
        {"name": "x", "size_mb": 16, "extra": 1},
        {"name": "x", "size_mb": 16, "source": {"image": "a", "path": "../etc"}},
    ):
        with pytest.raises(InvalidVolumeSpec):
            CreateVolume.from_json(body)
    with pytest.raises(SourceImageMissing, match="pull it first"):
        await manager.create(CreateVolume("x", 16, "unknown:1"))
    with pytest.raises(InvalidVolumeSpec, match="not a folder"):
        await manager.create(CreateVolume("x", 16, "registry.test/app:1", "/srv/app/link"))
    with pytest.raises(InsufficientStorage):
        await manager.create(CreateVolume("huge", 16 << 20))
    with pytest.raises(VolumeNotFound):
        await manager.get("nope")
    assert _listing(tmp_path / "data" / "volumes") == before


async def test_grow_keeps_data_and_shrink_is_refused(
    manager: VolumeManager, image: _Images
) -> None:
    volume = await manager.create(CreateVolume("grow", 16, image.image.name, "/etc"))
    grown = await manager.resize("grow", 64)
    assert grown.record.size_mb == 64
    assert manager.data_path(volume.id).stat().st_size == 64 << 20
    assert _files(manager.data_path(volume.id)) == {"motd": "motd\n"}
    with pytest.raises(InvalidVolumeSpec, match="shrinking"):
        await manager.resize("grow", 32)
    assert (await manager.resize("grow", 64)).record.size_mb == 64


async def test_claims_follow_the_sharing_rules(manager: VolumeManager) -> None:
    volume = await manager.create(CreateVolume("shared", 16))
    manager.claim("shared", "aaaaaaaaaaaa", "/data", True)
    manager.claim(volume.id, "bbbbbbbbbbbb", "/data", True)
    with pytest.raises(VolumeInUse, match="read-only elsewhere"):
        manager.claim("shared", "cccccccccccc", "/data", False)
    with pytest.raises(VolumeInUse, match="already attached"):
        manager.claim("shared", "aaaaaaaaaaaa", "/other", True)
    assert [a.instance_id for a in (await manager.get("shared")).attachments] == [
        "aaaaaaaaaaaa",
        "bbbbbbbbbbbb",
    ]
    with pytest.raises(VolumeInUse):
        await manager.delete("shared")
    with pytest.raises(VolumeInUse):
        await manager.resize("shared", 32)
    manager.release(volume.id, "aaaaaaaaaaaa")
    manager.release(volume.id, "bbbbbbbbbbbb")
    manager.claim("shared", "cccccccccccc", "/data", False)
    with pytest.raises(VolumeInUse, match="read-write"):
        manager.claim("shared", "dddddddddddd", "/data", True)
    manager.release(volume.id, "cccccccccccc")
    await manager.delete("shared")
    with pytest.raises(VolumeNotFound):
        await manager.get("shared")
    assert not manager.data_path(volume.id).exists()


async def test_start_up_removes_leftovers_quarantines_the_unreadable_and_finishes_a_resize(
    tmp_path: Path, image: _Images
) -> None:
    paths = Paths(tmp_path / "data")
    async with VolumeManager(paths, images=image) as manager:
        kept = await manager.create(CreateVolume("kept", 16))
        broken = await manager.create(CreateVolume("broken", 16))
        resized = await manager.create(CreateVolume("resized", 16))
    (paths.volumes / ".creating-0123456789ab").mkdir()
    (paths.volumes / ".deleting-0123456789ab-00ff00ff").mkdir()
    paths.volume_metadata(broken.id).write_text("{not json")
    # A resize whose record says so, cut short before its file grew.
    record = resized.record.to_json()
    record["intent"] = {"action": "resize", "at": record["created_at"], "size_mb": 48}
    paths.volume_metadata(resized.id).write_text(json.dumps(record))
    async with VolumeManager(paths, images=image) as manager:
        assert sorted(v.name for v in await manager.list()) == ["kept", "resized"]
        assert (await manager.get("resized")).record.size_mb == 48
        assert manager.data_path(resized.id).stat().st_size == 48 << 20
        assert (await manager.get(kept.id)).name == "kept"
        with pytest.raises(VolumeQuarantined):
            await manager.get(broken.id)
    assert sorted(os.listdir(paths.volumes)) == sorted([kept.id, resized.id])
    moved = list((paths.quarantine_kind("volumes")).iterdir())
    assert len(moved) == 1
    assert (moved[0] / "data.raw").exists()


async def test_a_cancelled_import_leaves_nothing(manager: VolumeManager, tmp_path: Path) -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield _tar([_entry("a")], {"a": b"x"})[:1024]
        await anyio.sleep(30)
        yield b""

    with anyio.move_on_after(0.5):
        await manager.import_archive("slow", 16, slow())
    assert _listing(tmp_path / "data" / "volumes") == []
    await manager.create(CreateVolume("slow", 16))
