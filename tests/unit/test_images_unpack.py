"""The layer unpacker against layers built in Python: whiteouts, opaque dirs, links, owners."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from managers.images.errors import BuildFailed
from managers.images.registry import Stopped
from managers.images.unpack import Unpacker
from tests.support.oci_builder import STANDARD_TREE, LayerBuilder, read_tree, standard_layers

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be set as root")


def _apply(root: Path, layers: list[LayerBuilder], tmp: Path) -> Unpacker:
    unpacker = Unpacker(root)
    for i, layer in enumerate(layers):
        blob = tmp / f"layer{i}.tar.gz"
        blob.write_bytes(layer.build()[0])
        unpacker.apply(blob, "gzip", lambda _n: None)
    unpacker.finish()
    return unpacker


@needs_root
def test_standard_layers_stack_like_overlayfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    _apply(root, standard_layers(), tmp_path)
    assert read_tree(root) == STANDARD_TREE
    assert (root / "hard1").stat().st_ino == (root / "hard2").stat().st_ino


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd tool is not installed")
def test_plain_and_zstd_layers(tmp_path: Path) -> None:
    layer = LayerBuilder().dir("a").file("a/b", b"plain")
    plain = tmp_path / "plain.tar"
    plain.write_bytes(layer.tar())
    Unpacker(tmp_path / "p").apply(plain, "none", lambda _n: None)
    assert (tmp_path / "p/a/b").read_bytes() == b"plain"
    zst = tmp_path / "layer.tar.zst"
    zst.write_bytes(
        subprocess.run(
            ["zstd", "-q", "-c"], input=layer.tar(), capture_output=True, check=True
        ).stdout
    )
    seen: list[int] = []
    Unpacker(tmp_path / "z").apply(zst, "zstd", seen.append)
    assert (tmp_path / "z/a/b").read_bytes() == b"plain"
    assert sum(seen) == zst.stat().st_size


def test_symlinks_never_lead_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    first = LayerBuilder().symlink("abs", str(outside)).symlink("rel", "../../../../outside")
    second = LayerBuilder().file("abs/pwned", b"a").file("rel/pwned", b"r")
    _apply(root, [first, second], tmp_path)
    assert list(outside.iterdir()) == []
    # Both links were resolved inside the image: an absolute target means the image's root.
    assert (root / str(outside).lstrip("/") / "pwned").read_bytes() == b"a"
    assert (root / "outside/pwned").read_bytes() == b"r"


def test_dotdot_entries_are_refused(tmp_path: Path) -> None:
    blob = tmp_path / "evil.tar.gz"
    blob.write_bytes(LayerBuilder().file("../escape", b"x").build()[0])
    with pytest.raises(BuildFailed, match="escapes"):
        Unpacker(tmp_path / "rootfs").apply(blob, "gzip", lambda _n: None)
    assert not (tmp_path / "escape").exists()


def test_hardlink_to_missing_target_fails(tmp_path: Path) -> None:
    blob = tmp_path / "bad.tar.gz"
    blob.write_bytes(LayerBuilder().hardlink("h", "nowhere").build()[0])
    with pytest.raises(BuildFailed, match="missing"):
        Unpacker(tmp_path / "rootfs").apply(blob, "gzip", lambda _n: None)


def test_corrupt_layer_is_a_build_failure(tmp_path: Path) -> None:
    blob = tmp_path / "junk.tar.gz"
    blob.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    with pytest.raises(BuildFailed, match=r"layer junk\.tar\.gz"):
        Unpacker(tmp_path / "rootfs").apply(blob, "gzip", lambda _n: None)


def test_stop_flag_ends_unpack(tmp_path: Path) -> None:
    blob = tmp_path / "l.tar.gz"
    blob.write_bytes(LayerBuilder().file("a", b"1").file("b", b"2").build()[0])
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        Unpacker(tmp_path / "rootfs", stop).apply(blob, "gzip", lambda _n: None)
