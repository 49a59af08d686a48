"""Registry access on top of the oras SDK (synchronous: call it from a worker thread).

oras gives us the requests session, the bearer-token challenge and the Docker credential store
lookup. We add what a container pull needs: our own timeouts instead of its ~131 s retry loop,
raw manifest bytes checked against their digest, plain HTTP for insecure registries, Docker Hub's
API host and credential key, and verified streaming blob downloads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oras.provider
import requests

from .errors import (
    DigestMismatch,
    ImageNotFound,
    RegistryAuthFailed,
    RegistryError,
    RegistryUnreachable,
)
from .manifest import ACCEPT, sha256_digest
from .reference import DOCKER_HUB, Reference

_CHUNK = 1 << 20
_DOCKER_HUB_CONFIG_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")


class Stopped(Exception):
    """The caller asked a running download to stop (the build was cancelled)."""


class _TimeoutSession(requests.Session):
    """A session that never waits forever: requests has no default timeout."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    data: bytes
    media_type: str | None  # the Content-Type header
    digest: str


class RegistryClient:
    """One repository on one registry, with its own session and token."""

    def __init__(
        self,
        ref: Reference,
        *,
        insecure: bool,
        docker_config: Path | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.ref = ref
        self._provider = oras.provider.Registry(hostname=ref.api_host, insecure=insecure)
        session = _TimeoutSession((connect_timeout, read_timeout))
        session.cookies.set_policy(self._provider.session.cookies.get_policy())
        self._provider.session = session
        self._provider.auth.session = session
        self._base = f"{'http' if insecure else 'https'}://{ref.api_host}/v2/{ref.repository}"
        self._basic: str | None = None  # set once the registry challenged us with Basic
        self._load_credentials(docker_config)
        token_flow = self._provider.auth.authenticate_request

        def authenticate(
            original: requests.Response, headers: dict[str, str], refresh: bool = False
        ) -> tuple[dict[str, str], bool]:
            # oras only speaks Bearer: answer a Basic challenge with the configured credentials.
            challenge = original.headers.get("Www-Authenticate", "")
            if challenge.lower().startswith("basic"):
                credentials = getattr(self._provider.auth, "_basic_auth", None)
                if not credentials or self._basic:
                    return headers, False
                self._basic = str(credentials)
                headers["Authorization"] = f"Basic {self._basic}"
                return headers, True
            result: tuple[dict[str, str], bool] = token_flow(original, headers, refresh=refresh)
            return result

        self._provider.auth.authenticate_request = authenticate

    def _load_credentials(self, docker_config: Path | None) -> None:
        """Basic credentials from a Docker config file, handed to oras's token auth."""
        if docker_config is None or not docker_config.is_file():
            return
        try:
            config = json.loads(docker_config.read_text())
        except (OSError, ValueError):
            return
        auth = self._provider.auth
        auth._auth_config = {
            "auths": dict(config.get("auths") or {}),
            "credsStore": config.get("credsStore"),
            "credHelpers": dict(config.get("credHelpers") or {}),
        }
        keys = _DOCKER_HUB_CONFIG_KEYS if self.ref.registry == DOCKER_HUB else ()
        for key in (*keys, self.ref.registry, f"https://{self.ref.registry}"):
            entry = auth._auth_config["auths"].get(key) or {}
            if not entry.get("auth") and entry.get("username"):
                raw = f"{entry['username']}:{entry.get('password', '')}"
                entry["auth"] = base64.b64encode(raw.encode()).decode()
            if auth._load_auth(key):
                return

    def _get(self, url: str, headers: dict[str, str], *, stream: bool = False) -> requests.Response:
        # do_request without oras's retry decorator: a refused connection must fail in seconds.
        do_request = oras.provider.Registry.do_request.__wrapped__
        headers = dict(headers)
        if self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        try:
            response: requests.Response = do_request(
                self._provider, url, "GET", headers=headers, stream=stream
            )
        except requests.exceptions.Timeout as exc:
            raise RegistryUnreachable(f"registry {self.ref.registry} timed out: {exc}") from exc
        except requests.exceptions.ConnectionError as exc:
            raise RegistryUnreachable(f"cannot reach registry {self.ref.registry}: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise RegistryUnreachable(f"registry {self.ref.registry} failed: {exc}") from exc
        except ValueError as exc:  # oras: "Cannot respond to request for authentication."
            raise RegistryAuthFailed(
                f"{self.ref.name}: the registry asks for authentication we cannot answer ({exc})"
            ) from exc
        return response

    def _check(self, response: requests.Response, what: str) -> None:
        status = response.status_code
        if status == 200:
            return
        detail = _error_detail(response)
        response.close()
        if status == 404:
            raise ImageNotFound(f"{what} not found in {self.ref.registry}{detail}")
        if status in (401, 403):
            raise RegistryAuthFailed(f"{what}: access denied by {self.ref.registry}{detail}")
        if status >= 500 or status == 429:
            raise RegistryUnreachable(f"registry {self.ref.registry} answered {status}{detail}")
        raise RegistryError(f"registry {self.ref.registry} answered {status} for {what}{detail}")

    def fetch_manifest(self, target: str, expected_digest: str | None = None) -> FetchedManifest:
        """GET a manifest or index by tag or digest and verify its bytes."""
        response = self._get(f"{self._base}/manifests/{target}", {"Accept": ACCEPT})
        self._check(response, f"manifest {self.ref.repository}:{target}")
        data = response.content
        actual = sha256_digest(data)
        claimed = expected_digest or (target if target.startswith("sha256:") else None)
        if claimed is None:
            header = response.headers.get("Docker-Content-Digest")
            claimed = header if header and header.startswith("sha256:") else None
        if claimed is not None and claimed != actual:
            raise DigestMismatch(f"manifest {self.ref.repository}:{target}", claimed, actual)
        return FetchedManifest(data, response.headers.get("Content-Type"), actual)

    def fetch_blob_bytes(self, digest: str, limit: int = 16 << 20) -> bytes:
        """A small blob (the image config) in memory, verified."""
        response = self._get(f"{self._base}/blobs/{digest}", {})
        self._check(response, f"blob {digest}")
        data = response.content
        if len(data) > limit:
            raise RegistryError(f"blob {digest} is larger than {limit} bytes")
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatch(f"blob {digest}", digest, actual)
        return data

    def download_blob(
        self,
        digest: str,
        dest: Path,
        on_bytes: Callable[[int], None],
        stop: threading.Event,
    ) -> None:
        """Stream a blob into ``dest`` (a temporary file), hashing as it goes; verify at the end."""
        response = self._get(f"{self._base}/blobs/{digest}", {}, stream=True)
        with response:
            self._check(response, f"blob {digest}")
            hasher = hashlib.sha256()
            try:
                with dest.open("wb") as out:
                    for chunk in response.iter_content(chunk_size=_CHUNK):
                        if stop.is_set():
                            raise Stopped(digest)
                        hasher.update(chunk)
                        out.write(chunk)
                        on_bytes(len(chunk))
            except requests.exceptions.RequestException as exc:
                raise RegistryUnreachable(f"download of {digest} failed: {exc}") from exc
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatch(f"blob {digest}", digest, actual)


def _error_detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return f" ({errors[0].get('code', '')}: {errors[0].get('message', '')})"
    return ""
