"""Start-up reading of image records, and the scan of instance records for image references.

No registry, no mkfs: image folders and instance records are written by hand, as a crash or a
damaged disk would leave them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from managers.images import references
from managers.images.store import Record, RecordStore
from managers.images.types import Image, ImageStatus
from managers.paths import QUARANTINE_NOTE as NOTE
from managers.paths import Paths

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
UNKNOWN = "sha256:" + "ef" * 32


def _record(digest: str = DIGEST) -> Record:
    image = Image(
        name="registry.test/app:v1",
        digest=digest,
        status=ImageStatus.READY,
        format="erofs",
        created_at="2026-01-01T00:00:00.000Z",
        updated_at="2026-01-01T00:00:00.000Z",
    )
    return Record(image=image, source="registry")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(tmp_path / "data")
    paths.ensure()
    return paths


def _image_folder(paths: Paths, metadata: bytes | None, digest: str = DIGEST) -> Path:
    folder = paths.image_dir(digest)
    folder.mkdir(parents=True)
    (folder / "rootfs.erofs").write_bytes(b"disk contents")
    if metadata is not None:
        (folder / "metadata.json").write_bytes(metadata)
    return folder


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        (b"", "truncated to zero bytes"),
        (b'{"image": {"name": "registry.test/app:v1", "dig', "cut mid-write"),
        (b"[]", "not an object"),
        (b'{"image": {"name": "x"}}', "fields missing"),
        (json.dumps(_record().to_dict()).replace("ready", "bogus").encode(), "unknown status"),
        (json.dumps(_record(OTHER).to_dict()).encode(), "names another digest"),
        (None, "metadata.json missing, a disk present"),
    ],
)
def test_unreadable_or_invalid_record_is_quarantined_with_its_disk(
    paths: Paths, metadata: bytes | None, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _image_folder(paths, metadata)
    (folder / ".rootfs.erofs.123.tmp").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="managers.images.store"):
        assert RecordStore(paths).load_all() == [], why
    assert not folder.exists()
    [moved] = list(paths.quarantine_kind("images").iterdir())
    assert moved.name.startswith(folder.name + "-")
    assert (moved / "rootfs.erofs").read_bytes() == b"disk contents"
    # Moved as found: nothing in an unreadable folder is removed, temporaries included.
    assert (moved / ".rootfs.erofs.123.tmp").exists()
    note = json.loads((moved / NOTE).read_text())
    assert note["kind"] == "images"
    assert note["original_path"] == str(folder)
    assert "metadata.json" in note["reason"]
    assert str(moved) in caplog.text


@pytest.mark.parametrize("contents", [[], [".metadata.json.x1y2.tmp"], [".rootfs.erofs.9.tmp"]])
def test_unfinished_build_without_anything_to_keep_is_removed(
    paths: Paths, contents: list[str]
) -> None:
    folder = paths.image_dir(DIGEST)
    folder.mkdir()
    for name in contents:
        (folder / name).write_bytes(b"partial")
    assert RecordStore(paths).load_all() == []
    assert not folder.exists()
    assert not paths.quarantine_kind("images").exists()


def test_readable_record_is_loaded_and_its_temporaries_dropped(paths: Paths) -> None:
    store = RecordStore(paths)
    store.save(_record())
    stale = paths.image_dir(DIGEST) / ".rootfs.erofs.77.tmp"
    stale.write_bytes(b"half")
    [loaded] = store.load_all()
    assert loaded.image.digest == DIGEST
    assert not stale.exists()
    assert not paths.quarantine_kind("images").exists()


def _instance_record(
    paths: Paths, instance_id: str, data: bytes, quarantined: bool = False
) -> Path:
    base = paths.quarantine_kind("instances") if quarantined else paths.instances
    record = base / instance_id / "metadata.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(data)
    return record


def _readable(paths: Paths, digest: str) -> bytes:
    disk = paths.image_disk(digest, "erofs")
    return json.dumps(
        {"id": "i1", "name": "one", "image": {"digest": digest, "disk": str(disk)}}, sort_keys=True
    ).encode()


def test_scan_finds_readable_unreadable_and_quarantined_records(paths: Paths) -> None:
    readable = _instance_record(paths, "i-readable", _readable(paths, DIGEST))
    # Cut after the digest: no longer JSON, still names its image.
    cut = _instance_record(paths, "i-cut", _readable(paths, OTHER)[:-20])
    parked = _instance_record(
        paths, "i-old-20260101T000000Z", _readable(paths, DIGEST)[:-5], quarantined=True
    )
    foreign = _instance_record(paths, "i-foreign", _readable(paths, UNKNOWN))
    found = references.scan(paths, [DIGEST, OTHER])
    assert set(found.holders(DIGEST)) == {readable, parked}
    assert found.holders(OTHER) == (cut,)
    assert found.holders(UNKNOWN) == ()  # not asked for
    assert found.opaque == ()  # every record names some image, even the unknown one
    assert foreign.exists()


@pytest.mark.parametrize(
    "data", [b"", b'{"booted": false, "cmd": null, "created_at": "2026-', b"\x00" * 64]
)
def test_scan_reports_records_that_name_no_image_as_opaque(paths: Paths, data: bytes) -> None:
    _instance_record(paths, "i-readable", _readable(paths, DIGEST))
    opaque = _instance_record(paths, "i-broken", data)
    found = references.scan(paths, [DIGEST, OTHER])
    assert found.opaque == (opaque,)
    assert found.holders(OTHER) == ()
    assert len(found.holders(DIGEST)) == 1


def test_scan_ignores_instance_folders_without_a_record(paths: Paths) -> None:
    (paths.instances / "i-half-made").mkdir()
    (paths.instances / "i-half-made" / ".metadata.json.abc.tmp").write_bytes(b"")
    found = references.scan(paths, [DIGEST])
    assert found.opaque == ()
    assert found.by_digest == {}
