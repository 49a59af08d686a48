"""Manifests, indexes and configs: platform choice, Docker -> OCI rewriting, config parsing."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from typing import Any

from .errors import NoMatchingPlatform, RegistryError, UnsupportedImage
from .types import ImageConfig

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

# Docker's types are byte-compatible with OCI's; only the names differ, and umoci rejects them.
_TO_OCI = {
    DOCKER_LIST: OCI_INDEX,
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_FOREIGN_GZIP: OCI_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": OCI_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": OCI_LAYER,
}
_LAYER_COMPRESSION = {OCI_LAYER: "none", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd"}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    return "linux", arch.get(machine, machine)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Layer:
    descriptor: Descriptor
    compression: str  # none | gzip | zstd


@dataclass(frozen=True, slots=True)
class ImageManifest:
    """A platform manifest rewritten to OCI: the bytes umoci can read and what they describe."""

    oci_bytes: bytes
    oci_digest: str
    config: Descriptor
    layers: tuple[Layer, ...]


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return value


def media_type_of(document: dict[str, Any], content_type: str | None) -> str:
    """The document's media type: its own field, else the HTTP header, else its shape."""
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    header = (content_type or "").split(";")[0].strip()
    if header in INDEX_TYPES or header in MANIFEST_TYPES:
        return header
    if document.get("schemaVersion") == 1:
        return "application/vnd.docker.distribution.manifest.v1+json"
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document:
        return OCI_MANIFEST
    return header or "unknown"


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise RegistryError(f"{what} is not a descriptor")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise UnsupportedImage(f"{what} has an unsupported digest {digest!r}")
    if not isinstance(size, int) or size < 0:
        raise RegistryError(f"{what} has no valid size")
    return Descriptor(media_type=str(media_type), digest=digest, size=size)


def select_platform(index: dict[str, Any]) -> Descriptor:
    """The manifest for the host platform (linux/amd64 here) from an index or manifest list."""
    want_os, want_arch = host_platform()
    available: list[str] = []
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise RegistryError("image index has no manifests list")
    for i, entry in enumerate(manifests):
        desc = _descriptor(entry, f"index entry {i}")
        plat = entry.get("platform") or {}
        os_name, arch = plat.get("os", ""), plat.get("architecture", "")
        available.append(f"{os_name}/{arch}" + (f"/{plat['variant']}" if "variant" in plat else ""))
        if os_name == want_os and arch == want_arch:
            if desc.media_type and desc.media_type not in MANIFEST_TYPES:
                continue
            return desc
    raise NoMatchingPlatform(
        f"no manifest for {want_os}/{want_arch} in the image index "
        f"(available: {', '.join(available) or 'none'})"
    )


def to_oci_manifest(raw: bytes, media_type: str) -> ImageManifest:
    """Rewrite a Docker schema-2 or OCI manifest to a canonical OCI manifest umoci accepts."""
    if media_type not in MANIFEST_TYPES:
        raise UnsupportedImage(f"unsupported manifest media type {media_type!r}")
    document = load_json(raw, "manifest")
    config = _descriptor(document.get("config"), "manifest config")
    raw_layers = document.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError("manifest has no layers list")
    layers: list[Layer] = []
    rewritten_layers: list[dict[str, Any]] = []
    for i, entry in enumerate(raw_layers):
        desc = _descriptor(entry, f"layer {i}")
        oci_type = _TO_OCI.get(desc.media_type, desc.media_type or OCI_LAYER_GZIP)
        if oci_type not in _LAYER_COMPRESSION:
            raise UnsupportedImage(f"layer {i} has unsupported media type {desc.media_type!r}")
        layers.append(
            Layer(Descriptor(oci_type, desc.digest, desc.size), _LAYER_COMPRESSION[oci_type])
        )
        rewritten = {k: v for k, v in entry.items() if k != "urls"}
        rewritten["mediaType"] = oci_type
        rewritten_layers.append(rewritten)
    config_type = _TO_OCI.get(config.media_type, config.media_type or OCI_CONFIG)
    needs_rewrite = (
        document.get("mediaType") != OCI_MANIFEST
        or config_type != config.media_type
        or any(
            a.get("mediaType") != b.get("mediaType")
            for a, b in zip(raw_layers, rewritten_layers, strict=True)
        )
        or any("urls" in entry for entry in raw_layers)
    )
    if not needs_rewrite:
        return ImageManifest(raw, sha256_digest(raw), config, tuple(layers))
    out = dict(document)
    out["schemaVersion"] = 2
    out["mediaType"] = OCI_MANIFEST
    out["config"] = {**document["config"], "mediaType": config_type}
    out["layers"] = rewritten_layers
    data = json.dumps(out, separators=(",", ":"), sort_keys=True).encode()
    oci_config = Descriptor(config_type, config.digest, config.size)
    return ImageManifest(data, sha256_digest(data), oci_config, tuple(layers))


def parse_config(raw: bytes) -> ImageConfig:
    document = load_json(raw, "image config")
    cfg = document.get("config") or {}
    if not isinstance(cfg, dict):
        cfg = {}
    ports = cfg.get("ExposedPorts") or {}
    return ImageConfig(
        entrypoint=tuple(str(x) for x in (cfg.get("Entrypoint") or ())),
        cmd=tuple(str(x) for x in (cfg.get("Cmd") or ())),
        env=tuple(str(x) for x in (cfg.get("Env") or ())),
        workdir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
        exposed_ports=tuple(sorted(str(p) for p in ports)) if isinstance(ports, dict) else (),
    )
