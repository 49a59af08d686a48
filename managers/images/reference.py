"""Image reference parsing and normalisation (the Docker ``distribution/reference`` rules).

``alpine`` -> ``docker.io/library/alpine:latest``; ``host:5000/a/b@sha256:…`` keeps its port and
digest; a reference with both tag and digest is pinned by the digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReference

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST_LABEL = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
_DOMAIN = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?")
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The normalised reference, as stored and shown."""
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        """The host serving the registry API (Docker Hub's API lives on another name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        return self.name


def is_digest(text: str) -> bool:
    return _DIGEST.fullmatch(text) is not None


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise :class:`InvalidReference` with the reason."""
    if not isinstance(text, str) or not text:
        raise InvalidReference(str(text), "empty")
    if text != text.strip() or any(ch.isspace() for ch in text):
        raise InvalidReference(text, "contains whitespace")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidReference(text, "digest must be sha256: followed by 64 hex digits")
    tag = None
    last_slash = remainder.rfind("/")
    last_colon = remainder.rfind(":")
    if last_colon > last_slash:
        remainder, tag = remainder[:last_colon], remainder[last_colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(text, f"invalid tag {tag!r}")
    parts = remainder.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, parts[1:]
        if not _DOMAIN.fullmatch(registry):
            raise InvalidReference(text, f"invalid registry host {registry!r}")
        if registry.lower() in _DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, parts
    if not path or any(not _COMPONENT.fullmatch(part) for part in path):
        raise InvalidReference(
            text, "repository path components must be lowercase letters, digits and separators"
        )
    # The name as written (registry included) is what the distribution spec bounds, not the
    # name after Docker Hub's implicit "library/" is added.
    if len(remainder) > _MAX_NAME:
        raise InvalidReference(text, "repository name longer than 255 characters")
    if registry == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    repository = "/".join(path)
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)
