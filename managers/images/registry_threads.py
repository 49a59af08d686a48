"""Worker threads for registry I/O, kept apart from everyone else's.

The registry client is synchronous (the oras SDK on requests), so every manifest fetch and blob
download holds a worker thread until it returns, which for a registry that accepts connections
and then says nothing is the whole read timeout. In anyio's default pool (40 threads, shared
by the whole process: file I/O, the log pump, record writes) forty such calls would leave every
other request waiting. Registry calls therefore run in a pool of their own, at most
:data:`TOTAL` threads, and at most :data:`PER_HOST` of them for any one registry, so one slow
registry neither starves the process nor the pulls from other registries.

A call whose caller is cancelled keeps its places until its thread has returned (the caller's
``stop`` is set first, for a call that watches one): the limits count threads, not callers.
"""

from __future__ import annotations

import threading
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
        # The threads themselves, apart from anyio's default pool: the calls, and the threads
        # that wait for an abandoned call to return (one per such call), each at most total.
        self._calls = anyio.CapacityLimiter(total)
        self._waiters = anyio.CapacityLimiter(total)

    async def run(
        self, host: str, fn: Callable[[], T], *, stop: threading.Event | None = None
    ) -> T:
        """``fn()`` in a registry thread, once ``host`` has one free. On cancellation ``stop``
        is set and the thread waited for (shielded) before the cancellation goes on."""
        limiter = self._hosts.get(host)
        if limiter is None:
            limiter = self._hosts[host] = anyio.CapacityLimiter(self._per_host)
        finished = threading.Event()

        def call() -> T:
            try:
                return fn()
            finally:
                finished.set()

        try:
            async with limiter, self._total:
                try:
                    return await anyio.to_thread.run_sync(
                        call, limiter=self._calls, abandon_on_cancel=True
                    )
                except anyio.get_cancelled_exc_class():
                    if stop is not None:
                        stop.set()
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(finished.wait, limiter=self._waiters)
                    raise
        finally:
            stats = limiter.statistics()
            if not stats.borrowed_tokens and not stats.tasks_waiting:
                self._hosts.pop(host, None)
