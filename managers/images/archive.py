"""Import an OCI image archive (a tar of an OCI image layout), safely.

Nothing from the archive reaches the shared layout until the whole archive was read and found
sound: blobs are staged in a private directory, each checked against the digest that names it.
Absolute names, ``..`` components and links pointing out of the tree make the archive invalid.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageError, InvalidArchive
from .layout import REF_ANNOTATION, OciLayout
from .manifest import INDEX_TYPES, MANIFEST_TYPES, media_type_of, select_platform
from .reference import parse_reference

_CHUNK = 1 << 20
_MAX_SMALL = 16 << 20
_NAME_ANNOTATION = "io.containerd.image.name"


@dataclass(frozen=True, slots=True)
class ImportedImage:
    digest: str  # what index.json names: the image's identity
    platform_manifest: str
    name: str | None


def _clean_name(name: str) -> str:
    if name.startswith("/"):
        raise InvalidArchive(f"archive member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArchive(f"archive member {name!r} climbs out of the tree")
    return "/".join(parts)


def _link_target(member: tarfile.TarInfo, rel: str) -> str:
    """Where a link points, relative to the archive root; refuse anything outside it."""
    if member.linkname.startswith("/"):
        raise InvalidArchive(f"link {member.name!r} points out of the tree ({member.linkname!r})")
    base = posixpath.dirname(rel) if member.issym() else ""
    joined = posixpath.normpath(posixpath.join(base, member.linkname))
    if joined == ".." or joined.startswith("../"):
        raise InvalidArchive(f"link {member.name!r} points out of the tree ({member.linkname!r})")
    return joined


def ingest_archive(archive: Path, layout: OciLayout, staging: Path) -> ImportedImage:
    """Validate ``archive`` and move its blobs into ``layout``; runs in a worker thread."""
    staging.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    links: dict[str, str] = {}
    # What may be staged: what the archive holds. A blob is stored whole in an OCI archive, so
    # a member that would write more (a sparse entry, a compressed archive's bomb) is refused
    # before it is written. A compressed archive of an OCI layout shrinks little (its layers
    # are compressed already), so eight times its size is room enough.
    allowance = _staging_allowance(archive)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                rel = _clean_name(member.name)
                if member.issym() or member.islnk():
                    links[rel] = _link_target(member, rel)
                    continue
                if member.isdir():
                    continue
                if not member.isreg():
                    raise InvalidArchive(f"archive member {member.name!r} is not a regular file")
                if member.issparse():
                    raise InvalidArchive(
                        f"archive member {member.name!r} is sparse; an OCI archive stores "
                        "its blobs whole"
                    )
                allowance -= member.size
                if allowance < 0:
                    raise InvalidArchive(
                        f"archive member {member.name!r} would stage more bytes than the "
                        "whole archive holds"
                    )
                source = tar.extractfile(member)
                assert source is not None
                staged = staging / hashlib.sha256(rel.encode()).hexdigest()
                with source, staged.open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                files[rel] = staged
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidArchive(f"not a readable tar archive: {exc}") from exc

    def resolve(rel: str, hops: int = 0) -> Path | None:
        if rel in files:
            return files[rel]
        if rel in links and hops < 40:
            return resolve(links[rel], hops + 1)
        return None

    def read_small(rel: str) -> bytes:
        path = resolve(rel)
        if path is None:
            raise InvalidArchive(f"archive has no {rel}")
        if path.stat().st_size > _MAX_SMALL:
            raise InvalidArchive(f"{rel} is too large")
        return path.read_bytes()

    def blob(digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        path = resolve(f"blobs/{algorithm}/{hexpart}")
        if path is None:
            raise InvalidArchive(f"archive lacks blob {digest}")
        return path

    def load(digest: str) -> dict[str, Any]:
        try:
            value = json.loads(_verified(blob(digest), digest, read=True))
        except ValueError as exc:
            raise InvalidArchive(f"blob {digest} is not JSON") from exc
        if not isinstance(value, dict):
            raise InvalidArchive(f"blob {digest} is not a JSON object")
        return value

    try:
        index = json.loads(read_small("index.json"))
    except ValueError as exc:
        raise InvalidArchive("index.json is not valid JSON") from exc
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise InvalidArchive("index.json lists no image")
    try:
        top = entries[0]
        digest = str(top.get("digest", ""))
        annotations = top.get("annotations") or {}
        document = load(digest)
        kind = media_type_of(document, str(top.get("mediaType", "")))
        needed = [digest]
        platform_digest = digest
        if kind in INDEX_TYPES:
            platform_digest = select_platform(document).digest
            document = load(platform_digest)
            kind = media_type_of(document, None)
            needed.append(platform_digest)
        if kind not in MANIFEST_TYPES:
            raise InvalidArchive(f"index.json names an unsupported document ({kind})")
        config = (document.get("config") or {}).get("digest")
        layers = [layer.get("digest") for layer in document.get("layers") or []]
        for item in [config, *layers]:
            if not isinstance(item, str):
                raise InvalidArchive("manifest has a descriptor without a digest")
            _verified(blob(item), item, read=False)
            needed.append(item)
    except InvalidArchive:
        raise
    except ImageError as exc:
        raise InvalidArchive(str(exc)) from exc
    except ValueError as exc:
        raise InvalidArchive(f"bad digest in archive: {exc}") from exc
    for item in dict.fromkeys(needed):
        target = layout.blob_path(item)
        if not target.exists():
            os.replace(blob(item), target)
    raw_name = annotations.get(_NAME_ANNOTATION) or annotations.get(REF_ANNOTATION)
    return ImportedImage(digest, platform_digest, _image_name(raw_name))


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _staging_allowance(archive: Path) -> int:
    size = archive.stat().st_size
    with archive.open("rb") as handle:
        head = handle.read(6)
    if head.startswith(_COMPRESSED_MAGIC):
        return 8 * size + (64 << 20)
    return size


def _verified(path: Path, digest: str, *, read: bool) -> bytes:
    algorithm, _, expected = digest.partition(":")
    if algorithm != "sha256" or len(expected) != 64:
        raise InvalidArchive(f"unsupported digest {digest!r}")
    hasher = hashlib.sha256()
    chunks: list[bytes] = []
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
            if read:
                chunks.append(chunk)
    if hasher.hexdigest() != expected:
        raise InvalidArchive(
            f"blob {digest} does not match its digest (got sha256:{hasher.hexdigest()})"
        )
    return b"".join(chunks)


def _image_name(raw: object) -> str | None:
    """A full reference from the annotations; a bare tag like ``latest`` names nothing."""
    if not isinstance(raw, str) or ("/" not in raw and ":" not in raw):
        return None
    try:
        return parse_reference(raw).name
    except ImageError:
        return None
