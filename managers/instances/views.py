"""The derived state, and an instance as callers see it.

State is never stored: no VMM handle reads ``Standby`` when ``standby/`` holds a committed
snapshot, else ``Stopped`` (``Created`` before the first boot); a VMM is asked, unless
``Vmm.known_state()`` proves it sat still since it was last asked.
"""

from __future__ import annotations

from managers.agent import AgentInfo
from managers.hypervisors import HypervisorError, VmmDied, VmmNotFound, VmState
from managers.instances.context import Context, Live, log
from managers.instances.types import Instance, InstanceRecord, InstanceState

_S = InstanceState
_NO_VMM = frozenset({_S.CREATED, _S.STOPPED, _S.STANDBY})


def awake_state(live: Live) -> InstanceState:
    """A running VM: ``Initializing`` until the program started, ``Shutdown`` once it ended."""
    status = live.pump.status
    if status.exited_at is not None:
        return _S.SHUTDOWN
    return _S.RUNNING if status.program_started_at else _S.INITIALIZING


def from_vm_state(vm_state: VmState, live: Live) -> InstanceState:
    if vm_state is VmState.PAUSED:
        return _S.PAUSED
    if vm_state is VmState.SHUTDOWN:
        return _S.SHUTDOWN
    if vm_state is VmState.NOT_CREATED:
        return _S.UNKNOWN
    return awake_state(live)


async def state(ctx: Context, record: InstanceRecord, live: Live, *, owner: bool) -> InstanceState:
    """The instance's state. Only the lock's ``owner`` may clean up after a VMM that
    vanished; a reader that does not hold the lock just reports it."""
    vmm = live.vmm
    if vmm is None:
        if live.unreachable is not None:
            return _S.UNKNOWN
        if ctx.paths.instance_standby(record.id).is_dir():
            return _S.STANDBY
        return _S.STOPPED if record.booted else _S.CREATED
    vm_state = vmm.known_state()
    if vm_state is not None:
        return from_vm_state(vm_state, live)
    try:
        vm_state = await vmm.state()
    except (VmmNotFound, VmmDied):
        if owner and live.vmm is vmm:
            log.warning("the VMM exited", extra={"instance_id": record.id})
            await ctx.end_vmm(record.id, live)
            await ctx.stop_pump(record.id, live)
            await ctx.delete_tap(record.id)
            ctx.changed("instance.failed", snapshot(record, live, _S.STOPPED))
        return _S.STOPPED
    except HypervisorError as error:
        log.warning("VMM does not answer: %s", error, extra={"instance_id": record.id})
        return _S.UNKNOWN
    return from_vm_state(vm_state, live)


async def view(ctx: Context, record: InstanceRecord) -> Instance:
    live = ctx.live_for(record.id)
    known = live.vmm.known_state() if live.vmm is not None else None
    if known is not None:
        # Nothing to ask and nothing to clean up: no need for the lock.
        current = from_vm_state(known, live)
    elif live.lock.locked():
        # An action is under way; report without waiting for it or touching anything.
        current = await state(ctx, record, live, owner=False)
    else:
        async with live.lock:
            current = await state(ctx, record, live, owner=True)
    return snapshot(record, live, current)


async def state_view(ctx: Context, record: InstanceRecord, live: Live) -> Instance:
    """The instance now, for the holder of its lock."""
    return snapshot(record, live, await state(ctx, record, live, owner=True))


def snapshot(record: InstanceRecord, live: Live, current: InstanceState) -> Instance:
    """The instance in ``current`` state, without asking anything."""
    pid = live.vmm.pid if live.vmm is not None else None
    if current in _NO_VMM:
        # A VMM found dead by a reader while the lock's owner is still ending it: the state
        # already says it is gone, so its pid must not say otherwise.
        pid = None
    return Instance(
        id=record.id,
        name=record.name,
        state=current,
        guest=live.pump.status,
        record=record,
        pid=pid or None,
        restarts=live.restarts,
        agent=live.agent.info if live.agent is not None else AgentInfo(ready=False),
    )
