"""The last state a VMM reported, and how long it can stand in for asking again.

An answer holds while nothing can have changed: no request was sent since (each one may
change the state), and the VMM has reported nothing since (its ``mark``: the size of Cloud
Hypervisor's event file; QEMU checks its QMP socket itself). The liveness of the process is
checked by the caller. ``MAX_AGE`` bounds what reports nothing at all: a VMM that hangs
or is stopped, or an event the VMM could not write; such a VMM is asked again at the next
read after that, as it was on every read before (and answers ``Unknown`` if it is stuck).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .types import VmState

MAX_AGE = 10.0


def _now() -> float:
    return time.monotonic()


@dataclass(frozen=True, slots=True)
class KnownState:
    state: VmState
    request: int
    mark: int = 0
    at: float = field(default_factory=_now)

    def holds(self, request: int, mark: int = 0) -> bool:
        return request == self.request and mark == self.mark and _now() - self.at < MAX_AGE
