"""The one table of instance actions: which states each accepts, and where it leads.

Every action checks the derived state against this table under the instance's lock (pause
and resume on a VMM that is held and reachable let the VMM refuse instead, and read the state
only to explain a refusal), and answers with the state it leads to without asking the VMM
again. ``INITIALIZING`` as a
destination means "awake": the view reads ``Running`` once the guest's program has started.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from managers.instances.types import InstanceState

_S = InstanceState


class Action(enum.StrEnum):
    START = "start"
    STOP = "stop"
    REBOOT = "reboot"
    PAUSE = "pause"
    RESUME = "resume"
    STANDBY = "standby"
    RESTORE = "restore"
    # Not changes of state: exec and file operations through the guest agent need the
    # program running; a volume is attached or detached hot while the program runs (through
    # the agent), or cold (in the record, for the next boot) while no VM runs. Standby is
    # refused: the snapshot's devices are fixed until it is restored.
    EXEC = "exec"
    ATTACH_VOLUME = "attach a volume to"
    DETACH_VOLUME = "detach a volume from"
    # Bandwidth limits are the record's, applied to the TAP whenever there is one.
    SET_BANDWIDTH = "change the bandwidth of"


@dataclass(frozen=True, slots=True)
class Transition:
    accepts: frozenset[InstanceState]
    leads_to: InstanceState | None  # None: the state stays as it was

    def allowed(self) -> list[str]:
        """The accepted states as the API names them, in a stable order."""
        return [str(state) for state in _S if state in self.accepts]


_AWAKE = frozenset({_S.INITIALIZING, _S.RUNNING})
# No VM that the next boot would not replace.
_AT_REST = frozenset({_S.CREATED, _S.STOPPED, _S.SHUTDOWN})

TRANSITIONS: dict[Action, Transition] = {
    Action.START: Transition(frozenset({_S.CREATED, _S.STOPPED, _S.SHUTDOWN}), _S.INITIALIZING),
    Action.STOP: Transition(_AWAKE | {_S.PAUSED, _S.SHUTDOWN, _S.UNKNOWN}, _S.STOPPED),
    Action.REBOOT: Transition(_AWAKE, _S.INITIALIZING),
    Action.PAUSE: Transition(_AWAKE, _S.PAUSED),
    Action.RESUME: Transition(frozenset({_S.PAUSED}), _S.INITIALIZING),
    Action.STANDBY: Transition(_AWAKE | {_S.PAUSED}, _S.STANDBY),
    Action.RESTORE: Transition(frozenset({_S.STANDBY}), _S.INITIALIZING),
    Action.EXEC: Transition(frozenset({_S.RUNNING}), None),
    Action.ATTACH_VOLUME: Transition(_AT_REST | {_S.RUNNING}, None),
    Action.DETACH_VOLUME: Transition(_AT_REST | {_S.RUNNING}, None),
    Action.SET_BANDWIDTH: Transition(_AT_REST | _AWAKE | {_S.PAUSED, _S.STANDBY}, None),
}
