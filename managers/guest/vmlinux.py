"""Turning a bzImage into the ELF ``vmlinux`` that boots as PVH, and reading kernel versions.

A bzImage is real-mode setup code followed by a compressed ELF kernel. The setup header says
where the compressed payload is (``payload_offset``/``payload_length``, boot protocol 2.08+),
and the build appends the uncompressed size as 4 bytes, which decompressors reject as trailing
garbage, so it is cut off before decompressing.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import anyio

from .errors import KernelUnpackError, OverridePathError, ToolMissingError

_ELF_MAGIC = b"\x7fELF"
_DECOMPRESSORS: tuple[tuple[bytes, tuple[str, ...]], ...] = (
    (b"\x02\x21\x4c\x18", ("lz4", "-dc")),
    (b"\x28\xb5\x2f\xfd", ("zstd", "-dcq")),
    (b"\xfd7zXZ\x00", ("xz", "-dc")),
    (b"\x1f\x8b", ("gzip", "-dc")),
)


def is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == _ELF_MAGIC


def _payload(image: bytes, source: Path) -> bytes:
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise KernelUnpackError(f"{source} is not a bzImage (no HdrS setup header)")
    (protocol,) = struct.unpack_from("<H", image, 0x206)
    if protocol < 0x208:
        raise KernelUnpackError(f"{source}: boot protocol {protocol:#x} has no payload fields")
    setup_sectors = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    if length <= 4 or start + length > len(image):
        raise KernelUnpackError(f"{source}: payload bounds lie outside the file")
    return image[start : start + length - 4]


async def extract_vmlinux(bzimage: Path, destination: Path) -> None:
    """Write the ELF kernel inside ``bzimage`` to ``destination``."""
    image = await anyio.Path(bzimage).read_bytes()
    payload = _payload(image, bzimage)
    command = next((cmd for magic, cmd in _DECOMPRESSORS if payload.startswith(magic)), None)
    if command is None:
        raise KernelUnpackError(f"{bzimage}: unknown compression (magic {payload[:6].hex()})")
    try:
        result = await anyio.run_process(list(command), input=payload, check=False)
    except FileNotFoundError as exc:
        raise ToolMissingError(f"extracting vmlinux: {command[0]} is not installed") from exc
    if result.returncode != 0 or not result.stdout.startswith(_ELF_MAGIC):
        detail = result.stderr.decode("utf-8", "replace").strip()[-400:]
        raise KernelUnpackError(f"{bzimage}: {command[0]} did not yield an ELF kernel: {detail}")
    await anyio.Path(destination).write_bytes(result.stdout)


def bzimage_version(image: bytes) -> str | None:
    """The release string a bzImage's setup header points at (``6.1.0-56-cloud-amd64``)."""
    if len(image) < 0x210 or image[0x202:0x206] != b"HdrS":
        return None
    (pointer,) = struct.unpack_from("<H", image, 0x20E)
    start = pointer + 0x200
    end = image.find(b"\0", start, start + 256)
    if pointer == 0 or end < 0:
        return None
    release = image[start:end].decode("ascii", "replace").split(" ", 1)[0]
    return release or None


def elf_version(image: bytes) -> str | None:
    """The release in an ELF kernel's ``Linux version`` banner."""
    match = re.search(rb"Linux version (\S+) \(", image)
    return match.group(1).decode("ascii", "replace") if match else None


async def kernel_file_version(path: Path) -> str:
    """The release of a kernel file given as an override (bzImage or ELF)."""
    try:
        image = await anyio.Path(path).read_bytes()
    except OSError as exc:
        raise OverridePathError(f"KERNEL_PATH {path}: {exc.strerror}") from exc
    version = elf_version(image) if image.startswith(_ELF_MAGIC) else bzimage_version(image)
    if version is None:
        raise OverridePathError(f"KERNEL_PATH {path} is neither a bzImage nor an ELF kernel")
    return version
