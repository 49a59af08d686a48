"""Images through the real API: every bad input gets the spec's error and changes nothing."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.integration.test_instances_api import wait_ready
from tests.support.apps import COUNTER, busybox_layers, push_app
from tests.support.oci_builder import make_image, write_oci_archive
from tests.support.registry import LocalRegistry, running_registry
from tests.support.server import RunningServer, run_server


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    with running_registry(tmp_path_factory.mktemp("images-api-registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def server(
    registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("images-api") / "data"
    with run_server(data, {"INSECURE_REGISTRIES": registry.host}) as server:
        yield server


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def data_dir(server: RunningServer) -> Path:
    return server.log_path.parent / "data"


def stored(server: RunningServer) -> list[str]:
    """What the image store holds: metadata and disks (not scratch space)."""
    root = data_dir(server) / "images"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code


def test_pull_build_get_and_delete(registry: LocalRegistry, client: httpx.Client) -> None:
    name = push_app(registry.host, "tests/app", {"/app/run": COUNTER}, entrypoint=["/app/run"])
    accepted = client.post("/images", json={"name": name, "format": "ext4"})
    assert accepted.status_code == 202
    assert accepted.json()["status"] in ("pending", "pulling", "unpacking", "converting", "ready")
    ready = wait_ready(client, name)
    assert ready["format"] == "ext4"
    assert ready["size"] > 0
    again = client.post("/images", json={"name": name, "format": "ext4"})
    assert again.status_code == 202
    assert again.json()["status"] == "ready"
    assert client.delete(f"/images/{quote(name, safe='')}").status_code == 204
    assert_error(client.get(f"/images/{ready['digest']}"), 404, "image_not_found")


def test_bad_pulls_get_the_spec_errors_and_store_nothing(
    registry: LocalRegistry, server: RunningServer, client: httpx.Client
) -> None:
    before = stored(server)
    assert_error(client.post("/images", json={"name": "UPPER/Case"}), 400, "invalid_request")
    assert_error(
        client.post("/images", json={"name": "a", "format": "zip"}), 400, "invalid_request"
    )
    assert_error(
        client.post("/images", json={"name": f"{registry.host}/no/such:tag"}),
        404,
        "image_not_found",
    )
    assert_error(
        client.post("/images", json={"name": "127.0.0.1:1/nothing/listens:here"}),
        502,
        "registry_unreachable",
    )
    assert_error(client.get("/images/never-pulled"), 404, "image_not_found")
    assert_error(client.get("/images/never-pulled/events"), 404, "image_not_found")
    assert_error(client.delete("/images/never-pulled"), 404, "image_not_found")
    assert stored(server) == before


def test_import_and_unsafe_archives(
    tmp_path: Path, server: RunningServer, client: httpx.Client
) -> None:
    image = make_image(busybox_layers({"/app/run": COUNTER}), config={"Entrypoint": ["/app/run"]})
    good = tmp_path / "good.tar"
    write_oci_archive(good, image, name="tests/imported:v1")
    imported = client.post(
        "/images/import", content=good.read_bytes(), headers={"content-type": "application/x-tar"}
    )
    assert imported.status_code == 202, imported.text
    wait_ready(client, imported.json()["digest"])

    before = stored(server)
    escape = tarfile.TarInfo("../../escape")
    escape.size = 4
    evil = tmp_path / "evil.tar"
    write_oci_archive(evil, image, extra=[(escape, b"boom")])
    link = tarfile.TarInfo("blobs/sha256/outside")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    linked = tmp_path / "linked.tar"
    write_oci_archive(linked, image, extra=[(link, None)])
    for archive in (evil, linked):
        response = client.post(
            "/images/import",
            content=archive.read_bytes(),
            headers={"content-type": "application/x-tar"},
        )
        assert_error(response, 400, "invalid_archive")
    not_tar = io.BytesIO(b"this is not a tar archive" * 100).getvalue()
    response = client.post(
        "/images/import", content=not_tar, headers={"content-type": "application/octet-stream"}
    )
    assert_error(response, 400, "invalid_archive")
    assert stored(server) == before
    assert not (data_dir(server).parent / "escape").exists()


def test_import_needs_an_archive_media_type(server: RunningServer, client: httpx.Client) -> None:
    response = client.post(
        "/images/import", content=b"{}", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_request")
