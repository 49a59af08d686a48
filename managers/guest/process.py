"""Running host tools without blocking the event loop, with typed errors."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio

from .errors import ArtifactError, ToolMissingError


async def run_tool(
    argv: Sequence[str | Path],
    *,
    error: type[ArtifactError],
    what: str,
    cwd: Path | None = None,
) -> bytes:
    """Run ``argv``; return its stdout, or raise ``error`` with the tail of its stderr."""
    args = [str(a) for a in argv]
    try:
        result = await anyio.run_process(args, cwd=cwd, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ToolMissingError(f"{what}: {args[0]} is not installed") from exc
    if result.returncode != 0:
        tail = result.stderr.decode("utf-8", "replace").strip()[-800:]
        raise error(f"{what}: {args[0]} exited with {result.returncode}: {tail}")
    return result.stdout
