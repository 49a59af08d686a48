"""Reference normalisation and manifest handling, no network."""

from __future__ import annotations

import json

import pytest

from managers.images.errors import InvalidReference, NoMatchingPlatform, UnsupportedImage
from managers.images.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    media_type_of,
    parse_config,
    select_platform,
    sha256_digest,
    to_oci_manifest,
)
from managers.images.reference import parse_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "name", "api_host", "target"),
    [
        ("alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", "latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19", "registry-1.docker.io", "3.19"),
        ("library/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", "latest"),
        ("index.docker.io/foo/bar", "docker.io/foo/bar:latest", "registry-1.docker.io", "latest"),
        ("ghcr.io/org/app:v1.2", "ghcr.io/org/app:v1.2", "ghcr.io", "v1.2"),
        ("localhost:5000/app", "localhost:5000/app:latest", "localhost:5000", "latest"),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "t"),
        (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}", "registry-1.docker.io", DIGEST),
        (f"r.io/x:tag@{DIGEST}", f"r.io/x:tag@{DIGEST}", "r.io", DIGEST),
        ("localhost/app", "localhost/app:latest", "localhost", "latest"),
    ],
)
def test_normalisation(text: str, name: str, api_host: str, target: str) -> None:
    ref = parse_reference(text)
    assert (ref.name, ref.api_host, ref.target) == (name, api_host, target)


@pytest.mark.parametrize(
    "text",
    ["", "UPPER/case", "alpine:", "alpine@sha256:short", "a b", "-bad", "x:tag:more",
     "host:99999999/x", "a//b", "alpine@md5:" + "a" * 32, "r.io/" + "a" * 300],
)  # fmt: skip
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_docker_manifest_rewritten_to_oci() -> None:
    docker = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": DIGEST, "size": 10},
        "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": "sha256:" + "b" * 64, "size": 5}],
    }
    raw = json.dumps(docker).encode()
    result = to_oci_manifest(raw, media_type_of(docker, None))
    rewritten = json.loads(result.oci_bytes)
    assert rewritten["mediaType"] == OCI_MANIFEST
    assert rewritten["config"]["mediaType"] == OCI_CONFIG
    assert rewritten["layers"][0]["mediaType"] == OCI_LAYER_GZIP
    assert result.oci_digest == sha256_digest(result.oci_bytes) != sha256_digest(raw)
    assert result.layers[0].compression == "gzip"


def test_oci_manifest_without_media_type_is_typed_from_the_header() -> None:
    document = {
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": DIGEST, "size": 1},
        "layers": [],
    }
    kind = media_type_of(document, f"{OCI_MANIFEST}; charset=utf-8")
    assert kind == OCI_MANIFEST
    result = to_oci_manifest(json.dumps(document).encode(), kind)
    assert json.loads(result.oci_bytes)["mediaType"] == OCI_MANIFEST


def test_unknown_layer_type_is_unsupported() -> None:
    document = {
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": DIGEST, "size": 1},
        "layers": [{"mediaType": "application/x-encrypted", "digest": DIGEST, "size": 1}],
    }
    with pytest.raises(UnsupportedImage):
        to_oci_manifest(json.dumps(document).encode(), OCI_MANIFEST)


def test_platform_selection() -> None:
    def entry(os_name: str, arch: str, char: str) -> dict[str, object]:
        return {
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:" + char * 64,
            "size": 1,
            "platform": {"os": os_name, "architecture": arch},
        }

    index = {"manifests": [entry("linux", "arm64", "1"), entry("linux", "amd64", "2")]}
    assert select_platform(index).digest == "sha256:" + "2" * 64
    with pytest.raises(NoMatchingPlatform, match="linux/arm64"):
        select_platform({"manifests": [entry("linux", "arm64", "1")]})


def test_config_fields() -> None:
    config = {
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve"],
            "Env": ["PATH=/bin", "A=b c"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        }
    }
    parsed = parse_config(json.dumps(config).encode())
    assert parsed.entrypoint == ("/bin/app",)
    assert parsed.cmd == ("--serve",)
    assert parsed.env == ("PATH=/bin", "A=b c")
    assert (parsed.workdir, parsed.user) == ("/srv", "1000:1000")
    assert parsed.exposed_ports == ("53/udp", "8080/tcp")


def test_the_name_bound_is_on_the_name_as_written() -> None:
    # 250 characters as written; Docker Hub's implicit "library/" makes the repository 258.
    long_name = "a" * 250
    assert parse_reference(long_name).repository == f"library/{long_name}"
    with pytest.raises(InvalidReference, match="longer than 255"):
        parse_reference("a" * 256)
