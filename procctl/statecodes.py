"""The states and outcomes alone: what a worker needs of procctl.states,
without the dataclasses (a spawn worker imports this in a fresh interpreter,
where dataclasses and inspect cost it about 7 ms)."""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """What the controller asks of a worker. STOPPED is final."""

    STOPPED = 0
    PAUSED = 1
    RUNNING = 2


#: State by value, for the hot paths of acknowledgements (State(n) is a slow call).
STATES = (State.STOPPED, State.PAUSED, State.RUNNING)


class Outcome(str, enum.Enum):
    """How a worker ended."""

    FINISHED = "finished"  # the target returned by itself
    STOPPED = "stopped"  # the target returned after STOPPED was broadcast
    FAILED = "failed"  # the target raised; the report's error holds the traceback
    CRASHED = "crashed"  # the process died without reporting
    KILLED = "killed"  # the controller terminated it after the grace period
    HUNG = "hung"  # no heartbeat within `heartbeat` seconds while RUNNING: killed by the controller

    def __str__(self) -> str:
        return self.value


#: Outcomes that count as success for the command line's exit status.
CLEAN_OUTCOMES = frozenset({Outcome.FINISHED, Outcome.STOPPED})


#: The note a worker adds after the traceback of a target that called sys.exit().
SYS_EXIT_NOTE = "the target called sys.exit("
