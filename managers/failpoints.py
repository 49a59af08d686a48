"""Named crash points for the fault-injection suite.

``failpoint(name)`` marks a step between two external effects. When the environment
variable ``DATAPLANE_FAILPOINT`` names that step, the process kills itself with SIGKILL
there: a real crash, not an exception, so nothing in our code gets to clean up. The
variable is read once at import; unset (as in every deployment), a failpoint costs a set
lookup and a string comparison. The suites start the dataplane with each name in
:data:`STEPS` once and check what restart makes of it:
``tests/integration/test_fault_injection.py`` the instance steps,
``tests/integration/test_images_recovery.py`` the ``image.*`` ones,
``tests/integration/test_events.py`` the ``events.*`` ones,
``tests/integration/test_ingress_forwarding.py`` the ``ingress.*`` ones.
"""

from __future__ import annotations

import os
import signal

STEPS: frozenset[str] = frozenset(
    {
        # any VMM start (create, start, restore): forked but not yet recorded (found by its
        # marks alone); recorded, its socket not yet up
        "vmm.forked",
        "vmm.spawned",
        # a QEMU snapshot (standby): the migration to the memory file under way
        "vmm.snapshotting",
        # instances: create
        "create.recorded",
        "create.overlay",
        "create.tap",
        "create.booted",
        # instances: start, stop, delete
        "start.tap",
        "start.booted",
        "stop.shutdown",
        "delete.recorded",
        "delete.vmm_stopped",
        # instances: standby and restore
        "standby.paused",
        "standby.snapshot_written",
        "standby.committed",
        "restore.tap",
        "restore.running",
        # events: a change rendered but not yet in the log; an event a webhook receiver took
        # (2xx) before its endpoint's cursor moved
        "events.reported",
        "events.delivered",
        # volumes: a create's disk made but not yet committed, committed but not yet
        # answered; a resize recorded but its file not yet grown
        "volume.formatted",
        "volume.committed",
        "volume.resizing",
        # instances: a volume attach recorded, its disk in the VMM but not yet mounted;
        # a detach recorded, the guest's mount gone but the disk still in the VMM
        "attach.recorded",
        "attach.plugged",
        "detach.recorded",
        "detach.unmounted",
        # instances: new bandwidth limits recorded, not yet on the TAP
        "bandwidth.recorded",
        # ingresses: a create recorded, its rule not yet in the table; a delete recorded
        # (the record gone), its rule still in the table
        "ingress.recorded",
        "ingress.removed",
        # images
        "image.pulled",
        "image.unpacked",
        "image.disk_written",
    }
)

_ARMED = os.environ.get("DATAPLANE_FAILPOINT", "")


def failpoint(name: str) -> None:
    """Crash here, with SIGKILL, when the fault-injection suite armed ``name``."""
    if name not in STEPS:
        raise ValueError(f"unknown failpoint {name!r}")
    if name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
