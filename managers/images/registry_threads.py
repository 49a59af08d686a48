"""Worker threads for registry I/O, kept apart from everyone else's.

The registry client is synchronous (the oras SDK on requests), so every manifest fetch and blob
download holds a worker thread until it returns, which for a registry that accepts connections
and then says nothing is the whole read timeout. In anyio's default pool (40 threads, shared
by the whole process: file I/O, the log pump, record writes) forty such calls would leave every
other request waiting. Registry calls therefore run in a pool of their own, at most
:data:`TOTAL` threads, and at most :data:`PER_HOST` of them for any one registry, so one slow
registry neither starves the process nor the pulls from other registries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

TOTAL = 16
PER_HOST = 4


class RegistryThreads:
    """``run(host, fn)`` runs ``fn`` in a worker thread within both limits."""

    def __init__(self, total: int = TOTAL, per_host: int = PER_HOST) -> None:
        self._total = anyio.CapacityLimiter(total)
        self._per_host = per_host
        self._hosts: dict[str, anyio.CapacityLimiter] = {}

    async def run(self, host: str, fn: Callable[[], T], *, abandon_on_cancel: bool = False) -> T:
        """``fn()`` in a registry thread, once ``host`` has one free."""
        limiter = self._hosts.get(host)
        if limiter is None:
            limiter = self._hosts[host] = anyio.CapacityLimiter(self._per_host)
        async with limiter:
            return await anyio.to_thread.run_sync(
                fn, limiter=self._total, abandon_on_cancel=abandon_on_cancel
            )
