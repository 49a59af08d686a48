"""What happens when an instance's program exits: release its VMM, restart it by policy.

A program that exited leaves a powered-off guest whose VMM still holds the guest's memory.
Unless the instance asked to be kept (``keep_on_exit``), its VMM and TAP are ended within a
tick and the instance reads ``Stopped``, its exit code kept. A ``restart_policy`` of
``always``, or ``on-failure`` after a non-zero exit (or a program the guest could not run),
boots it again after a back-off that doubles from 1 s up to 60 s, and starts again from
1 s once a run lasted a minute. A restart due is recorded (``restart_pending``), so one a
dataplane restart cut short happens as soon as the dataplane is back. ``restarts`` counts the
restarts since the instance was last started by hand (or since this dataplane started). An
explicit stop, standby or delete ends the VMM first, so it is never followed by a restart; an
explicit start settles a pending one.
"""

from __future__ import annotations

from datetime import datetime

import anyio

from managers.instances import actions, views
from managers.instances.context import Context, Live, log
from managers.instances.types import GuestStatus, InstanceRecord, InstanceState, RestartPolicy

TICK_SECONDS = 0.25
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
STABLE_RUN_SECONDS = 60.0


def wants_restart(record: InstanceRecord, status: GuestStatus) -> bool:
    """Whether ``record``'s policy restarts a program that ended with ``status``."""
    if record.restart_policy is RestartPolicy.ALWAYS:
        return True
    failed = status.error is not None or (status.exit_code or 0) != 0
    return record.restart_policy is RestartPolicy.ON_FAILURE and failed


def backoff(restarts: int, status: GuestStatus) -> tuple[float, int]:
    """The delay before the next restart, and the restart count to carry on with."""
    if _ran_for(status) >= STABLE_RUN_SECONDS:
        restarts = 0
    delay = min(FIRST_BACKOFF_SECONDS * 2**restarts, MAX_BACKOFF_SECONDS)
    return delay, restarts + 1


async def supervise(ctx: Context) -> None:
    """Watch every instance's program; runs for the manager's lifetime."""
    for record in list(ctx.records.values()):
        # A back-off a dataplane restart cut short: the restart is due now.
        if record.restart_pending:
            ctx.live_for(record.id).restart_at = anyio.current_time()
    while True:
        await anyio.sleep(TICK_SECONDS)
        now = anyio.current_time()
        for instance_id, live in list(ctx.live.items()):
            status = live.pump.status
            try:
                if live.vmm is not None and status.exited_at is not None:
                    if live.handled_boot != status.boot:
                        await _exited(ctx, instance_id, live, status)
                elif live.restart_at is not None and now >= live.restart_at:
                    await _restart(ctx, instance_id, live)
            except Exception:
                # One instance's failure must not end the watch over the others.
                log.exception("supervising the program failed", extra={"instance_id": instance_id})


async def _exited(ctx: Context, instance_id: str, live: Live, status: GuestStatus) -> None:
    async with live.lock:
        record = ctx.records.get(instance_id)
        # Re-checked under the lock: an action may have ended or replaced the VMM meanwhile.
        if record is None or live.vmm is None or live.pump.status.boot != status.boot:
            return
        await ctx.stop_agent(live, "the program exited and the guest powered off")
        restart = wants_restart(record, status)
        if restart:
            # Recorded before the VMM is released, so a dataplane killed during the release
            # or the back-off still restarts the program when it is back.
            record = await ctx.save(record.evolve(restart_pending=True))
        if restart or not record.keep_on_exit:
            await actions.stop(ctx, record, live, InstanceState.SHUTDOWN)
        # Only once the VMM is released: a stop that failed is tried again at the next tick.
        live.handled_boot = status.boot
        kind = "instance.failed" if status.error else "instance.exited"
        ctx.changed(kind, await views.state_view(ctx, record, live))
        if restart:
            delay, live.restarts = backoff(live.restarts, status)
            live.restart_at = anyio.current_time() + delay
            log.info(
                "program exited (%s); restart %d in %.0f s",
                _outcome(status),
                live.restarts,
                delay,
                extra={"instance_id": instance_id},
            )
        elif not record.keep_on_exit:
            log.info(
                "program exited (%s); VMM ended",
                _outcome(status),
                extra={"instance_id": instance_id},
            )


async def _restart(ctx: Context, instance_id: str, live: Live) -> None:
    async with live.lock:
        live.restart_at = None
        record = ctx.records.get(instance_id)
        # Anything done by hand since (a start, a delete) has settled the instance already.
        if record is None or not record.restart_pending or live.vmm is not None:
            return
        try:
            await actions.start(ctx, record, live, InstanceState.STOPPED)
            ctx.changed(
                "instance.started", await views.state_view(ctx, ctx.record(instance_id), live)
            )
        except Exception as error:
            # Counted as a failed run: the next attempt waits longer.
            log.warning("restart failed: %s", error, extra={"instance_id": instance_id})
            delay, live.restarts = backoff(live.restarts, GuestStatus())
            live.restart_at = anyio.current_time() + delay


def _ran_for(status: GuestStatus) -> float:
    if status.program_started_at is None or status.exited_at is None:
        return 0.0
    started = datetime.fromisoformat(status.program_started_at.replace("Z", "+00:00"))
    ended = datetime.fromisoformat(status.exited_at.replace("Z", "+00:00"))
    return (ended - started).total_seconds()


def _outcome(status: GuestStatus) -> str:
    return status.error or f"exit code {status.exit_code}"
