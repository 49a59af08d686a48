"""The instance manager: the public surface of the instances subsystem.

It resolves ids and names, takes the instance's lock, checks the transition table and
hands the work to the operation modules (``create.py``, ``actions.py``, ``standby.py``,
``recovery.py``, ``supervise.py``, ``views.py``), which share a
:class:`~managers.instances.context.Context`.
One lock per instance serialises its actions; different instances never wait on each
other. The state is never stored: it is derived from the files and the VMM.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from managers.agent import AgentUnavailable, Channel
from managers.guest import GuestArtifacts
from managers.hypervisors import HypervisorBackend
from managers.hypervisors import WrongState as HypervisorWrongState
from managers.instances import (
    actions,
    bandwidth,
    create,
    recovery,
    standby,
    supervise,
    views,
    volumes,
)
from managers.instances.allocations import allocations, boot_demand
from managers.instances.context import (
    AdmissionPort,
    ChangeCallback,
    Context,
    ImageSource,
    IngressPort,
    Live,
    NetworkPort,
    VolumePort,
    log,
)
from managers.instances.errors import (
    ActionFailed,
    InstanceQuarantined,
    InvalidInstanceSpec,
    WrongInstanceState,
)
from managers.instances.logs import (
    DEFAULT_RETENTION_BYTES,
    LogRead,
    LogTally,
    SegmentedLog,
)
from managers.instances.transitions import TRANSITIONS, Action
from managers.instances.types import (
    LOG_SOURCES,
    CreateRequest,
    GuestStatus,
    Instance,
    InstanceRecord,
    InstanceState,
    VolumeRequest,
)
from managers.network import Bandwidth
from managers.paths import Paths
from managers.resources import Allocation

# How long an exec or file request waits for an agent that is not up yet (just booted, or
# reconnecting after a restore).
AGENT_WAIT_SECONDS = 10.0

_Work = Callable[[Context, InstanceRecord, Live, InstanceState], Awaitable[None]]
_WORK: dict[Action, _Work] = {
    Action.START: actions.start,
    Action.STOP: actions.stop,
    Action.REBOOT: actions.reboot,
    Action.PAUSE: actions.pause,
    Action.RESUME: actions.resume,
    Action.STANDBY: standby.standby,
    Action.RESTORE: standby.restore,
}
# The event each action's success reports.
_CHANGES: dict[Action, str] = {
    Action.START: "instance.started",
    Action.STOP: "instance.stopped",
    Action.REBOOT: "instance.rebooted",
    Action.PAUSE: "instance.paused",
    Action.RESUME: "instance.resumed",
    Action.STANDBY: "instance.standby",
    Action.RESTORE: "instance.restored",
}
# The actions that start a VMM, so take vCPUs and memory: the resource manager admits them.
_BOOTS = frozenset({Action.START, Action.RESTORE})
# The VMM itself refuses these in the wrong state, so it is asked once and the state is
# read only to explain a refusal.
_VMM_CHECKED = {Action.PAUSE: InstanceState.RUNNING, Action.RESUME: InstanceState.PAUSED}


class InstanceManager:
    """Instances of one node: create, read, act on, delete, and read their logs."""

    def __init__(
        self,
        paths: Paths,
        *,
        images: ImageSource,
        backends: Mapping[str, HypervisorBackend],
        default_hypervisor: str,
        artifacts: Callable[[], Awaitable[GuestArtifacts]],
        network: NetworkPort | None = None,
        stop_grace_seconds: float = 10.0,
        on_change: ChangeCallback | None = None,
        volumes: VolumePort | None = None,
        admission: AdmissionPort | None = None,
        log_tally: LogTally | None = None,
        ingresses: IngressPort | None = None,
        log_retention_bytes: int = DEFAULT_RETENTION_BYTES,
    ) -> None:
        self._ctx = Context(
            paths,
            images=images,
            backends=backends,
            default_hypervisor=default_hypervisor,
            artifacts=artifacts,
            network=network,
            stop_grace_seconds=stop_grace_seconds,
            on_change=on_change,
            volumes=volumes,
            admission=admission,
            log_tally=log_tally,
            ingresses=ingresses,
            log_retention_bytes=log_retention_bytes,
        )
        self._reserve = anyio.Lock()
        self._tg: TaskGroup | None = None
        self._exit_stack = contextlib.AsyncExitStack()

    # -- the manager's own lifecycle --------------------------------------------------
    async def __aenter__(self) -> InstanceManager:
        """Load every instance, settle what a crash left, re-adopt running VMMs."""
        ctx = self._ctx
        self._tg = await self._exit_stack.enter_async_context(anyio.create_task_group())
        self._tg.start_soon(ctx.pumps.run)
        tasks = self._tg

        def spawn(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
            tasks.start_soon(work)

        ctx.spawn = spawn
        await recovery.recover(ctx)
        self._tg.start_soon(supervise.supervise, ctx)
        # The host bridge is made on first use, so a node whose instances never ask for a
        # network never has its interfaces touched. One that already has the bridge is
        # adopted now, which also removes TAPs a crash left behind.
        if ctx.network is not None and ctx.network.bridge_exists():
            await ctx.ensure_network()
            await bandwidth.reapply(ctx)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop following logs; VMMs keep running and are re-adopted by the next start."""
        for live in self._ctx.live.values():
            await self._ctx.stop_agent(live, "the dataplane is shutting down")
            if live.vmm is not None:
                with contextlib.suppress(Exception):
                    await live.vmm.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        await self._exit_stack.aclose()
        self._tg = None

    # -- queries ----------------------------------------------------------------------
    async def list(self, state: InstanceState | None = None) -> builtins.list[Instance]:
        """Every instance, oldest first, then quarantined ones by id; optionally of one state."""
        ctx = self._ctx
        found = [
            await views.view(ctx, record)
            for record in list(ctx.records.values())
            # One deleted while an earlier one was being read is not brought back to life.
            if record.id in ctx.records
        ]
        found.sort(key=lambda instance: instance.record.created_at if instance.record else "")
        found.extend(await self._quarantined())
        return [i for i in found if state is None or i.state == state]

    async def get(self, key: str) -> Instance:
        """One instance by id or name (a quarantined one reads ``Unknown``)."""
        ctx = self._ctx
        try:
            instance_id = ctx.resolve(key)
        except InstanceQuarantined:
            return self._quarantined_view(key)
        return await views.view(ctx, ctx.record(instance_id))

    async def allocations(self) -> builtins.list[Allocation]:
        """What each instance holds of the node: vCPUs and memory while it runs, its overlay."""
        return allocations(self._ctx)

    # -- create / delete --------------------------------------------------------------
    async def create(self, request: CreateRequest) -> Instance:
        """Make an instance from an image, booted unless ``request.start`` is false."""
        record = await create.create(self._ctx, request, self._reserve)
        instance = await views.view(self._ctx, record)
        self._ctx.changed("instance.created", instance)
        if record.booted:
            self._ctx.changed("instance.started", instance)
        return instance

    async def delete(self, key: str) -> None:
        """End the instance's VMM and remove it with its disks, TAP and address."""
        ctx = self._ctx
        instance_id = ctx.resolve(key)
        live = ctx.live_for(instance_id)
        async with live.lock:
            # Another delete may have finished while this one waited for the lock.
            record = ctx.record(instance_id)
            await create.delete(ctx, record, live)
        ctx.changed("instance.deleted", views.snapshot(record, live, InstanceState.STOPPED))

    # -- actions ----------------------------------------------------------------------
    async def start_instance(self, key: str) -> Instance:
        """Boot a created, stopped or shut-down instance in a fresh VMM."""
        return await self._perform(key, Action.START)

    async def stop(self, key: str) -> Instance:
        """Power the guest off (forcing it after the grace period) and end its VMM."""
        return await self._perform(key, Action.STOP)

    async def reboot(self, key: str) -> Instance:
        """Reset the running VM; the program starts again."""
        return await self._perform(key, Action.REBOOT)

    async def pause(self, key: str) -> Instance:
        """Stop the vCPUs; memory stays."""
        return await self._perform(key, Action.PAUSE)

    async def resume(self, key: str) -> Instance:
        """Run the vCPUs of a paused VM again."""
        return await self._perform(key, Action.RESUME)

    async def standby(self, key: str) -> Instance:
        """Snapshot the VM to disk and end its VMM."""
        return await self._perform(key, Action.STANDBY)

    async def restore(self, key: str) -> Instance:
        """Bring a standby instance back from its snapshot in a fresh VMM."""
        return await self._perform(key, Action.RESTORE)

    # -- volumes ----------------------------------------------------------------------
    async def set_bandwidth(self, key: str, limits: Bandwidth) -> Instance:
        """Replace the bandwidth limits: on the TAP now if the VMM runs, else from its next boot."""
        return await self._change(
            key, Action.SET_BANDWIDTH, functools.partial(bandwidth.change, bandwidth=limits)
        )

    async def attach_volume(self, key: str, request: VolumeRequest) -> Instance:
        """Attach a volume: hot-plugged and mounted if Running, else for the next boot."""
        return await self._change(
            key, Action.ATTACH_VOLUME, functools.partial(volumes.attach, request=request)
        )

    async def detach_volume(self, key: str, volume: str) -> Instance:
        """Detach a volume: unmounted and unplugged if Running, else from the next boot."""
        return await self._change(
            key, Action.DETACH_VOLUME, functools.partial(volumes.detach, key=volume)
        )

    async def _change(
        self,
        key: str,
        action: Action,
        work: Callable[[Context, InstanceRecord, Live, InstanceState], Awaitable[InstanceRecord]],
    ) -> Instance:
        ctx = self._ctx
        instance_id = ctx.resolve(key)
        live = ctx.live_for(instance_id)
        async with live.lock:
            record = ctx.record(instance_id)
            current = await views.state(ctx, record, live, owner=True)
            transition = TRANSITIONS[action]
            if current not in transition.accepts:
                raise WrongInstanceState(instance_id, action, current, transition.allowed())
            record = await work(ctx, record, live, current)
            return views.snapshot(record, live, current)

    # -- the guest agent --------------------------------------------------------------
    async def agent(self, key: str, wait_seconds: float = AGENT_WAIT_SECONDS) -> Channel:
        """The channel to a Running instance's agent, waiting up to ``wait_seconds`` for it."""
        ctx = self._ctx
        instance_id = ctx.resolve(key)
        live = ctx.live_for(instance_id)
        record = ctx.record(instance_id)
        current = await views.state(ctx, record, live, owner=False)
        if current is not InstanceState.RUNNING:
            raise WrongInstanceState(
                instance_id, Action.EXEC, current, TRANSITIONS[Action.EXEC].allowed()
            )
        link = live.agent
        if link is None:
            raise AgentUnavailable(f"instance {instance_id} has no channel to its agent")
        return await link.channel(wait_seconds)

    async def _perform(self, key: str, action: Action) -> Instance:
        ctx = self._ctx
        instance_id = ctx.resolve(key)
        transition = TRANSITIONS[action]
        work = _WORK[action]
        live = ctx.live_for(instance_id)
        async with live.lock:
            record = ctx.record(instance_id)
            assumed = _VMM_CHECKED.get(action)
            try:
                if assumed is not None and live.vmm is not None and live.unreachable is None:
                    try:
                        await work(ctx, record, live, assumed)
                    except HypervisorWrongState:
                        current = await views.state(ctx, record, live, owner=True)
                        raise WrongInstanceState(
                            instance_id, action, current, transition.allowed()
                        ) from None
                else:
                    current = await views.state(ctx, record, live, owner=True)
                    if current not in transition.accepts:
                        raise WrongInstanceState(instance_id, action, current, transition.allowed())
                    if action in _BOOTS:
                        async with ctx.admitted(instance_id, boot_demand(record)):
                            await work(ctx, record, live, current)
                    else:
                        await work(ctx, record, live, current)
            except ActionFailed:
                failed = await views.state_view(ctx, ctx.record(instance_id), live)
                ctx.changed("instance.failed", failed)
                raise
            if action is Action.START:
                # Started by hand: a pending restart is moot and the count begins again.
                live.restarts, live.restart_at = 0, None
            log.info("%s done", action, extra={"instance_id": instance_id})
            after = transition.leads_to
            assert after is not None
            if after is InstanceState.INITIALIZING:
                after = views.awake_state(live)
            instance = views.snapshot(ctx.record(instance_id), live, after)
            ctx.changed(_CHANGES[action], instance)
            return instance

    # -- logs -------------------------------------------------------------------------
    async def log_for(self, key: str, source: str) -> SegmentedLog:
        """The segmented log of one source (``app``, ``console``, ``vmm`` or ``dataplane``)."""
        if source not in LOG_SOURCES:
            raise InvalidInstanceSpec(f"unknown log source {source!r}")
        return SegmentedLog(self._ctx.paths.instance_logs(self._ctx.resolve(key)), source)

    async def read_log(
        self, key: str, source: str, *, after: int | None, tail: int | None
    ) -> LogRead:
        """Lines to send first: after an offset (resume), the last ``tail``, or all.

        The pump is drained first, so what the guest printed is there; a last line
        without its newline is included once no VMM can finish it. A resume starts at the
        next line boundary and says how many bytes rotation dropped before it.
        """
        log_file = await self.log_for(key, source)
        live = self._ctx.live.get(self._ctx.resolve(key))
        if live is not None:
            await anyio.to_thread.run_sync(live.pump.drain)
        final = live is None or live.vmm is None

        def read() -> LogRead:
            if after is not None:
                resume = log_file.resume(after)
                lines, position = log_file.read_lines(resume.offset, final=final)
                return LogRead(lines, position, resume.dropped, resume.offset)
            if tail is not None:
                return LogRead(*log_file.tail(tail, final=final))
            return LogRead(*log_file.read_lines(0, final=final))

        return await anyio.to_thread.run_sync(read)

    async def output_copied(self, key: str) -> None:
        """Wait until the log pump next copies output of the instance into its logs."""
        await self._ctx.pumps.copied(self._ctx.resolve(key))

    async def log_extent(self, key: str, source: str) -> tuple[int, int]:
        """(the oldest offset kept, the end) of one source's log, the pump drained first."""
        log_file = await self.log_for(key, source)
        live = self._ctx.live.get(self._ctx.resolve(key))
        if live is not None:
            await anyio.to_thread.run_sync(live.pump.drain)
        return await anyio.to_thread.run_sync(lambda: (log_file.start(), log_file.end()))

    async def finished(self, key: str) -> Instance | None:
        """The instance once nothing more will be written to its logs; None while it may be.

        That is when no action is under way, no restart is due, and either it has no VMM or
        its program has exited and the VMM is kept (``keep_on_exit``); otherwise the exit is
        final once the supervisor has released the VMM, so the state said last is ``Stopped``.
        Raises ``InstanceNotFound`` once it is deleted.
        """
        ctx = self._ctx
        instance_id = ctx.resolve(key)
        record = ctx.record(instance_id)
        live = ctx.live_for(instance_id)
        if live.lock.locked() or live.unreachable is not None:
            return None
        if record.restart_pending or live.restart_at is not None:
            return None
        if live.vmm is not None and (live.pump.status.exited_at is None or not record.keep_on_exit):
            return None
        await anyio.to_thread.run_sync(live.pump.drain)
        return await views.view(ctx, record)

    # -- quarantined instances --------------------------------------------------------
    async def _quarantined(self) -> builtins.list[Instance]:
        quarantined = self._ctx.quarantined
        if not quarantined:
            return []
        # An operator removes a quarantined folder by hand; it is listed while it is there.
        gone = await anyio.to_thread.run_sync(
            lambda: [key for key, info in quarantined.items() if not Path(info.path).exists()]
        )
        for key in gone:
            quarantined.pop(key, None)
        return [self._quarantined_view(key) for key in sorted(quarantined)]

    def _quarantined_view(self, instance_id: str) -> Instance:
        return Instance(
            id=instance_id,
            name=None,
            state=InstanceState.UNKNOWN,
            guest=GuestStatus(),
            record=None,
            quarantine=self._ctx.quarantined[instance_id],
        )
