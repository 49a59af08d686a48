"""The images subsystem's exceptions: one tree rooted in :class:`ImageError`.

Each class's ``code`` (a :class:`~managers.errors.DomainError` attribute) is the error code the
API returns; a class without one of its own answers with its parent's::

    ImageError                 image_error
    ├── InvalidReference       invalid_reference     the name does not parse
    ├── ImageNotFound          image_not_found       unknown here, or in the registry
    │   ├── RegistryAuthFailed                       the registry refused our credentials
    │   └── NoMatchingPlatform                       no manifest for the host platform
    ├── RegistryUnreachable    registry_unreachable  no answer, or a server error
    ├── RegistryError          registry_error        an answer we cannot use
    ├── UnsupportedImage       unsupported_image     a schema or media type we cannot unpack
    ├── InvalidArchive         invalid_archive       an uploaded archive is malformed or unsafe
    ├── DigestMismatch                               content does not hash to its digest
    ├── ImageInUse             image_in_use          held by an instance or named by a record
    ├── FormatConflict         format_conflict       the digest exists in the other disk format
    ├── BuildFailed                                  unpacking or building the disk failed
    │   ├── ImageTooLarge      image_too_large       unpacks past IMAGE_MAX_UNPACKED_BYTES
    │   └── StorageFull        insufficient_storage  the disk (or RAM scratch) ran out
    ├── InvalidFormat          invalid_format        not one of erofs, ext4
    └── ImageNotReady          image_not_ready       still building, or failed

The HTTP status of each is the edge's business (``DOMAIN_ERRORS`` in ``dataplane/errors.py``).
``DigestMismatch`` and ``BuildFailed`` normally surface as the ``error`` of a failed image rather
than as a raised exception.
"""

from __future__ import annotations

from managers.errors import DomainError


class ImageError(DomainError):
    """Base of every error raised by the images subsystem; ``message`` is a user-facing reason."""

    code = "image_error"


class InvalidReference(ImageError):
    """The image name is not a valid OCI/Docker reference."""

    code = "invalid_reference"

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(
            f"invalid image reference {reference!r}: {reason}",
            {"reference": reference, "reason": reason},
        )
        self.reference = reference


class ImageNotFound(ImageError):
    """No such image: unknown locally, or the registry has no such repository, tag or digest."""

    code = "image_not_found"


class RegistryAuthFailed(ImageNotFound):
    """The registry refused our credentials (registries answer this for unknown repos too)."""


class NoMatchingPlatform(ImageNotFound):
    """The image index lists no manifest for the host platform."""


class RegistryUnreachable(ImageError):
    """The registry could not be reached or answered with a server error."""

    code = "registry_unreachable"


class RegistryError(ImageError):
    """The registry answered something we cannot use (unexpected status, malformed document)."""

    code = "registry_error"


class UnsupportedImage(ImageError):
    """The image uses a manifest schema or layer media type this node cannot unpack."""

    code = "unsupported_image"


class InvalidArchive(ImageError):
    """An uploaded OCI image archive is malformed or unsafe (path traversal, links out of tree)."""

    code = "invalid_archive"


class DigestMismatch(ImageError):
    """Content did not hash to the digest that names it."""

    code = "digest_mismatch"

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"digest mismatch for {what}: expected {expected}, got {actual}",
            {"content": what, "expected": expected, "actual": actual},
        )
        self.expected = expected
        self.actual = actual


class ImageInUse(ImageError):
    """The image is referenced by an instance (or an instance record) and cannot be deleted.

    ``details`` says who holds it when the check found out: ``holders``, the instances that
    acquired it, and ``records``, the instance record files that mention it.
    """

    code = "image_in_use"


class FormatConflict(ImageError):
    """The image digest already exists with another disk format."""

    code = "format_conflict"


class BuildFailed(ImageError):
    """Unpacking or building the disk failed (umoci/mkfs error, disk full, bad layer)."""

    code = "image_build_failed"


class ImageTooLarge(BuildFailed):
    """The layers unpack past ``IMAGE_MAX_UNPACKED_BYTES`` (sparse files at their full size)."""

    code = "image_too_large"


class StorageFull(BuildFailed):
    """The filesystem an import or build writes to has no room left (ENOSPC)."""

    code = "insufficient_storage"


class InvalidFormat(ImageError):
    """The requested disk format is not one of erofs, ext4."""

    code = "invalid_format"


class ImageNotReady(ImageError):
    """The image exists but is not ready, so it cannot be used yet."""

    code = "image_not_ready"
