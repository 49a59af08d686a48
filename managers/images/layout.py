"""One content-addressed OCI image layout shared by every image (``DATA_DIR/system/oci``).

Blobs are stored once under ``blobs/sha256/<hex>`` whoever asked for them; ``index.json`` names
each image's (OCI-rewritten) manifest by the hex of the image digest, so ``umoci`` and ``skopeo``
can read the layout as ``LAYOUT:<hex>``. Blobs only ever appear complete and verified: they are
written to a temporary file, hashed, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..atomic import write_atomic, write_json_atomic
from .errors import DigestMismatch
from .manifest import OCI_INDEX, OCI_MANIFEST

REF_ANNOTATION = "org.opencontainers.image.ref.name"


class OciLayout:
    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        self._index_lock = threading.Lock()

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    def ensure(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            write_json_atomic(marker, {"imageLayoutVersion": "1.0.0"})
        if not (self.root / "index.json").exists():
            self._write_index([])

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        if algorithm != "sha256" or len(hexpart) != 64:
            raise ValueError(f"unsupported digest {digest!r}")
        return self.blobs / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def put_bytes(self, digest: str, data: bytes) -> None:
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(f"blob {digest}", digest, actual)
        path = self.blob_path(digest)
        if not path.exists():
            write_atomic(path, data)

    def commit_file(self, tmp_file: Path, digest: str) -> None:
        """Move an already verified temporary file into place (same filesystem: a rename)."""
        os.replace(tmp_file, self.blob_path(digest))

    def remove_blobs_except(self, keep: Iterable[str]) -> int:
        keep_hex = {d.partition(":")[2] for d in keep}
        removed = 0
        for entry in self.blobs.iterdir():
            if entry.name not in keep_hex:
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- index.json ----------------------------------------------------------
    def _read_index(self) -> list[dict[str, Any]]:
        try:
            index = json.loads((self.root / "index.json").read_text())
        except (OSError, ValueError):
            return []
        manifests = index.get("manifests") if isinstance(index, dict) else None
        return [m for m in manifests or [] if isinstance(m, dict)]

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        write_json_atomic(
            self.root / "index.json",
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
        )

    def set_ref(self, name: str, digest: str, size: int) -> None:
        with self._index_lock:
            manifests = [m for m in self._read_index() if _ref(m) != name]
            manifests.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": size,
                    "annotations": {REF_ANNOTATION: name},
                }
            )
            self._write_index(manifests)

    def remove_ref(self, name: str) -> None:
        with self._index_lock:
            manifests = self._read_index()
            kept = [m for m in manifests if _ref(m) != name]
            if len(kept) != len(manifests):
                self._write_index(kept)

    def refs(self) -> dict[str, str]:
        return {_ref(m): str(m.get("digest")) for m in self._read_index() if _ref(m)}


def _ref(entry: dict[str, Any]) -> str:
    annotations = entry.get("annotations") or {}
    return str(annotations.get(REF_ANNOTATION, "")) if isinstance(annotations, dict) else ""
