"""Build OCI/Docker test images in Python and push them to a registry with plain HTTP.

Layers are tarballs made with :mod:`tarfile`, so tests control every header: whiteouts, opaque
directories, symlinks, hardlinks, modes and owners. Images can be pushed as OCI or Docker schema 2,
and grouped under an OCI index or a Docker manifest list; or written as an OCI image archive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class LayerBuilder:
    """Collects tar entries in order; ``build()`` returns (gzipped blob, diff_id)."""

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    mtime: int = 1_700_000_000

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = self.mtime
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> LayerBuilder:
        self.entries.append((self._info(name, tarfile.DIRTYPE, mode, uid, gid), None))
        return self

    def file(
        self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> LayerBuilder:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self.entries.append((info, data))
        return self

    def device(
        self, name: str, major: int, minor: int, *, char: bool = True, mode: int = 0o666
    ) -> LayerBuilder:
        info = self._info(name, tarfile.CHRTYPE if char else tarfile.BLKTYPE, mode, 0, 0)
        info.devmajor, info.devminor = major, minor
        self.entries.append((info, None))
        return self

    def symlink(self, name: str, target: str, uid: int = 0, gid: int = 0) -> LayerBuilder:
        info = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid)
        info.linkname = target
        self.entries.append((info, None))
        return self

    def hardlink(self, name: str, target: str) -> LayerBuilder:
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0)
        info.linkname = target
        self.entries.append((info, None))
        return self

    def whiteout(self, path: str) -> LayerBuilder:
        parent, _, base = path.rpartition("/")
        name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
        return self.file(name, b"")

    def opaque(self, directory: str) -> LayerBuilder:
        return self.file(f"{directory}/.wh..wh..opq", b"")

    def tar(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in self.entries:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        return buffer.getvalue()

    def build(self, level: int = 6) -> tuple[bytes, str]:
        raw = self.tar()
        return gzip.compress(raw, compresslevel=level, mtime=0), sha256(raw)


@dataclass(frozen=True)
class BuiltImage:
    """Everything a test needs to know about one platform image it pushed or wrote."""

    manifest: bytes
    manifest_digest: str
    media_type: str
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return len(self.manifest)


def make_image(
    layers: list[tuple[bytes, str]],
    *,
    docker: bool = False,
    config: dict[str, Any] | None = None,
    arch: str = "amd64",
) -> BuiltImage:
    cfg = {
        "architecture": arch,
        "os": "linux",
        "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _blob, diff_id in layers]},
    }
    config_bytes = json.dumps(cfg).encode()
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": layer_type, "digest": sha256(blob), "size": len(blob)}
            for blob, _diff in layers
        ],
    }
    data = json.dumps(manifest).encode()
    return BuiltImage(
        manifest=data,
        manifest_digest=sha256(data),
        media_type=DOCKER_MANIFEST if docker else OCI_MANIFEST,
        config=config_bytes,
        layers=tuple(blob for blob, _diff in layers),
    )


def make_index(images: list[tuple[BuiltImage, str, str]], *, docker: bool = False) -> bytes:
    """An OCI index or Docker manifest list of (image, os, architecture)."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.manifest_digest,
                "size": image.size,
                "platform": {"os": os_name, "architecture": arch},
            }
            for image, os_name, arch in images
        ],
    }
    return json.dumps(document).encode()


class Pusher:
    """Pushes blobs and manifests to a plain-HTTP registry with the distribution API."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.client = httpx.Client(base_url=f"http://{host}", timeout=60)

    def close(self) -> None:
        self.client.close()

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        start = self.client.post(f"/v2/{repo}/blobs/uploads/")
        start.raise_for_status()
        location = start.headers["Location"]
        separator = "&" if "?" in location else "?"
        done = self.client.put(
            f"{location}{separator}digest={digest}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        done.raise_for_status()
        return digest

    def manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        response = self.client.put(
            f"/v2/{repo}/manifests/{ref}", content=data, headers={"Content-Type": media_type}
        )
        response.raise_for_status()
        return sha256(data)

    def image(self, repo: str, ref: str, image: BuiltImage) -> str:
        for layer in image.layers:
            self.blob(repo, layer)
        self.blob(repo, image.config)
        return self.manifest(repo, ref, image.manifest, image.media_type)

    def index(
        self, repo: str, ref: str, images: list[tuple[BuiltImage, str, str]], *, docker: bool
    ) -> str:
        for image, _os, _arch in images:
            self.image(repo, image.manifest_digest, image)
        data = make_index(images, docker=docker)
        return self.manifest(repo, ref, data, DOCKER_LIST if docker else OCI_INDEX)


def write_oci_archive(
    path: Path,
    image: BuiltImage,
    *,
    name: str | None = None,
    extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None,
) -> None:
    """An OCI image layout as a tar: oci-layout, index.json, blobs/sha256/*; plus ``extra``."""
    annotations = {"io.containerd.image.name": name} if name else {}
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.manifest_digest,
                "size": image.size,
                "annotations": annotations,
            }
        ],
    }
    members: list[tuple[str, bytes]] = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index).encode()),
    ]
    for blob in (image.manifest, image.config, *image.layers):
        members.append((f"blobs/sha256/{sha256(blob).partition(':')[2]}", blob))
    with tarfile.open(path, "w") as archive:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for extra_info, extra_data in extra or []:
            archive.addfile(extra_info, io.BytesIO(extra_data) if extra_data is not None else None)


# -- the standard test image and how to compare trees --------------------------------------------
TreeEntry = tuple[str, int, int, int, bytes | str | None]  # kind, mode, uid, gid, content/target


def standard_layers() -> list[LayerBuilder]:
    """Three layers exercising whiteouts, an opaque dir, links, modes, owners and replacements."""
    base = (
        LayerBuilder()
        .dir("etc")
        .file("etc/hostname", b"base\n")
        .file("etc/shadow", b"secret", mode=0o640, gid=42)
        .dir("data")
        .file("data/keep.txt", b"keep")
        .file("data/old.txt", b"old")
        .dir("data/sub")
        .file("data/sub/deep.txt", b"deep")
        .dir("opq")
        .file("opq/lower.txt", b"lower")
        .dir("opq/lowerdir")
        .file("opq/lowerdir/x", b"x")
        .dir("opq/kept")
        .file("opq/kept/lower-in-kept", b"l")
        .dir("bin")
        .file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
        .file("bin/suid", b"s", mode=0o4755)
        .dir("home")
        .dir("home/user", mode=0o750, uid=1000, gid=1000)
        .file("home/user/notes", b"n", mode=0o600, uid=1000, gid=1000)
        .symlink("link_abs", "/etc/hostname")
        .symlink("link_rel", "etc/hostname")
        .dir("usr")
        .dir("usr/lib")
        .file("usr/lib/libx.so", b"x")
        .symlink("lib", "usr/lib")
        .file("hard1", b"hardlinked", uid=7, gid=8)
        .hardlink("hard2", "hard1")
        .dir("ro", mode=0o555)
        .file("ro/inside", b"ro")
        .file("replaced_by_dir", b"f")
        .dir("dir_replaced_by_file")
        .file("dir_replaced_by_file/child", b"c")
    )
    upper = (
        LayerBuilder()
        .whiteout("data/old.txt")
        .whiteout("data/sub")
        .dir("opq", mode=0o700)
        .file("opq/upper.txt", b"upper")
        .dir("opq/kept")
        .file("opq/kept/new", b"new")
        .opaque("opq")  # after this layer's own entries: they must survive it
        .file("lib/liby.so", b"y")  # through the lib -> usr/lib symlink
        .file("etc/hostname", b"upper\n", mode=0o600)
        .dir("replaced_by_dir")
        .file("replaced_by_dir/x", b"x")
        .file("dir_replaced_by_file", b"now a file")
        .file("ro/added", b"added")
    )
    top = (
        LayerBuilder()
        .symlink("data/keep.txt", "../etc/hostname")
        .file("newdir/deep/file", b"parents made implicitly")
    )
    return [base, upper, top]


STANDARD_TREE: dict[str, TreeEntry] = {
    "etc": ("dir", 0o755, 0, 0, None),
    "etc/hostname": ("file", 0o600, 0, 0, b"upper\n"),
    "etc/shadow": ("file", 0o640, 0, 42, b"secret"),
    "data": ("dir", 0o755, 0, 0, None),
    "data/keep.txt": ("symlink", 0, 0, 0, "../etc/hostname"),
    "opq": ("dir", 0o700, 0, 0, None),
    "opq/upper.txt": ("file", 0o644, 0, 0, b"upper"),
    "opq/kept": ("dir", 0o755, 0, 0, None),
    "opq/kept/new": ("file", 0o644, 0, 0, b"new"),
    "bin": ("dir", 0o755, 0, 0, None),
    "bin/tool": ("file", 0o755, 0, 0, b"#!/bin/sh\necho tool\n"),
    "bin/suid": ("file", 0o4755, 0, 0, b"s"),
    "home": ("dir", 0o755, 0, 0, None),
    "home/user": ("dir", 0o750, 1000, 1000, None),
    "home/user/notes": ("file", 0o600, 1000, 1000, b"n"),
    "link_abs": ("symlink", 0, 0, 0, "/etc/hostname"),
    "link_rel": ("symlink", 0, 0, 0, "etc/hostname"),
    "usr": ("dir", 0o755, 0, 0, None),
    "usr/lib": ("dir", 0o755, 0, 0, None),
    "usr/lib/libx.so": ("file", 0o644, 0, 0, b"x"),
    "usr/lib/liby.so": ("file", 0o644, 0, 0, b"y"),
    "lib": ("symlink", 0, 0, 0, "usr/lib"),
    "hard1": ("file", 0o644, 7, 8, b"hardlinked"),
    "hard2": ("file", 0o644, 7, 8, b"hardlinked"),
    "ro": ("dir", 0o555, 0, 0, None),
    "ro/inside": ("file", 0o644, 0, 0, b"ro"),
    "ro/added": ("file", 0o644, 0, 0, b"added"),
    "replaced_by_dir": ("dir", 0o755, 0, 0, None),
    "replaced_by_dir/x": ("file", 0o644, 0, 0, b"x"),
    "dir_replaced_by_file": ("file", 0o644, 0, 0, b"now a file"),
    "newdir": ("dir", 0o755, 0, 0, None),
    "newdir/deep": ("dir", 0o755, 0, 0, None),
    "newdir/deep/file": ("file", 0o644, 0, 0, b"parents made implicitly"),
}


def read_tree(root: Path) -> dict[str, TreeEntry]:
    """What a directory tree holds, in :data:`STANDARD_TREE`'s shape (symlink modes are 0)."""
    tree: dict[str, TreeEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ("symlink", 0, st.st_uid, st.st_gid, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
            else:
                data = path.read_bytes()
                tree[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, data)
    return tree
