"""The vocabulary shared by the controller, the workers and the command line."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

# The public names live here too (the worker side imports statecodes alone).
from .statecodes import CLEAN_OUTCOMES as CLEAN_OUTCOMES
from .statecodes import STATES as STATES
from .statecodes import SYS_EXIT_NOTE
from .statecodes import Outcome as Outcome
from .statecodes import State as State

#: The headers a printed traceback's blocks begin with, at its top level.
_PLAIN = "Traceback (most recent call last):"
_GROUP = "  + Exception Group Traceback (most recent call last):"


def error_line(error: str | None) -> str | None:
    """An error in one line: a traceback's exception line (``ValueError: bad
    input``; of a chain, the final exception's; of an exception group, the
    group's own; the first line of a message that has several), the procctl
    note that ends one, or the error itself when it is no traceback (a crash)."""
    if not error or not error.strip():
        return None
    lines = error.rstrip().splitlines()
    last = lines[-1].strip()
    if last.startswith(SYS_EXIT_NOTE):
        return last
    starts = [i for i, line in enumerate(lines) if line in (_PLAIN, _GROUP)]
    if starts:
        block = lines[starts[-1] + 1:]  # the last top-level block: the final exception's
        if lines[starts[-1]] == _GROUP:  # its frame lines are "  |   File ...", its own line "  | X: ..."
            block = [line[4:] for line in block if line.startswith("  | ")]
        for i, line in enumerate(block):
            if line.strip() and not line[0].isspace():
                text = line.strip()
                if text.endswith(":") and i + 1 < len(block) and block[i + 1].strip():
                    text += " " + block[i + 1].strip()  # a message whose first line is empty
                return text
    return next((line.strip() for line in reversed(lines) if line.strip(" +-|0123456789")), last)


@dataclass(frozen=True)
class WorkerReport:
    """The record of one ended worker."""

    worker_id: int
    pid: int | None
    outcome: Outcome
    result: Any = None
    error: str | None = None
    exitcode: int | None = None
    started: float = 0.0  # time.time() when the process was started
    ended: float = 0.0  # time.time() when the controller saw it end
    node: str | None = None  # the Dask worker it ran on (procctl.cluster); None on one machine
    restarts: int = 0  # how many times this worker id had been restarted before this incarnation

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def error_line(self) -> str | None:
        """The error in one line: ``ValueError: bad input`` (see error_line())."""
        return error_line(self.error)


@dataclass(frozen=True)
class WorkerStatus:
    """A live view of one worker, as `ProcessController.status()` returns it."""

    worker_id: int
    pid: int | None
    state: State
    alive: bool
    outcome: Outcome | None = None
    done: float | None = None  # last value passed to ctx.progress()
    total: float | None = None
    rate: float | None = None  # progress units per second since the first report
    eta: float | None = None  # seconds left at that rate, when total is known
    info: dict[str, Any] = field(default_factory=dict)
    node: str | None = None  # the Dask worker it runs on (procctl.cluster)
    restarts: int = 0  # how many times this worker id has been restarted
    #: With heartbeat=: seconds the worker has left the controller's last
    #: heartbeat request unanswered (0.0 once answered); None otherwise.
    beat_age: float | None = None


@dataclass(frozen=True)
class Event:
    """One thing that happened in a run, as `on_event`, `--json` and `--events` see it.

    ``event`` is a worker transition (running, paused, stopped), an outcome
    (finished, stopped, failed, crashed, killed, hung), ``started`` for a worker
    that came up, ``broadcast`` (with ``state``) for a command sent to all,
    or supervision: ``hung`` (no heartbeat: about to be killed), ``restarting``
    (with ``restarts``, the count it will have, and ``delay``), ``gave_up``
    (the restart limit was reached: with the worker and its last ``error``).
    """

    t: float  # seconds since the controller started
    event: str
    worker: int | None = None
    state: str | None = None
    pid: int | None = None
    exitcode: int | None = None
    error: str | None = None
    done: float | None = None
    total: float | None = None
    task: int | None = None  # the executor's task id, on task events
    node: str | None = None  # the Dask worker, in a cluster run
    restarts: int | None = None  # on restarting and gave_up events
    delay: float | None = None  # on restarting: seconds of backoff before the new process starts

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def strict_json(value: Any) -> str:
    """`value` as strict JSON: a NaN or infinity (which JSON has no word for, and
    strict readers refuse as Python writes it) is null, and any dict key a str."""
    try:  # (the encoder in C; the walk in Python only for a value it refuses: most have no NaN)
        return json.dumps(value, default=str, allow_nan=False)
    except (ValueError, TypeError):
        return json.dumps(finite(value), default=str, allow_nan=False)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity made None and every dict key a str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
