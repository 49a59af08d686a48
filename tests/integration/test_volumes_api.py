"""``/volumes`` and ``/instances/{id}/volumes`` over HTTP, on fake VMMs and a fake agent with
the real volume manager: every error in the spec's shape, each changing nothing on disk."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from dataplane.app import create_app
from dataplane.bootstrap import Managers
from dataplane.runtime import Runtime
from dataplane.settings import Settings
from managers.images import ImageManager
from managers.volumes import VolumeManager
from tests.support.artifacts import shared_artifacts
from tests.unit.test_instance_manager import FakeBackend, FakeImages, FakeNetwork, build

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)"
)


@pytest.fixture(params=["checked", "unchecked"])
def client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient[Litestar]]:
    """The app with its contract check on, and off: a handler must stand on its own."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)

    @asynccontextmanager
    async def fakes(runtime: Runtime) -> AsyncIterator[Managers]:
        images = ImageManager(runtime.paths)
        await images.start()
        try:
            async with VolumeManager(
                runtime.paths, images=images, on_change=runtime.report_volume
            ) as volumes:
                instances = build(
                    runtime.paths, FakeImages(disk), FakeBackend(), FakeNetwork(), volumes=volumes
                )
                async with instances:
                    yield Managers(images=images, instances=instances, volumes=volumes)
        finally:
            await images.close()

    artifacts = shared_artifacts()
    settings = Settings.from_env(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
            "CONTRACT_VALIDATION": "true" if request.param == "checked" else "false",
        }
    )
    app = create_app(settings, managers=fakes)
    with TestClient(app) as test_client:
        yield test_client
    assert app.state.contract.violations == []


def _disk(client: TestClient[Litestar]) -> list[str]:
    """Every file under the volumes folder and the instances' records: what must not change."""
    root = Path(client.app.state.runtime.paths.root)
    found = [str(p.relative_to(root)) for p in (root / "volumes").rglob("*")]
    found += [p.read_text() for p in (root / "instances").glob("*/metadata.json")]
    return sorted(found)


def _error(answer: Any, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    # With the contract check on, what the schema already forbids is its invalid_request.
    allowed = {code, "invalid_request"} if status == 400 else {code}
    assert body["code"] in allowed, body
    assert set(body) <= {"code", "message", "details"}
    return body


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_volume_lifecycle_over_http(client: TestClient[Litestar]) -> None:
    created = client.post("/volumes", json={"name": "data", "size_mb": 10240})
    assert created.status_code == 201, created.text
    volume = created.json()
    assert volume["size_mb"] == 10240
    assert volume["format"] == "ext4"
    assert volume["attachments"] == []
    assert volume["source"] == {"type": "empty"}
    assert client.get("/volumes/data").json()["id"] == volume["id"]
    assert [v["name"] for v in client.get("/volumes").json()] == ["data"]
    grown = client.patch("/volumes/data", json={"size_mb": 20480})
    assert grown.status_code == 200, grown.text
    assert grown.json()["size_mb"] == 20480
    imported = client.post(
        "/volumes/import?name=site&size_mb=16",
        content=_tar_gz({"index.html": b"<p>hi</p>"}),
        headers={"content-type": "application/gzip"},
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["source"] == {"type": "archive"}
    assert client.delete(f"/volumes/{volume['id']}").status_code == 204
    assert client.delete("/volumes/site").status_code == 204
    assert client.get("/volumes").json() == []


def test_attach_and_detach_over_http(client: TestClient[Litestar]) -> None:
    client.post("/volumes", json={"name": "data", "size_mb": 16})
    volume_id = client.get("/volumes/data").json()["id"]
    body = {"name": "web", "image": "app", "entrypoint": ["/app/run"], "overlay_size_mb": 16}
    created = client.post(
        "/instances", json={**body, "volumes": [{"volume_id": "data", "mount_path": "/data"}]}
    )
    assert created.status_code == 201, created.text
    assert created.json()["volumes"] == [
        {"volume_id": volume_id, "mount_path": "/data", "readonly": False}
    ]
    uses = client.get("/volumes/data").json()["attachments"]
    assert uses == [{"instance_id": created.json()["id"], "mount_path": "/data", "readonly": False}]
    _error(client.delete("/volumes/data"), 409, "volume_in_use")
    _error(client.patch("/volumes/data", json={"size_mb": 32}), 409, "volume_in_use")
    detached = client.delete("/instances/web/volumes/data")
    assert detached.status_code == 200, detached.text
    assert detached.json()["volumes"] == []
    attached = client.post(
        "/instances/web/volumes/data", json={"mount_path": "/srv", "readonly": True}
    )
    assert attached.status_code == 200, attached.text
    assert attached.json()["volumes"] == [
        {"volume_id": volume_id, "mount_path": "/srv", "readonly": True}
    ]
    assert client.delete("/instances/web").status_code == 204
    assert client.get("/volumes/data").json()["attachments"] == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("post", "/volumes", {"name": "Bad", "size_mb": 16}, 400, "invalid_volume"),
        ("post", "/volumes", {"name": "x", "size_mb": 1}, 400, "invalid_volume"),
        ("post", "/volumes", {"name": "x", "size_mb": 16, "y": 1}, 400, "invalid_volume"),
        ("post", "/volumes", {"name": "x", "size_mb": 16 << 20}, 507, "insufficient_storage"),
        ("post", "/volumes", {"name": "used", "size_mb": 16}, 409, "volume_exists"),
        (
            "post",
            "/volumes",
            {"name": "x", "size_mb": 16, "source": {"image": "no"}},
            404,
            "image_not_found",
        ),
        ("patch", "/volumes/used", {"size_mb": 8}, 400, "invalid_volume"),
        ("patch", "/volumes/used", {"size": 8}, 400, "invalid_volume"),
        ("patch", "/volumes/missing", {"size_mb": 64}, 404, "volume_not_found"),
        ("delete", "/volumes/missing", None, 404, "volume_not_found"),
        ("get", "/volumes/missing", None, 404, "volume_not_found"),
        ("post", "/instances/web/volumes/missing", {"mount_path": "/d"}, 404, "volume_not_found"),
        ("post", "/instances/web/volumes/ro", {"mount_path": "/d"}, 409, "volume_in_use"),
        ("post", "/instances/web/volumes/rw", {"mount_path": "/e"}, 409, "volume_in_use"),
        (
            "post",
            "/instances/web/volumes/used",
            {"mount_path": "relative"},
            400,
            "invalid_instance",
        ),
        ("post", "/instances/web/volumes/used", {"mount_path": "/"}, 400, "invalid_instance"),
        ("post", "/instances/web/volumes/used", {"mount_path": "/a/../b"}, 400, "invalid_instance"),
        ("post", "/instances/web/volumes/used", {"mount_path": "/proc"}, 400, "invalid_instance"),
        ("post", "/instances/web/volumes/used", {"mount_path": "/sys/x"}, 400, "invalid_instance"),
        ("post", "/instances/web/volumes/used", {"mount_path": "/dev"}, 400, "invalid_instance"),
        ("post", "/instances/web/volumes/used", {"mount_path": "/rw"}, 400, "invalid_instance"),
        ("post", "/instances/nope/volumes/used", {"mount_path": "/d"}, 404, "instance_not_found"),
        ("delete", "/instances/web/volumes/used", None, 404, "volume_not_attached"),
        ("delete", "/instances/web/volumes/busy", None, 409, "volume_busy"),
    ],
    ids=lambda v: str(v)[:48],
)
def test_every_volume_error_changes_nothing(
    client: TestClient[Litestar],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    code: str,
) -> None:
    for name in ("used", "ro", "rw", "busy"):
        assert client.post("/volumes", json={"name": name, "size_mb": 16}).status_code == 201
    app = {"image": "app", "entrypoint": ["/app/run"], "overlay_size_mb": 16}
    web = client.post(
        "/instances",
        json={
            **app,
            "name": "web",
            "volumes": [
                {"volume_id": "ro", "mount_path": "/ro", "readonly": True},
                {"volume_id": "rw", "mount_path": "/rw"},
                {"volume_id": "busy", "mount_path": "/busy"},
            ],
        },
    )
    assert web.status_code == 201, web.text
    other = client.post(
        "/instances",
        json={**app, "name": "other", "volumes": [{"volume_id": "rw", "mount_path": "/x"}]},
    )
    assert other.status_code == 409  # rw is web's alone
    before = _disk(client)
    answer = (
        client.request(method.upper(), path, json=body)
        if body is not None
        else client.request(method.upper(), path)
    )
    _error(answer, status, code)
    assert _disk(client) == before


def test_an_unsafe_import_is_refused_and_leaves_nothing(client: TestClient[Litestar]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    answer = client.post(
        "/volumes/import?name=bad&size_mb=16",
        content=buffer.getvalue(),
        headers={"content-type": "application/x-tar"},
    )
    _error(answer, 400, "invalid_archive")
    _error(
        client.post(
            "/volumes/import?name=bad&size_mb=16",
            content=b"not a tar at all",
            headers={"content-type": "application/x-tar"},
        ),
        400,
        "invalid_archive",
    )
    assert _disk(client) == []
    assert client.get("/volumes").json() == []
