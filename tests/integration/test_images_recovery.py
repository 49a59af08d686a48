"""Crash safety of the image manager against a real registry and real mkfs.

- A record that cannot be read is quarantined with its disk, never deleted.
- A disk is never removed (DELETE, cache eviction, a failed build's cleanup) while an instance
  record on disk, readable or not, live or quarantined, references it.
- A real process SIGKILLed at each image failpoint leaves a state the next start recovers:
  the build resumes to ready, and no scratch tree or half-made disk survives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from managers.images import ImageInUse, ImageManager, ImageNotFound, ImageStatus
from managers.images.scratch import DEFAULT_SCRATCH
from managers.images.types import Image
from managers.paths import QUARANTINE_NOTE as NOTE
from managers.paths import Paths
from tests.support.oci_builder import BuiltImage, LayerBuilder, Pusher, make_image
from tests.support.registry import LocalRegistry, registry_available, running_registry

_TOOLS = ("docker-registry", "mkfs.erofs", "fsck.erofs")
_missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} installed"),
]

_REPO = Path(__file__).resolve().parents[2]
_FAR_FUTURE = 10.0**10


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    assert registry_available()
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def _small_image(marker: str) -> BuiltImage:
    layer = (
        LayerBuilder()
        .dir("bin")
        .file("bin/tool", f"#!/bin/sh\necho {marker}\n".encode(), mode=0o755)
        .dir("etc")
        .file("etc/marker", marker.encode())
    )
    return make_image([layer.build()], config={"Entrypoint": ["/bin/tool"]})


@pytest.fixture(scope="module")
def names(registry: LocalRegistry) -> dict[str, str]:
    """Two small, distinct images pushed once: ``alpha`` and ``beta`` -> reference."""
    pusher = Pusher(registry.host)
    try:
        for marker in ("alpha", "beta"):
            pusher.image(f"recovery/{marker}", "v1", _small_image(marker))
    finally:
        pusher.close()
    return {marker: f"{registry.host}/recovery/{marker}:v1" for marker in ("alpha", "beta")}


def _manager(root: Path, registry: LocalRegistry, **kwargs: object) -> ImageManager:
    options: dict[str, object] = {
        "insecure_registries": frozenset({registry.host}),
        "resolve_timeout": 3.0,
        "docker_config": root.parent / "no-docker-config.json",
        "scratch_dir": DEFAULT_SCRATCH,
    }
    options.update(kwargs)
    return ImageManager(Paths(root), **options)  # type: ignore[arg-type]


async def _ready(manager: ImageManager, name_or_digest: str) -> Image:
    with anyio.fail_after(120):
        snapshots = [image async for image in manager.subscribe(name_or_digest)]
    image = snapshots[-1]
    assert image.status == ImageStatus.READY, image.error
    return image


def _instance_record(paths: Paths, instance_id: str, image: Image | None) -> Path:
    """A record as the instance manager writes it (or, with no image, truncated to nothing)."""
    record = paths.instance_metadata(instance_id)
    record.parent.mkdir(parents=True, exist_ok=True)
    if image is None:
        record.write_bytes(b"")
    else:
        data = {
            "id": instance_id,
            "name": instance_id,
            "image": {
                "name": image.name,
                "digest": image.digest,
                "format": image.format,
                "disk": str(image.disk_path),
            },
            "hypervisor": "qemu",
            "network": {"enabled": False},
        }
        record.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return record


def _scratch_leftovers(root: Path) -> list[Path]:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    private = DEFAULT_SCRATCH / f"dataplane-images-{key}"
    return sorted(private.iterdir()) if private.is_dir() else []


# -- 1. quarantine, never delete ------------------------------------------------------------


async def test_truncated_image_record_is_quarantined_with_its_disk(
    tmp_path: Path,
    registry: LocalRegistry,
    names: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "data"
    paths = Paths(root)
    async with _manager(root, registry) as manager:
        image = await _ready(manager, (await manager.request(names["alpha"])).digest)
    assert image.disk_path is not None
    disk = image.disk_path.read_bytes()
    paths.image_metadata(image.digest).write_bytes(b"")  # truncated by a crash or a bad disk

    with caplog.at_level(logging.WARNING, logger="managers.images.store"):
        async with _manager(root, registry) as manager:
            assert await manager.list() == []
            with pytest.raises(ImageNotFound):
                await manager.get(names["alpha"])

    assert not paths.image_dir(image.digest).exists()
    [moved] = list(paths.quarantine_kind("images").iterdir())
    assert moved.name.startswith(image.digest.partition(":")[2] + "-")
    assert (moved / "rootfs.erofs").read_bytes() == disk
    assert (moved / "metadata.json").read_bytes() == b""
    note = json.loads((moved / NOTE).read_text())
    assert note["original_path"] == str(paths.image_dir(image.digest))
    assert "metadata.json" in note["reason"]
    assert str(moved) in caplog.text

    # Requesting it again builds it afresh beside the quarantined copy, which stays.
    async with _manager(root, registry) as manager:
        again = await _ready(manager, (await manager.request(names["alpha"])).digest)
    assert again.digest == image.digest
    assert (moved / "rootfs.erofs").read_bytes() == disk


# -- 2. instance records pin disks -----------------------------------------------------------


async def test_instance_records_keep_disks_from_delete_and_eviction(
    tmp_path: Path,
    registry: LocalRegistry,
    names: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "data"
    paths = Paths(root)
    async with _manager(root, registry, cache_seconds=3600) as manager:
        alpha = await _ready(manager, (await manager.request(names["alpha"])).digest)
        beta = await _ready(manager, (await manager.request(names["beta"])).digest)
        assert alpha.disk_path is not None

        # A readable record names alpha: eviction keeps alpha, takes beta.
        readable = _instance_record(paths, "i-readable", alpha)
        assert await manager.evict_unused(now=_FAR_FUTURE) == [beta.digest]
        assert alpha.disk_path.is_file()
        with pytest.raises(ImageInUse) as refused:
            await manager.delete(names["alpha"])
        assert refused.value.details == {
            "holders": 0,
            "records": ["instances/i-readable/metadata.json"],
        }
        assert alpha.disk_path.is_file()

        # A record truncated to nothing could name any image: eviction takes none, and says
        # why once; an explicit DELETE may still remove an image no record mentions.
        beta = await _ready(manager, (await manager.request(names["beta"])).digest)
        assert beta.disk_path is not None
        opaque = _instance_record(paths, "i-truncated", None)
        with caplog.at_level(logging.WARNING, logger="managers.images.manager"):
            assert await manager.evict_unused(now=_FAR_FUTURE) == []
            assert await manager.evict_unused(now=_FAR_FUTURE) == []
        paused = [r for r in caplog.records if "eviction paused" in r.getMessage()]
        assert len(paused) == 1
        assert str(opaque) in paused[0].getMessage()
        assert beta.disk_path.is_file()
        with pytest.raises(ImageInUse):
            await manager.delete(alpha.digest)
        await manager.delete(names["beta"])
        assert not paths.image_dir(beta.digest).exists()

        # Unreadable and quarantined, but still naming alpha's digest: alpha stays.
        parked = paths.quarantine_kind("instances") / "i-readable-20260101T000000Z"
        parked.mkdir(parents=True)
        (parked / "metadata.json").write_bytes(readable.read_bytes()[:-40])
        shutil.rmtree(readable.parent)
        opaque.unlink()
        opaque.parent.rmdir()
        with pytest.raises(ImageInUse):
            await manager.delete(alpha.digest)
        assert await manager.evict_unused(now=_FAR_FUTURE) == []
        assert alpha.disk_path.is_file()

        # Refcounts still count as before: held, the image stays even with no record.
        shutil.rmtree(parked)
        async with manager.use(alpha.digest):
            with pytest.raises(ImageInUse):
                await manager.delete(alpha.digest)
            assert await manager.evict_unused(now=_FAR_FUTURE) == []
        assert await manager.evict_unused(now=_FAR_FUTURE) == [alpha.digest]
        assert not paths.image_dir(alpha.digest).exists()


@pytest.mark.parametrize("referenced", [True, False], ids=["referenced", "unreferenced"])
async def test_failed_rebuild_keeps_a_disk_an_instance_record_names(
    tmp_path: Path, registry: LocalRegistry, names: dict[str, str], referenced: bool
) -> None:
    """A crash after the disk was written leaves it with a non-ready record; the resumed build
    fails (its layer blob is damaged). The disk stays if an instance record names it."""
    root = tmp_path / "data"
    paths = Paths(root)
    async with _manager(root, registry) as manager:
        image = await _ready(manager, (await manager.request(names["alpha"])).digest)
    assert image.disk_path is not None
    record = json.loads(paths.image_metadata(image.digest).read_text())
    record["image"]["status"] = "converting"
    paths.image_metadata(image.digest).write_text(json.dumps(record))
    blobs = paths.oci_layout / "blobs/sha256"
    manifest = json.loads((blobs / record["oci_manifest"].partition(":")[2]).read_text())
    [layer] = manifest["layers"]
    (blobs / layer["digest"].partition(":")[2]).write_bytes(b"not gzip")
    if referenced:
        _instance_record(paths, "i-one", image)

    async with _manager(root, registry) as manager:
        with anyio.fail_after(60):
            failed = [snapshot async for snapshot in manager.subscribe(image.digest)][-1]
        assert failed.status == ImageStatus.FAILED
        assert failed.disk_path is None
    assert image.disk_path.is_file() == referenced


# -- 3. SIGKILL at each image failpoint ------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import anyio

    from managers.images import ImageManager
    from managers.paths import Paths


    async def main(root: str, name: str, host: str) -> None:
        manager = ImageManager(
            Paths(Path(root)),
            insecure_registries=frozenset({host}),
            resolve_timeout=3.0,
            docker_config=Path(root).parent / "no-docker-config.json",
        )
        async with manager:
            requested = await manager.request(name)
            async for image in manager.subscribe(requested.digest):
                pass
        print(f"not killed: {image.status} {image.error}", flush=True)
        sys.exit(3)


    anyio.run(main, *sys.argv[1:])
    """
)

# The status the record on disk holds when the process dies at each point.
_STATUS_AT = {
    "image.pulled": "pulling",
    "image.unpacked": "unpacking",
    "image.disk_written": "converting",
}


@pytest.mark.parametrize("point", sorted(_STATUS_AT))
async def test_sigkill_at_image_failpoint_then_restart_recovers(
    tmp_path: Path, registry: LocalRegistry, names: dict[str, str], point: str
) -> None:
    root = tmp_path / "data"
    paths = Paths(root)
    script = tmp_path / "build.py"
    script.write_text(_CHILD)
    env = dict(os.environ, DATAPLANE_FAILPOINT=point, PYTHONPATH=str(_REPO))
    child = await anyio.run_process(
        [sys.executable, str(script), str(root), names["alpha"], registry.host],
        env=env,
        cwd=_REPO,
        check=False,
    )
    output = (child.stdout + child.stderr).decode(errors="replace")
    assert child.returncode == -signal.SIGKILL, output

    [folder] = [p for p in paths.images.iterdir() if p != paths.image_tags]
    record = json.loads((folder / "metadata.json").read_text())
    assert record["image"]["status"] == _STATUS_AT[point]
    assert record["image"]["disk_path"] is None
    digest = record["image"]["digest"]
    disk = paths.image_disk(digest, "erofs")
    # Only the last point has the disk under its final name, and then it is complete.
    assert disk.exists() == (point == "image.disk_written")
    if point != "image.pulled":
        assert _scratch_leftovers(root), "the killed build had an unpacked tree in scratch"

    async with _manager(root, registry) as manager:
        # The build resumes; until it is ready, no snapshot shows a disk.
        snapshots: list[Image] = []
        with anyio.fail_after(120):
            async for image in manager.subscribe(digest):
                snapshots.append(image)
        ready = snapshots[-1]
        assert ready.status == ImageStatus.READY, ready.error
        assert all(s.disk_path is None for s in snapshots[:-1])
        assert ready.disk_path == disk
        assert await manager.get(names["alpha"]) == ready

    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "rootfs.erofs"]
    assert _scratch_leftovers(root) == []
    assert [p.name for p in paths.tmp.iterdir()] == ["blobs"]
    assert list((paths.tmp / "blobs").iterdir()) == []
    assert not paths.quarantine.exists()
    checked = await anyio.run_process(["fsck.erofs", str(disk)], check=False)
    assert checked.returncode == 0, checked.stderr.decode(errors="replace")
