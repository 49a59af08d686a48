"""An instance's link to its agent: connect, hand-shake, set the clock, and reconnect.

While the instance's VMM runs, :meth:`AgentLink.run` keeps one :class:`~.channel.Channel`
open. Each successful handshake sets the guest's clock from the host's before the channel is
offered to anyone, so a guest restored from a snapshot never serves a request with the time
it was frozen at. When the connection ends (standby, stop, an agent restart) the open
operations fail with the reason given to :meth:`AgentLink.stop`, and a new connection is tried.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import ByteStream

from .channel import Channel
from .errors import AgentDisconnected, AgentError, AgentUnavailable, GuestOperationFailed
from .operations import set_time
from .types import AgentInfo

log = logging.getLogger("managers.agent")

Opener = Callable[[], Awaitable[ByteStream]]
_FIRST_RETRY = 0.02
_MAX_RETRY = 1.0


class AgentLink:
    """The channel to one instance's agent, kept up while its VMM runs."""

    def __init__(self, instance_id: str, opener: Opener) -> None:
        self.instance_id = instance_id
        self._opener = opener
        self._channel: Channel | None = None
        self._ready = anyio.Event()
        self._stopped = False
        self._stop_reason = "the instance's VMM ended"
        self._version: str | None = None
        self._generation = 0  # handshakes completed (each one set the clock)
        self._changed = anyio.Event()
        self._cancel: anyio.CancelScope | None = None

    @property
    def info(self) -> AgentInfo:
        """Whether an agent answers now, and its build."""
        ready = self._channel is not None and self._ready.is_set()
        return AgentInfo(ready=ready, version=self._version if ready else None)

    @property
    def generation(self) -> int:
        return self._generation

    async def run(self) -> None:
        """Connect and reconnect until :meth:`stop`; never raises."""
        with anyio.CancelScope() as scope:
            self._cancel = scope
            if self._stopped:
                return
            delay = _FIRST_RETRY
            while not self._stopped:
                try:
                    connected = await self._serve_once()
                except Exception:
                    # Whatever a guest does must not end the manager's task group.
                    log.exception("the link to the agent of %s failed", self.instance_id)
                    connected = False
                if self._stopped:
                    break
                delay = _FIRST_RETRY if connected else min(delay * 2, _MAX_RETRY)
                await anyio.sleep(delay)

    async def _serve_once(self) -> bool:
        """One connection, until it ends; True if the handshake completed."""
        try:
            stream = await self._opener()
        except (OSError, AgentError) as exc:
            log.debug("agent of %s not reachable yet: %s", self.instance_id, exc)
            return False
        channel = Channel(stream)
        self._channel = channel
        handshaken = False
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(channel.run)
                try:
                    await self._handshake(channel)
                    handshaken = True
                    await channel.closed.wait()
                except AgentError as exc:
                    log.debug("agent of %s: %s", self.instance_id, exc)
                tasks.cancel_scope.cancel()
        finally:
            self._ready = anyio.Event()
            self._channel = None
            self._notify()
            with anyio.CancelScope(shield=True):
                await channel.close(self._stop_reason if self._stopped else "the agent went away")
        return handshaken

    async def _handshake(self, channel: Channel) -> None:
        # SET_TIME goes right behind HELLO, without waiting for HELLO_OK: the agent answers
        # both in order, and a restored guest spares a round trip before it reads Running.
        await channel.hello_sent.wait()
        try:
            await set_time(channel, time.time_ns())
        except GuestOperationFailed as exc:
            log.warning("agent of %s could not set the clock: %s", self.instance_id, exc)
        hello = await channel.wait_ready()
        self._version = hello.agent
        self._generation += 1
        self._ready.set()
        self._notify()
        log.info("agent of %s is up (%s)", self.instance_id, hello.agent)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def channel(self, wait_seconds: float) -> Channel:
        """The ready channel, waiting up to ``wait_seconds`` for one."""
        with anyio.move_on_after(wait_seconds):
            while not self._stopped:
                channel = self._channel
                if channel is not None and self._ready.is_set() and not channel.closed.is_set():
                    return channel
                await self._changed.wait()
        if self._stopped:
            raise AgentDisconnected(self._stop_reason)
        raise AgentUnavailable(
            f"the agent of instance {self.instance_id} did not answer within {wait_seconds:g} s"
        )

    async def handshake_after(self, generation: int, wait_seconds: float) -> bool:
        """Wait until a handshake newer than ``generation`` set the clock; False on timeout."""
        with anyio.move_on_after(wait_seconds):
            while self._generation <= generation and not self._stopped:
                await self._changed.wait()
        return self._generation > generation

    async def stop(self, reason: str) -> None:
        """Close the channel (open operations fail with ``reason``) and stop reconnecting."""
        self._stopped = True
        self._stop_reason = reason
        self._notify()
        channel = self._channel
        if channel is not None:
            # Its run ends by itself once the channel is closed (see Channel.close).
            with contextlib.suppress(Exception):
                await channel.close(reason)
        elif self._cancel is not None:
            self._cancel.cancel()  # connecting, or waiting to retry
