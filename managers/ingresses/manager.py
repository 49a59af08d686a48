"""The ingresses manager: host ports forwarded into instances, from records on disk."""

from __future__ import annotations

import builtins
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Protocol as TypingProtocol

import anyio

from managers.clock import now_iso
from managers.failpoints import failpoint
from managers.ingresses import ports
from managers.ingresses.errors import (
    IngressExists,
    IngressNotFound,
    InstanceWithoutNetwork,
    InvalidIngressSpec,
    PortInUse,
    TargetNotFound,
)
from managers.ingresses.store import IngressStore
from managers.ingresses.types import CreateIngress, IngressRecord, Target
from managers.network import Forward
from managers.paths import Paths

log = logging.getLogger(__name__)

# The instance an id or name stands for, with its address; None when there is no such
# instance (or it is being deleted).
TargetLookup = Callable[[str], Awaitable[Target | None]]
# Told of every change after it happened: ("ingress.created", the ingress).
ChangeCallback = Callable[[str, IngressRecord], None]


class ForwardingPort(TypingProtocol):
    """What ingresses need of the network subsystem (``NetworkManager`` is the real one)."""

    async def publish(self, forwards: Sequence[Forward]) -> None: ...

    async def is_local(self, address: IPv4Address) -> bool: ...


class IngressManager:
    """Every ingress of the node: records on disk, DNAT rules in the network's table.

    The record is the commit point: a create writes it and then publishes the table, a delete
    removes it and then publishes. A crash between the two is settled by :meth:`reconcile`,
    which publishes the table the records describe, so the rules never outlive their records
    for longer than a restart and never go missing for longer than one either.
    """

    def __init__(
        self,
        paths: Paths,
        network: ForwardingPort | None,
        *,
        lookup: TargetLookup,
        on_change: ChangeCallback | None = None,
    ) -> None:
        self._store = IngressStore(paths)
        self._network = network
        self._lookup = lookup
        self._on_change = on_change
        self._records: dict[str, IngressRecord] = {}
        # One change at a time: a port's owner is decided, recorded and published whole.
        self._lock = anyio.Lock()

    async def __aenter__(self) -> IngressManager:
        """Load the records (quarantining unreadable ones) and publish them as they stand, so
        the rules are back before the instances are (:meth:`reconcile` then settles them)."""
        scan = await anyio.to_thread.run_sync(self._store.scan)
        for name, reason in scan.quarantined.items():
            log.error("quarantined ingress %s: %s", name, reason)
        self._records = {record.id: record for record in scan.records}
        await self._publish()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Nothing to close: the rules stay in the kernel for the VMMs that outlive us."""

    async def reconcile(self) -> None:
        """Drop ingresses whose instance is gone, follow moved addresses, publish the table."""
        async with self._lock:
            for record in builtins.list(self._records.values()):
                target = await self._lookup(record.instance_id)
                if target is None or target.address is None:
                    log.info("ingress %s: its instance %s is gone", record.id, record.instance_id)
                    await self._remove(record)
                elif target.address != record.target:
                    moved = replace(record, target=target.address)
                    await anyio.to_thread.run_sync(self._store.save, moved)
                    self._records[record.id] = moved
            await self._publish()

    async def list(self) -> builtins.list[IngressRecord]:
        """Every ingress, oldest first."""
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))

    async def get(self, key: str) -> IngressRecord:
        """One ingress by id or name."""
        return self._records[self._resolve(key)]

    async def create(self, request: CreateIngress) -> IngressRecord:
        """Forward ``host_port`` on the host to ``guest_port`` of an instance with a network."""
        request.check()
        async with self._lock:
            if any(r.name == request.name for r in self._records.values()):
                raise IngressExists(request.name)
            target = await self._lookup(request.instance)
            if target is None:
                raise TargetNotFound(request.instance)
            if self._network is None or target.address is None:
                where = (
                    "this node has no networking"
                    if self._network is None
                    else (f"instance {target.instance_id} was created without a network")
                )
                raise InstanceWithoutNetwork(
                    f"cannot forward a port to it: {where}", {"instance_id": target.instance_id}
                )
            for other in self._records.values():
                if other.overlaps(request.protocol, request.listen_address, request.host_port):
                    raise PortInUse(
                        f"host port {request.host_port}/{request.protocol.value} is taken by "
                        f"ingress {other.name!r}",
                        {"host_port": request.host_port, "ingress_id": other.id},
                    )
            listen = request.listen_address
            if listen is not None and not await self._network.is_local(listen):
                raise InvalidIngressSpec(
                    f"listen_address {listen} is not an address of this host",
                    {"listen_address": str(listen)},
                )
            await anyio.to_thread.run_sync(
                ports.check_free, request.protocol, listen, request.host_port
            )
            record = IngressRecord(
                id=self._new_id(),
                name=request.name,
                instance_id=target.instance_id,
                target=target.address,
                host_port=request.host_port,
                guest_port=request.guest_port,
                protocol=request.protocol,
                listen_address=request.listen_address,
                created_at=now_iso(),
            )
            await anyio.to_thread.run_sync(self._store.commit, record)
            self._records[record.id] = record
            failpoint("ingress.recorded")
            try:
                await self._publish()
            except BaseException:
                # The rules could not be installed: the ingress never existed, and the table
                # goes back to what the records say (best effort: it may be what failed).
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._store.remove, record.id)
                    del self._records[record.id]
                    with contextlib.suppress(Exception):
                        await self._publish()
                raise
        self._changed("ingress.created", record)
        return record

    async def delete(self, key: str) -> None:
        """Stop forwarding and forget the ingress."""
        async with self._lock:
            record = self._records[self._resolve(key)]
            await self._remove(record)
            await self._publish()

    async def instance_removed(self, instance_id: str) -> None:
        """Delete every ingress of an instance that is being deleted."""
        async with self._lock:
            mine = [r for r in self._records.values() if r.instance_id == instance_id]
            for record in mine:
                await self._remove(record)
            # Even with none of its own: a rule left by a failed publish must not outlive it.
            await self._publish()

    # -- internals --------------------------------------------------------------------------
    async def _remove(self, record: IngressRecord) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._store.remove, record.id)
            del self._records[record.id]
        failpoint("ingress.removed")
        self._changed("ingress.deleted", record)

    async def _publish(self) -> None:
        if self._network is None:
            return
        forwards = [record.forward() for record in await self.list()]
        with anyio.CancelScope(shield=True):
            await self._network.publish(forwards)

    def _resolve(self, key: str) -> str:
        if key in self._records:
            return key
        for record in self._records.values():
            if record.name == key:
                return record.id
        raise IngressNotFound(key)

    def _new_id(self) -> str:
        while (candidate := secrets.token_hex(6)) in self._records:
            continue
        return candidate

    def _changed(self, kind: str, record: IngressRecord) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(kind, record)
        except Exception:
            log.exception("reporting %s for ingress %s failed", kind, record.id)
