"""The image manager against a real registry, real mkfs, and the finished disk read back."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tarfile
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from managers.errors import DomainError
from managers.images import (
    FormatConflict,
    ImageInUse,
    ImageManager,
    ImageNotFound,
    ImageStatus,
    InvalidReference,
    RegistryAuthFailed,
    RegistryError,
    RegistryUnreachable,
    registry_threads,
)
from managers.images import disk as disk_module
from managers.images.registry import Stopped
from managers.images.scratch import unpacked_estimate
from managers.images.types import Image
from managers.images.unpack import Unpacker
from managers.paths import Paths
from managers.volumes import CreateVolume, VolumeManager
from managers.volumes import filesystem as volume_filesystem
from tests.support.oci_builder import (
    STANDARD_TREE,
    BuiltImage,
    LayerBuilder,
    Pusher,
    TreeEntry,
    make_image,
    read_tree,
    sha256,
    standard_layers,
)
from tests.support.registry import (
    LocalRegistry,
    registry_available,
    running_registry,
    token_auth_proxy,
)

_TOOLS = ("docker-registry", "mkfs.erofs", "fsck.erofs", "dump.erofs", "mkfs.ext4", "debugfs")
_missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="disk owners are only kept when run as root"),
]

CONFIG = {
    "Entrypoint": ["/bin/tool"],
    "Cmd": ["--flag", "two words"],
    "Env": ["PATH=/bin", "GREETING=hello"],
    "WorkingDir": "/home/user",
    "User": "1000:1000",
    "ExposedPorts": {"8080/tcp": {}},
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    assert registry_available()
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="module")
def pusher(registry: LocalRegistry) -> Iterator[Pusher]:
    client = Pusher(registry.host)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def standard(pusher: Pusher) -> BuiltImage:
    image = make_image([layer.build() for layer in standard_layers()], config=CONFIG)
    pusher.image("test/standard", "v1", image)
    return image


def _manager(root: Path, registry: LocalRegistry, **kwargs: object) -> ImageManager:
    """A manager whose RAM scratch is a plain directory beside ``root``, to check it is emptied."""
    options: dict[str, object] = {
        "scratch_dir": _scratch(root),
        "insecure_registries": frozenset({registry.host}),
        "resolve_timeout": 3.0,
        "docker_config": root / "no-docker-config.json",
    }
    options.update(kwargs)
    return ImageManager(Paths(root), **options)  # type: ignore[arg-type]


def _scratch(root: Path) -> Path:
    scratch = root.parent / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


@pytest.fixture
async def manager(tmp_path: Path, registry: LocalRegistry) -> AsyncIterator[ImageManager]:
    async with _manager(tmp_path / "data", registry) as running:
        yield running


async def _finish(manager: ImageManager, digest: str) -> tuple[Image, list[ImageStatus]]:
    """Follow the image to ready/failed; the deadline only guards against a hung build."""
    seen: list[ImageStatus] = []
    image = None
    with anyio.fail_after(120):
        async for image in manager.subscribe(digest):
            if not seen or seen[-1] != image.status:
                seen.append(image.status)
    assert image is not None
    return image, seen


def _erofs_tree(disk: Path, dest: Path) -> tuple[dict[str, TreeEntry], bool]:
    """The disk's tree and whether hard1/hard2 share an inode.

    A read-only loop mount shows everything; where mounting is impossible, fsck.erofs extracts the
    tree, which (like dump.erofs) loses setuid/setgid bits, so only permission bits compare then.
    """
    dest.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "erofs", "-o", "loop,ro", str(disk), str(dest)], capture_output=True
    )
    if mounted.returncode == 0:
        try:
            tree = read_tree(dest)
            linked = (
                "hard1" in tree and os.stat(dest / "hard1").st_ino == os.stat(dest / "hard2").st_ino
            )
        finally:
            subprocess.run(["umount", str(dest)], check=True)
        return tree, linked
    extracted = dest / "x"
    subprocess.run(
        ["fsck.erofs", f"--extract={extracted}", "--preserve", str(disk)],
        check=True,
        capture_output=True,
    )
    tree = {p: (k, m & 0o777, u, g, c) for p, (k, m, u, g, c) in read_tree(extracted).items()}
    return tree, "hard1" in tree and _erofs_nid(disk, "/hard1") == _erofs_nid(disk, "/hard2")


def _erofs_nid(disk: Path, path: str) -> str:
    out = subprocess.run(
        ["dump.erofs", f"--path={path}", str(disk)], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"NID: (\d+)", out)
    assert match, out
    return match.group(1)


def _comparable(tree: dict[str, TreeEntry], actual: dict[str, TreeEntry]) -> dict[str, TreeEntry]:
    """``tree`` with special mode bits dropped when ``actual`` came from a bit-losing extraction."""
    if any(m & 0o7000 for _k, m, _u, _g, _c in actual.values()):
        return tree
    return {p: (k, m & 0o777, u, g, c) for p, (k, m, u, g, c) in tree.items()}


def _ext4_tree(disk: Path, dest: Path) -> dict[str, TreeEntry]:
    """debugfs rdump for kinds and contents; its ``stat`` for modes, owners (rdump drops suid)."""
    dest.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(disk)], check=True, capture_output=True)
    shutil.rmtree(dest / "lost+found")
    tree = read_tree(dest)
    commands = "".join(f'stat "/{path}"\n' for path in tree)
    script = dest.parent / "stat.cmds"
    script.write_text(commands)
    out = subprocess.run(
        ["debugfs", "-f", str(script), str(disk)], check=True, capture_output=True, text=True
    ).stdout
    stats = re.findall(
        r"Inode: (\d+)\s+Type: \w+\s+Mode:\s+(\d+).*?User:\s+(\d+)\s+Group:\s+(\d+)", out, re.S
    )
    assert len(stats) == len(tree)
    for (path, entry), (_inode, mode, uid, gid) in zip(tree.items(), stats, strict=True):
        kind, _mode, _uid, _gid, payload = entry
        tree[path] = (kind, 0 if kind == "symlink" else int(mode, 8), int(uid), int(gid), payload)
    return tree


async def test_pull_builds_an_erofs_disk_matching_the_layers(
    manager: ImageManager, registry: LocalRegistry, standard: BuiltImage, tmp_path: Path
) -> None:
    name = f"{registry.host}/test/standard:v1"
    requested = await manager.request(name)
    assert requested.status == ImageStatus.PENDING
    assert requested.digest == standard.manifest_digest
    assert requested.name == name

    image, seen = await _finish(manager, requested.digest)
    assert image.status == ImageStatus.READY, image.error
    assert seen[0] == ImageStatus.PENDING
    assert seen[-3:] == [ImageStatus.UNPACKING, ImageStatus.CONVERTING, ImageStatus.READY]
    assert ImageStatus.PULLING in seen
    assert image.disk_path is not None
    assert image.disk_path.name == "rootfs.erofs"
    assert image.size == image.disk_path.stat().st_size
    assert image.config is not None
    assert image.config.entrypoint == ("/bin/tool",)
    assert image.config.cmd == ("--flag", "two words")
    assert image.config.env == ("PATH=/bin", "GREETING=hello")
    assert (image.config.workdir, image.config.user) == ("/home/user", "1000:1000")
    assert image.config.exposed_ports == ("8080/tcp",)

    tree, hardlinked = _erofs_tree(image.disk_path, tmp_path / "out")
    assert tree == _comparable(STANDARD_TREE, tree)
    assert hardlinked

    # Second request of a ready image: the same image, no rebuild.
    again = await manager.request(name)
    assert again == image
    assert await manager.get(name) == image
    assert await manager.get(image.digest) == image
    assert [i.digest for i in await manager.list()] == [image.digest]

    # Nothing temporary is left behind, and the RAM scratch is root's alone.
    assert list(_scratch(tmp_path / "data").rglob("*.rootfs")) == []
    for private in _scratch(tmp_path / "data").iterdir():
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    paths = Paths(tmp_path / "data")
    assert [p.name for p in paths.tmp.iterdir()] == ["blobs"]
    assert list((paths.tmp / "blobs").iterdir()) == []
    assert sorted(p.name for p in paths.image_dir(image.digest).iterdir()) == [
        "metadata.json",
        "rootfs.erofs",
    ]


async def test_layout_is_readable_by_umoci(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    """Docker schema-2 media types are rewritten so umoci accepts the layout, and umoci's own
    unpack agrees with ours on every path, kind, content and mode."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    image = make_image([layer.build() for layer in standard_layers()], docker=True)
    pusher.image("test/docker", "v1", image)
    requested = await manager.request(f"{registry.host}/test/docker:v1", "ext4")
    ready, _ = await _finish(manager, requested.digest)
    assert ready.status == ImageStatus.READY, ready.error
    assert ready.disk_path is not None
    assert ready.disk_path.name == "rootfs.ext4"
    ours = _ext4_tree(ready.disk_path, tmp_path / "ours")
    assert ours == STANDARD_TREE

    layout = Paths(tmp_path / "data").oci_layout
    ref = ready.digest.partition(":")[2]
    bundle = tmp_path / "bundle"
    await anyio.run_process(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:{ref}", str(bundle)]
    )
    theirs = read_tree(bundle / "rootfs")

    def without_owners(tree: dict[str, TreeEntry]) -> dict[str, tuple[object, ...]]:
        return {path: (kind, mode, payload) for path, (kind, mode, _u, _g, payload) in tree.items()}

    assert without_owners(theirs) == without_owners(STANDARD_TREE)


async def test_manifest_list_and_index_pick_the_host_platform(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    def arch_image(arch: str, docker: bool) -> BuiltImage:
        layer = LayerBuilder().file("arch", arch.encode()).build()
        return make_image([layer], docker=docker, arch=arch)

    for docker, repo in ((True, "test/list"), (False, "test/index")):
        amd64, arm64 = arch_image("amd64", docker), arch_image("arm64", docker)
        index_digest = pusher.index(
            repo, "multi", [(arm64, "linux", "arm64"), (amd64, "linux", "amd64")], docker=docker
        )
        requested = await manager.request(f"{registry.host}/{repo}:multi")
        assert requested.digest == index_digest
        ready, _ = await _finish(manager, requested.digest)
        assert ready.status == ImageStatus.READY, ready.error
        assert ready.disk_path is not None
        tree, _ = _erofs_tree(ready.disk_path, tmp_path / repo.replace("/", "-"))
        assert tree == {"arch": ("file", 0o644, 0, 0, b"amd64")}


async def test_shared_layers_once_and_moved_tags(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    shared = LayerBuilder().file("shared", os.urandom(4096)).build()
    first = make_image([shared, LayerBuilder().file("v", b"1").build()])
    second = make_image([shared, LayerBuilder().file("v", b"2").build()])
    pusher.image("test/moving", "latest", first)
    name = f"{registry.host}/test/moving"

    one = await manager.request(name)
    assert one.name == f"{name}:latest"
    both_one = [await manager.request(name) for _ in range(2)]
    assert {i.digest for i in both_one} == {one.digest}  # same digest queued once
    one_ready, _ = await _finish(manager, one.digest)
    assert one_ready.status == ImageStatus.READY

    pusher.image("test/moving", "latest", second)  # the tag moves
    two = await manager.request(name)
    assert two.digest == second.manifest_digest != one.digest
    two_ready, _ = await _finish(manager, two.digest)
    assert two_ready.status == ImageStatus.READY
    assert await manager.get(name) == two_ready
    # The tag moved: the old image is listed by its digest now, not under the tag.
    old_name = f"{name}@{one.digest}"
    assert await manager.get(one.digest) == replace(one_ready, name=old_name)
    assert sorted((i.name, i.digest) for i in await manager.list()) == sorted(
        [(f"{name}:latest", two.digest), (old_name, one.digest)]
    )

    blobs = {p.name for p in (Paths(tmp_path / "data").oci_layout / "blobs/sha256").iterdir()}
    assert sha256(shared[0]).partition(":")[2] in blobs
    # 2 manifests + 2 configs + 3 distinct layers: the shared layer is stored once.
    assert len(blobs) == 7

    with pytest.raises(FormatConflict):
        await manager.request(name, "ext4")


async def test_a_second_name_is_the_same_image_under_that_name(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    image = make_image([LayerBuilder().file("f", b"named twice").build()])
    pusher.image("test/first", "v1", image)
    pusher.image("other/alias", "v9", image)
    first, alias = f"{registry.host}/test/first:v1", f"{registry.host}/other/alias:v9"
    ready, _ = await _finish(manager, (await manager.request(first)).digest)
    again = await manager.request(alias)
    assert (again.name, again.digest) == (alias, ready.digest)
    assert (await manager.get(alias)).name == alias
    assert sorted(i.name for i in await manager.list()) == sorted([first, alias])
    disks = list((Paths(tmp_path / "data").images).glob("*/rootfs.*"))
    assert len(disks) == 1, "one digest, one disk"
    async with manager.use(alias) as used:
        assert used.name == alias, "an instance records the name it was asked for"

    # Deleting one name leaves the image under the other; the last name takes it along.
    await manager.delete(alias)
    assert [i.name for i in await manager.list()] == [first]
    with pytest.raises(ImageNotFound):
        await manager.get(alias)
    await manager.delete(first)
    assert await manager.list() == []


@pytest.mark.parametrize("fmt", ["erofs", "ext4"])
async def test_device_nodes_reach_the_disk_but_never_the_host(
    tmp_path: Path, registry: LocalRegistry, pusher: Pusher, fmt: str
) -> None:
    layers = [
        LayerBuilder()
        .dir("dev")
        .device("dev/null", 1, 3)
        .device("dev/sda", 8, 0, char=False, mode=0o660)
        .device("dev/gone", 1, 5)
        .device("dev/replaced", 1, 7)
        .hardlink("dev/null2", "dev/null")
        .file("etc/hostname", b"box\n")
        .build(),
        # A later layer removes one node and puts an empty file where another was.
        LayerBuilder().whiteout("dev/gone").file("dev/replaced", b"").build(),
    ]
    pusher.image("test/devices", fmt, make_image(layers))
    root = tmp_path / "data"
    seen: list[os.stat_result] = []

    def look(tree: Path) -> None:
        # Whatever the unpacked tree holds at the disk builder's start: no live node.
        for path in tree.rglob("*"):
            seen.append(os.lstat(path))

    original = disk_module.build_disk

    async def spying(tree: Path, *args: object, **kwargs: object) -> int:
        await anyio.to_thread.run_sync(look, tree)
        return await original(tree, *args, **kwargs)  # type: ignore[arg-type]

    async with _manager(root, registry) as manager:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(disk_module, "build_disk", spying)
            image = await manager.request(f"{registry.host}/test/devices:{fmt}", fmt)  # type: ignore[arg-type]
            ready, _ = await _finish(manager, image.digest)
    assert ready.status is ImageStatus.READY, ready.error
    assert seen, "the spy saw the tree"
    assert not any(stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) for st in seen)
    assert ready.disk_path is not None
    nodes = _device_nodes(ready.disk_path, fmt, tmp_path / "mnt")
    assert nodes == {
        "null": ("char", 1, 3, 0o666),
        "null2": ("char", 1, 3, 0o666),  # a hard link to a device is one too
        "sda": ("block", 8, 0, 0o660),
        "replaced": ("file", 0, 0, 0o644),
    }


async def test_a_volume_filled_from_an_image_gets_its_device_nodes_none_on_the_host(
    tmp_path: Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    layer = LayerBuilder().dir("dev").device("dev/null", 1, 3).file("etc/motd", b"hi\n")
    pusher.image("test/devvol", "v1", make_image([layer.build()]))
    root = tmp_path / "data"
    seen: list[os.stat_result] = []
    original = volume_filesystem.format_from_tree

    async def spying(path: Path, tree: Path, *args: object, **kwargs: object) -> None:
        await anyio.to_thread.run_sync(lambda: seen.extend(p.lstat() for p in tree.rglob("*")))
        await original(path, tree, *args, **kwargs)  # type: ignore[arg-type]

    async with _manager(root, registry) as images:
        image = await images.request(f"{registry.host}/test/devvol:v1")
        ready, _ = await _finish(images, image.digest)
        assert ready.status is ImageStatus.READY
        async with VolumeManager(Paths(root), images=images) as volumes:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(volume_filesystem, "format_from_tree", spying)
                volume = await volumes.create(CreateVolume("withdev", 64, ready.name))
            data = Paths(root).volume_data(volume.id)
            assert seen
            assert not any(stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) for st in seen)
            assert _device_nodes(data, "ext4", tmp_path / "mnt") == {"null": ("char", 1, 3, 0o666)}


@contextlib.contextmanager
def _mounted(disk: Path, fmt: str, mnt: Path) -> Iterator[Path]:
    """``disk`` mounted read-only at ``mnt`` with nodev, nosuid and noexec: looked at, never
    run or opened as a device. (The module runs as root, which mounting needs.)"""
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", fmt, "-o", "loop,ro,nodev,nosuid,noexec", str(disk), str(mnt)],
        check=True,
        capture_output=True,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _device_nodes(disk: Path, fmt: str, mnt: Path) -> dict[str, tuple[str, int, int, int]]:
    """What is under /dev on ``disk``: kind, major, minor and permission bits of each."""
    found = {}
    with _mounted(disk, fmt, mnt) as root:
        for path in (root / "dev").iterdir():
            st = path.lstat()
            kind = (
                "char"
                if stat.S_ISCHR(st.st_mode)
                else "block"
                if stat.S_ISBLK(st.st_mode)
                else "file"
            )
            found[path.name] = (
                kind,
                os.major(st.st_rdev),
                os.minor(st.st_rdev),
                stat.S_IMODE(st.st_mode),
            )
    return found


async def test_a_layer_of_fifty_thousand_small_files_builds_whole(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    layer = LayerBuilder().dir("node_modules")
    for n in range(50_000):
        if n % 100 == 0:
            layer.dir(f"node_modules/pkg{n // 100}")
        layer.file(f"node_modules/pkg{n // 100}/f{n}.js", b"module.exports = %d;\n" % n)
    pusher.image("test/many", "v1", make_image([layer.build(level=1)]))
    image, _ = await _finish(
        manager, (await manager.request(f"{registry.host}/test/many:v1")).digest
    )
    assert image.status is ImageStatus.READY, image.error
    assert image.disk_path is not None
    count, last = await anyio.to_thread.run_sync(_count_modules, image.disk_path, tmp_path / "mnt")
    assert count == 50_000
    assert last == b"module.exports = 49999;\n"


def _count_modules(disk: Path, mnt: Path) -> tuple[int, bytes]:
    """How many ``.js`` files the erofs ``disk`` holds, and the last one's content."""
    with _mounted(disk, "erofs", mnt) as root:
        count = sum(1 for _ in (root / "node_modules").rglob("*.js"))
        return count, (root / "node_modules/pkg499/f49999.js").read_bytes()


async def test_images_that_differ_only_in_config_share_one_disk(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    layers = [LayerBuilder().file("app/data", os.urandom(256 << 10)).build()]
    names = []
    for n in range(4):
        variant = make_image(layers, config={"Entrypoint": [f"/app/run-{n}"], "Env": [f"N={n}"]})
        pusher.image("test/variant", f"v{n}", variant)
        names.append(f"{registry.host}/test/variant:v{n}")
    # Two at once (the second waits for the first's disk), then two one after the other.
    requested = [await manager.request(name) for name in names[:2]]
    first, _ = await _finish(manager, requested[0].digest)
    second, _ = await _finish(manager, requested[1].digest)
    others = [second]
    for name in names[2:]:
        image, statuses = await _finish(manager, (await manager.request(name)).digest)
        assert ImageStatus.UNPACKING not in statuses, "no unpack, no mkfs: the disk is shared"
        others.append(image)
    for n, image in enumerate([first, *others]):
        assert image.status is ImageStatus.READY
        assert image.config is not None
        assert image.config.entrypoint == (f"/app/run-{n}",)
    assert first.disk_path is not None
    inodes = {os.stat(i.disk_path).st_ino for i in [first, *others] if i.disk_path}
    assert len(inodes) == 1
    assert len({i.digest for i in [first, *others]}) == 4

    # Each image holds its name of the disk: the last one deleted takes it along.
    await manager.delete(names[0])
    assert others[0].disk_path is not None
    assert others[0].disk_path.is_file()
    assert os.stat(others[0].disk_path).st_nlink == 3
    for name in names[1:]:
        await manager.delete(name)
    assert await manager.list() == []


async def test_request_errors_are_typed(manager: ImageManager, registry: LocalRegistry) -> None:
    with pytest.raises(InvalidReference):
        await manager.request("Not A Reference")
    with pytest.raises(ImageNotFound):
        await manager.request(f"{registry.host}/test/nonexistent:v1")
    with pytest.raises(ImageNotFound):
        await manager.request(f"{registry.host}/test/standard:no-such-tag")
    with pytest.raises(ImageNotFound):
        await manager.request(f"{registry.host}/test/standard@sha256:{'0' * 64}")
    with pytest.raises(ImageNotFound):
        await manager.get("docker.io/library/never-pulled:1")
    assert await manager.list() == []


async def test_unreachable_registry_fails_fast_with_a_reason(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
    manager = ImageManager(
        Paths(tmp_path / "data"), insecure_registries=frozenset({dead}), resolve_timeout=2.0
    )
    async with manager:
        with pytest.raises(RegistryUnreachable, match=re.escape(dead)):
            await manager.request(f"{dead}/test/x:1")
        assert await manager.list() == []


class _SilentRegistry:
    """A TCP server that accepts every connection and answers nothing until released; from
    then on it closes each connection, held or new, at once."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.host = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if self._released.is_set():
                conn.close()
            else:
                self.held.append(conn)

    def release(self) -> None:
        self._released.set()
        for conn in self.held:
            conn.close()

    def close(self) -> None:
        self.release()
        self._sock.close()
        self._thread.join(10)


async def test_a_silent_registry_holds_neither_the_process_threads_nor_other_pulls(
    tmp_path: Path, registry: LocalRegistry, standard: BuiltImage
) -> None:
    silent = _SilentRegistry()
    manager = _manager(
        tmp_path / "data",
        registry,
        insecure_registries=frozenset({registry.host, silent.host}),
        resolve_timeout=600.0,
    )
    failed: list[BaseException] = []

    async def request_silent(n: int) -> None:
        try:
            await manager.request(f"{silent.host}/hang/app{n}:v1")
        except DomainError as error:
            failed.append(error)

    try:
        async with manager, anyio.create_task_group() as tg:
            # More than anyio's whole default pool of worker threads (40).
            for n in range(60):
                tg.start_soon(request_silent, n)
            with anyio.fail_after(30):
                while len(silent.held) < registry_threads.PER_HOST:  # noqa: ASYNC110 - filled by a thread
                    await anyio.sleep(0.01)
            # Everyone else's worker threads are free, and so are other registries'.
            with anyio.fail_after(60):
                assert await anyio.to_thread.run_sync(lambda: 42) == 42
                image = await manager.request(f"{registry.host}/test/standard:v1")
            ready, _ = await _finish(manager, image.digest)
            assert ready.status is ImageStatus.READY
            assert len(silent.held) == registry_threads.PER_HOST, "one registry's share only"
            silent.release()
        assert len(failed) == 60
        assert all(isinstance(error, RegistryUnreachable | RegistryError) for error in failed)
    finally:
        silent.close()


async def test_digest_mismatch_fails_and_leaves_nothing(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    layer = LayerBuilder().file("payload", os.urandom(8192)).build()
    image = make_image([layer])
    pusher.image("test/corrupt", "v1", image)
    # Corrupt the blob inside the registry's storage: it now serves bytes of another digest.
    hexdigest = sha256(layer[0]).partition(":")[2]
    stored = registry.storage / f"docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"
    stored.write_bytes(bytes(len(layer[0])))

    requested = await manager.request(f"{registry.host}/test/corrupt:v1")
    failed, _ = await _finish(manager, requested.digest)
    assert failed.status == ImageStatus.FAILED
    assert failed.error is not None
    assert "digest mismatch" in failed.error
    assert failed.disk_path is None
    paths = Paths(tmp_path / "data")
    assert not (paths.oci_layout / "blobs/sha256" / hexdigest).exists()
    assert list((paths.tmp / "blobs").iterdir()) == []
    assert [p.name for p in paths.image_dir(failed.digest).iterdir()] == ["metadata.json"]


async def test_broken_layer_fails_with_reason(
    manager: ImageManager, registry: LocalRegistry, pusher: Pusher, tmp_path: Path
) -> None:
    junk = b"\x1f\x8b" + os.urandom(4000)
    image = make_image([(junk, sha256(junk))])
    pusher.image("test/junk", "v1", image)
    requested = await manager.request(f"{registry.host}/test/junk:v1")
    failed, seen = await _finish(manager, requested.digest)
    assert failed.status == ImageStatus.FAILED
    assert ImageStatus.UNPACKING in seen
    assert failed.error is not None
    assert "layer" in failed.error
    paths = Paths(tmp_path / "data")
    assert [p.name for p in paths.tmp.iterdir()] == ["blobs"]
    assert [p.name for p in paths.image_dir(failed.digest).iterdir()] == ["metadata.json"]


async def test_in_use_images_are_neither_deleted_nor_evicted(
    tmp_path: Path, registry: LocalRegistry, standard: BuiltImage
) -> None:
    async with _manager(tmp_path / "data", registry, cache_seconds=3600) as manager:
        name = f"{registry.host}/test/standard:v1"
        image, _ = await _finish(manager, (await manager.request(name)).digest)
        layout_blobs = Paths(tmp_path / "data").oci_layout / "blobs/sha256"
        assert len(list(layout_blobs.iterdir())) == 5
        far_future = 10**10
        async with manager.use(name) as used:
            assert used.digest == image.digest
            with pytest.raises(ImageInUse):
                await manager.delete(name)
            assert await manager.evict_unused(now=far_future) == []
        assert await manager.evict_unused(now=0) == []  # used just now: still fresh
        assert await manager.evict_unused(now=far_future) == [image.digest]
        with pytest.raises(ImageNotFound):
            await manager.get(name)
        assert not Paths(tmp_path / "data").image_dir(image.digest).exists()
        assert list(layout_blobs.iterdir()) == []  # unreferenced blobs went with it

        again, _ = await _finish(manager, (await manager.request(name)).digest)
        assert again.status == ImageStatus.READY
        await manager.delete(again.digest)
        assert await manager.list() == []
        assert list(layout_blobs.iterdir()) == []
        assert (
            json.loads((layout_blobs.parent.parent / "index.json").read_text())["manifests"] == []
        )


async def test_restart_resumes_interrupted_builds_and_cleans_up(
    tmp_path: Path, registry: LocalRegistry, standard: BuiltImage
) -> None:
    root = tmp_path / "data"
    paths = Paths(root)
    name = f"{registry.host}/test/standard:v1"
    async with _manager(root, registry) as manager:
        requested = await manager.request(name)
    # Closed before the build could finish: the record says so, and no disk exists.
    record = json.loads(paths.image_metadata(requested.digest).read_text())
    assert record["image"]["status"] != "ready"
    assert not paths.image_disk(requested.digest, "erofs").exists()
    leftover = paths.tmp / "crashed.rootfs"
    leftover.mkdir()
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    in_ram = _scratch(root) / f"dataplane-images-{key}" / "crashed.rootfs"
    in_ram.mkdir(parents=True)
    someone_else = _scratch(root) / "dataplane-images-0123456789ab" / "other.rootfs"
    someone_else.mkdir(parents=True)
    (paths.image_dir(requested.digest) / ".rootfs.erofs.123.tmp").write_bytes(b"half")

    async with _manager(root, registry) as manager:
        assert not leftover.exists()
        assert not in_ram.exists()
        assert someone_else.exists()  # another data dir's scratch is not ours to remove
        assert not (paths.image_dir(requested.digest) / ".rootfs.erofs.123.tmp").exists()
        resumed, _ = await _finish(manager, requested.digest)
        assert resumed.status == ImageStatus.READY, resumed.error
        assert await manager.get(name) == resumed

    assert resumed.disk_path is not None
    resumed.disk_path.unlink()  # a ready image whose disk vanished is failed at start-up
    async with _manager(root, registry) as manager:
        broken = await manager.get(name)
        assert broken.status == ImageStatus.FAILED
        assert broken.error == "disk file missing"
        rebuilt, _ = await _finish(manager, (await manager.request(name)).digest)
        assert rebuilt.status == ImageStatus.READY


async def test_unpack_falls_back_to_disk_when_ram_scratch_fills(
    tmp_path: Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    """A layer whose gzip trailer understates its size (two gzip members) overflows a small
    tmpfs scratch; the unpack is redone under DATA_DIR and the image still gets ready."""
    big = LayerBuilder().file("zeros", bytes(70 << 20)).tar()
    tiny = gzip.compress(b"", mtime=0)  # a second, empty member: the trailer now says 0 bytes
    blob = gzip.compress(big, compresslevel=1, mtime=0) + tiny
    pusher.image("test/understated", "v1", make_image([(blob, sha256(big))]))
    ram = tmp_path / "ram"
    ram.mkdir()
    mounted = await anyio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=66m", "tmpfs", str(ram)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        async with _manager(tmp_path / "data", registry, scratch_dir=ram) as manager:
            requested = await manager.request(f"{registry.host}/test/understated:v1")
            ready, _ = await _finish(manager, requested.digest)
            assert ready.status == ImageStatus.READY, ready.error
            assert list(ram.rglob("*.rootfs")) == []
            assert ready.size is not None
            assert ready.size > 70 << 20
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["umount", str(ram)])


def _sparse_layer(tmp: Path, apparent: int) -> tuple[bytes, str]:
    """A gzip layer (a few hundred bytes) holding one GNU-sparse file of ``apparent`` bytes."""
    tree = tmp / "sparse-tree"
    tree.mkdir()
    with (tree / "hole").open("wb") as handle:
        handle.truncate(apparent)
    tar = tmp / "sparse.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(tree), "hole"],
        check=True,
    )
    raw = tar.read_bytes()
    return gzip.compress(raw, mtime=0), sha256(raw)


async def test_a_sparse_bomb_is_refused_before_a_byte_is_written(
    tmp_path: Path, registry: LocalRegistry, pusher: Pusher, standard: BuiltImage
) -> None:
    blob, diff_id = _sparse_layer(tmp_path, 2 << 30)
    assert len(blob) < 4096
    pusher.image("test/sparse", "v1", make_image([(blob, diff_id)]))
    root = tmp_path / "data"
    async with _manager(root, registry, max_unpacked_bytes=1 << 30) as manager:
        requested = await manager.request(f"{registry.host}/test/sparse:v1")
        failed, _ = await _finish(manager, requested.digest)
        assert failed.status == ImageStatus.FAILED
        assert failed.error is not None
        assert "IMAGE_MAX_UNPACKED_BYTES" in failed.error
        assert list(_scratch(root).rglob("*.rootfs")) == []
        assert [p.name for p in Paths(root).tmp.iterdir()] == ["blobs"]
        # A later good pull works.
        good = await manager.request(f"{registry.host}/test/standard:v1")
        ready, _ = await _finish(manager, good.digest)
        assert ready.status == ImageStatus.READY


def _wrapping_gzip_layer() -> tuple[bytes, str]:
    """A gzip layer holding one file of 4 GiB + 1 MiB of zeros: its ISIZE (modulo 2**32) says
    about 1 MiB. Compressed as it is made, a megabyte at a time; the blob is about 19 MB."""
    size = (4 << 30) + (1 << 20)
    info = tarfile.TarInfo("zeros")
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    tail = bytes(-size % 512) + bytes(1024)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    digest = hashlib.sha256()
    parts = []
    zeros = bytes(1 << 20)
    for chunk in (header, *(zeros for _ in range(size >> 20)), tail):
        digest.update(chunk)
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts), f"sha256:{digest.hexdigest()}"


async def test_a_gzip_bomb_whose_isize_wraps_is_measured_by_its_real_bytes(
    tmp_path: Path, registry: LocalRegistry, pusher: Pusher, standard: BuiltImage
) -> None:
    blob, diff_id = _wrapping_gzip_layer()
    layer_file = tmp_path / "layer.gz"
    layer_file.write_bytes(blob)
    assert unpacked_estimate([(layer_file, "gzip")]) < 64 << 20, "ISIZE wrapped: far below 4 GiB"
    pusher.image("test/wrap", "v1", make_image([(blob, diff_id)]))
    root = tmp_path / "data"
    async with _manager(root, registry, max_unpacked_bytes=256 << 20) as manager:
        requested = await manager.request(f"{registry.host}/test/wrap:v1")
        failed, _ = await _finish(manager, requested.digest)
        assert failed.status == ImageStatus.FAILED
        assert failed.error is not None
        assert "IMAGE_MAX_UNPACKED_BYTES" in failed.error
        assert list(_scratch(root).rglob("zeros")) == []
        assert [p.name for p in Paths(root).tmp.iterdir()] == ["blobs"]
        good = await manager.request(f"{registry.host}/test/standard:v1")
        ready, _ = await _finish(manager, good.digest)
        assert ready.status == ImageStatus.READY


def test_a_cancel_stops_in_the_middle_of_a_big_entry(tmp_path: Path) -> None:
    layer = tmp_path / "big.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("big")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    unpacker = Unpacker(tmp_path / "tree")
    consumed = 0

    def on_bytes(count: int) -> None:
        nonlocal consumed
        consumed += count
        if consumed > 4 << 20:
            unpacker.stop.set()  # a delete arrives while the entry is being copied

    with pytest.raises(Stopped):
        unpacker.apply(layer, "none", on_bytes)
    assert (tmp_path / "tree" / "big").stat().st_size < 64 << 20


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_authentication_with_docker_config_credentials(
    tmp_path: Path, registry: LocalRegistry, standard: BuiltImage, scheme: str
) -> None:
    with token_auth_proxy(registry, "alice", "s3cret", scheme=scheme) as proxy:
        name = f"{proxy.host}/test/standard:v1"
        base = {"insecure_registries": frozenset({proxy.host})}

        # No credentials: the registry refuses and says so (the edge answers 404 like Docker).
        async with _manager(tmp_path / "anon", registry, **base) as manager:
            with pytest.raises(RegistryAuthFailed):
                await manager.request(name)

        wrong = tmp_path / "wrong.json"
        wrong.write_text(
            json.dumps({"auths": {proxy.host: {"username": "alice", "password": "x"}}})
        )
        async with _manager(tmp_path / "wrong", registry, docker_config=wrong, **base) as manager:
            with pytest.raises(RegistryAuthFailed):
                await manager.request(name)

        token = base64.b64encode(b"alice:s3cret").decode()
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {proxy.host: {"auth": token}}}))
        async with _manager(tmp_path / "data", registry, docker_config=config, **base) as manager:
            requested = await manager.request(name)
            assert requested.digest == standard.manifest_digest
            ready, _ = await _finish(manager, requested.digest)
            assert ready.status == ImageStatus.READY, ready.error


async def test_delete_cancels_a_build_and_subscribers_see_it(
    tmp_path: Path, registry: LocalRegistry, standard: BuiltImage
) -> None:
    root = tmp_path / "data"
    async with _manager(root, registry) as manager:
        requested = await manager.request(f"{registry.host}/test/standard:v1")
        updates = manager.subscribe(requested.digest)
        assert (await anext(updates)).status == ImageStatus.PENDING
        await manager.delete(requested.digest)
        with anyio.fail_after(30):
            last = [image async for image in updates][-1]
        assert last.status == ImageStatus.FAILED
        assert last.error == "deleted"
        assert await manager.list() == []
        assert not Paths(root).image_dir(requested.digest).exists()
        assert list(_scratch(root).rglob("*.rootfs")) == []
        assert list((Paths(root).oci_layout / "blobs/sha256").iterdir()) == []


async def test_sweeper_evicts_unused_images(
    tmp_path: Path, registry: LocalRegistry, standard: BuiltImage
) -> None:
    async with _manager(tmp_path / "data", registry, cache_seconds=1) as manager:
        name = f"{registry.host}/test/standard:v1"
        ready, _ = await _finish(manager, (await manager.request(name)).digest)
        assert ready.status == ImageStatus.READY
        for _ in range(300):  # the sweeper runs every 0.5 s here; give it up to 30 s
            if not await manager.list():
                break
            await anyio.sleep(0.1)
        with pytest.raises(ImageNotFound):
            await manager.get(name)


class _Observer:
    def __init__(self) -> None:
        self.finished: list[tuple[float, int, float]] = []
        self.failed: list[str] = []

    def build_finished(self, pull_seconds: float, pulled_bytes: int, total_seconds: float) -> None:
        self.finished.append((pull_seconds, pulled_bytes, total_seconds))

    def build_failed(self, reason: str) -> None:
        self.failed.append(reason)


async def test_the_observer_hears_how_each_build_ended(
    registry: LocalRegistry, pusher: Pusher, standard: BuiltImage, tmp_path: Path
) -> None:
    junk = b"\x1f\x8b" + os.urandom(4000)
    pusher.image("test/observed-junk", "v1", make_image([(junk, sha256(junk))]))
    observer = _Observer()
    async with _manager(tmp_path / "data", registry, observer=observer) as manager:
        good = await manager.request(f"{registry.host}/test/standard:v1")
        assert (await _finish(manager, good.digest))[0].status == ImageStatus.READY
        bad = await manager.request(f"{registry.host}/test/observed-junk:v1")
        assert (await _finish(manager, bad.digest))[0].status == ImageStatus.FAILED
    [(pull_seconds, pulled, total_seconds)] = observer.finished
    # The pull is a phase of the build: an order of the two durations, not a speed.
    assert 0 < pull_seconds <= total_seconds
    assert pulled == sum(len(blob) for blob in standard.layers)
    # A code of the errors' fixed set, never the free-text reason.
    assert observer.failed == ["image_build_failed"]
