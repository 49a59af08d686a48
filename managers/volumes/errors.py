"""The volumes error tree.

Each class's ``code`` is the API's error code; a class without one answers with its parent's::

    VolumeError                 volume_error
    ├── InvalidVolumeSpec       invalid_volume         the request cannot describe a volume
    │   ├── InvalidVolumeArchive invalid_archive       an import's tar is unreadable or unsafe
    │   └── VolumeTooSmall      volume_too_small       the content does not fit in size_mb
    ├── VolumeNotFound          volume_not_found       no volume has that id or name
    ├── SourceImageMissing      image_not_found        the source image is not on this node
    ├── SourceImageNotReady     image_not_ready        the source image is still building, or failed
    ├── VolumeExists            volume_exists          the name is taken
    ├── VolumeInUse             volume_in_use          attached where that conflicts, or changing
    ├── VolumeBusy              volume_busy            the guest holds files open on it
    ├── VolumeQuarantined       volume_quarantined     record unreadable; an operator must look
    ├── InsufficientStorage     insufficient_storage   the node has no room for it
    ├── VolumeRecordInvalid                            a stored record does not parse
    └── VolumeBuildFailed       volume_build_failed    a tool (mkfs, resize2fs, …) failed
"""

from __future__ import annotations

from managers.errors import DomainError


class VolumeError(DomainError):
    """Base of every error raised by ``managers.volumes``."""

    code = "volume_error"


class InvalidVolumeSpec(VolumeError):
    code = "invalid_volume"


class InvalidVolumeArchive(InvalidVolumeSpec):
    code = "invalid_archive"


class VolumeTooSmall(InvalidVolumeSpec):
    code = "volume_too_small"

    def __init__(self, size_mb: int, needed_mb: int | None = None, detail: str = "") -> None:
        need = f" (it needs at least {needed_mb} MB)" if needed_mb is not None else ""
        super().__init__(
            f"the content does not fit in {size_mb} MB{need}" + (f": {detail}" if detail else ""),
            {"size_mb": size_mb, **({"needed_mb": needed_mb} if needed_mb is not None else {})},
        )


class VolumeNotFound(VolumeError):
    code = "volume_not_found"

    def __init__(self, key: str) -> None:
        super().__init__(f"no volume with id or name {key!r}", {"volume": key})


class SourceImageMissing(VolumeError):
    code = "image_not_found"

    def __init__(self, image: str) -> None:
        super().__init__(f"no image {image!r} on this node: pull it first", {"image": image})


class SourceImageNotReady(VolumeError):
    code = "image_not_ready"

    def __init__(self, image: str, why: str) -> None:
        super().__init__(f"image {image!r} cannot fill a volume yet: {why}", {"image": image})


class VolumeExists(VolumeError):
    code = "volume_exists"

    def __init__(self, name: str, existing_id: str) -> None:
        super().__init__(
            f"a volume named {name!r} already exists (or {name!r} is a volume's id)",
            {"name": name, "id": existing_id},
        )


class VolumeInUse(VolumeError):
    code = "volume_in_use"


class VolumeBusy(VolumeError):
    code = "volume_busy"


class VolumeQuarantined(VolumeError):
    code = "volume_quarantined"

    def __init__(self, volume_id: str, path: str, reason: str) -> None:
        super().__init__(
            f"volume {volume_id} was quarantined because its record could not be read "
            f"({reason}); its folder, data included, is at {path}: inspect it, and remove it "
            "by hand when nothing in it is needed",
            {"id": volume_id, "path": path, "reason": reason},
        )


class InsufficientStorage(VolumeError):
    code = "insufficient_storage"

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(
            f"the node has {free >> 20} MB free for volumes, and this needs {needed >> 20} MB",
            {"needed_mb": needed >> 20, "free_mb": free >> 20},
        )


class VolumeRecordInvalid(VolumeError):
    """A ``metadata.json`` that does not describe a volume."""


class VolumeBuildFailed(VolumeError):
    code = "volume_build_failed"
