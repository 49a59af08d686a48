"""The images subsystem's exceptions: one tree rooted in :class:`ImageError`.

The HTTP edge maps them once: ``InvalidReference``/``InvalidArchive``/``UnsupportedImage``/
``FormatConflict`` -> 400/409, ``ImageNotFound`` -> 404, ``RegistryUnreachable`` -> 502,
``ImageInUse`` -> 409. ``DigestMismatch`` and ``BuildFailed`` normally surface as the ``error``
of a failed image rather than as a raised exception.
"""

from __future__ import annotations


class ImageError(Exception):
    """Base of every error raised by the images subsystem; ``str()`` is a user-facing reason."""


class InvalidReference(ImageError):
    """The image name is not a valid OCI/Docker reference."""

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {reason}")
        self.reference = reference


class ImageNotFound(ImageError):
    """No such image: unknown locally, or the registry has no such repository, tag or digest."""


class RegistryAuthFailed(ImageNotFound):
    """The registry refused our credentials (registries answer this for unknown repos too)."""


class NoMatchingPlatform(ImageNotFound):
    """The image index lists no manifest for the host platform."""


class RegistryUnreachable(ImageError):
    """The registry could not be reached or answered with a server error."""


class RegistryError(ImageError):
    """The registry answered something we cannot use (unexpected status, malformed document)."""


class UnsupportedImage(ImageError):
    """The image uses a manifest schema or layer media type this node cannot unpack."""


class InvalidArchive(ImageError):
    """An uploaded OCI image archive is malformed or unsafe (path traversal, links out of tree)."""


class DigestMismatch(ImageError):
    """Content did not hash to the digest that names it."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"digest mismatch for {what}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class ImageInUse(ImageError):
    """The image is referenced by an instance and cannot be deleted."""


class FormatConflict(ImageError):
    """The image digest already exists with another disk format."""


class BuildFailed(ImageError):
    """Unpacking or building the disk failed (umoci/mkfs error, disk full, bad layer)."""


class InvalidFormat(ImageError):
    """The requested disk format is not one of erofs, ext4."""


class ImageNotReady(ImageError):
    """The image exists but is not ready, so it cannot be used yet."""
