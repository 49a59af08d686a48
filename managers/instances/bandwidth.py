"""An instance's bandwidth limits: changed on the record, enforced on its TAP while it has one.

The record is the truth. A change is saved first and then applied to the running VMM's TAP;
if applying fails, the old record is written back and the old limits re-applied before the
error is raised. A crash between the save and the apply is settled at start-up, where every
instance whose VMM runs gets its record's limits again (``reapply``); a TAP made later (start,
restore) is made with them.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import anyio

from managers.failpoints import failpoint
from managers.instances.context import Context, Live, log
from managers.instances.errors import InvalidInstanceSpec
from managers.instances.types import InstanceRecord, InstanceState
from managers.network import Bandwidth


async def change(
    ctx: Context,
    record: InstanceRecord,
    live: Live,
    state: InstanceState,
    bandwidth: Bandwidth,
) -> InstanceRecord:
    """Set ``bandwidth`` on the instance (under its lock, the state checked)."""
    if not record.network.enabled:
        raise InvalidInstanceSpec(
            f"instance {record.id} was created without a network; bandwidth limits need one"
        )
    before = record
    record = await ctx.save(record.evolve(network=replace(record.network, bandwidth=bandwidth)))
    if live.vmm is None:
        return record  # its next TAP (start, restore) is made with the new limits
    failpoint("bandwidth.recorded")
    try:
        net = await ctx.ensure_network()
        await net.shape(record.id, bandwidth)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await ctx.save(before)
            if ctx.network is not None:
                with contextlib.suppress(Exception):
                    await ctx.network.shape(record.id, before.network.bandwidth)
        raise
    return record


async def reapply(ctx: Context) -> None:
    """Give every instance whose VMM runs the limits its record says (start-up)."""
    if ctx.network is None:
        return
    for record in list(ctx.records.values()):
        live = ctx.live.get(record.id)
        if live is None or live.vmm is None or not record.network.enabled:
            continue
        try:
            await ctx.network.shape(record.id, record.network.bandwidth)
        except Exception as error:
            log.error(
                "instance %s: cannot re-apply its bandwidth limits: %s",
                record.id,
                error,
                extra={"instance_id": record.id},
            )
