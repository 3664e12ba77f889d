"""Supervision policy: when to restart a worker, how long to wait, when to give up.

Pure bookkeeping, no processes: the controller asks `Supervisor.on_exit()`
what to do about a worker that ended and acts on the `Decision` (schedule a
restart after `delay`, or stop everything).  The vocabulary is Erlang/OTP's,
named plainly:

    restart="never"       OTP temporary: today's behaviour, nothing restarts
    restart="on-failure"  OTP transient: restart after failed, crashed, killed, hung
    restart="always"      OTP permanent: also after finished
    strategy="one_for_one" / "one_for_all"

Intensity: more than `max_restarts` restarts within `restart_window` seconds
and the job is sick: give up.  Backoff (supervisord's BACKOFF): a worker's
k-th restart within the window waits `min(backoff[1], backoff[0] * 2**k)`,
so a worker that keeps crashing is restarted less and less often, and one
that ran well for a window starts again from `backoff[0]`.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from .states import Outcome


class Restart(str, enum.Enum):
    """When an ended worker is restarted."""

    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"

    def __str__(self) -> str:
        return self.value


class Strategy(str, enum.Enum):
    """What else is restarted with it."""

    ONE_FOR_ONE = "one_for_one"  # only the worker that ended
    ONE_FOR_ALL = "one_for_all"  # every worker: stop the others gracefully, then restart all

    def __str__(self) -> str:
        return self.value


#: The shortest heartbeat. A probe goes out every quarter of it, and an idle
#: worker must get a CPU to answer within it: under 5 ms, most of 8 idle
#: workers were found hung on 2 cores; 50 ms leaves room for a loaded machine.
MIN_HEARTBEAT = 0.05
#: Outcomes that count as a failure for restart="on-failure".
FAILURES = frozenset({Outcome.FAILED, Outcome.CRASHED, Outcome.KILLED, Outcome.HUNG})


def _seconds(name: str, value: Any, *, positive: bool, allow_inf: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if seconds != seconds:
        raise ValueError(f"{name} must be a number of seconds, not NaN")
    if seconds < 0 or (positive and seconds == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, not {value!r}")
    if seconds == math.inf and not allow_inf:
        raise ValueError(f"{name} must be finite, not {value!r}")
    return seconds


def _choice(name: str, value: Any, kind: type[enum.Enum]) -> Any:
    names = ", ".join(repr(m.value) for m in kind)
    if isinstance(value, kind):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {names}, not {type(value).__name__}")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {names}, not {value!r}") from None


@dataclass(frozen=True)
class Plan:
    """Checked supervision arguments (see `Plan.check`)."""

    restart: Restart = Restart.NEVER
    max_restarts: int = 5
    restart_window: float = 60.0
    backoff: tuple[float, float] = (0.1, 10.0)
    strategy: Strategy = Strategy.ONE_FOR_ONE
    #: Seconds a RUNNING worker may go without a checkpoint (None: no hang detection).
    heartbeat: float | None = None

    @classmethod
    def check(cls, restart: Any = "never", max_restarts: Any = 5, restart_window: Any = 60.0,
              backoff: Any = (0.1, 10.0), strategy: Any = "one_for_one", heartbeat: Any = None) -> Plan:
        """Validate every argument; TypeError or ValueError names the bad one."""
        policy = _choice("restart", restart, Restart)
        kind = _choice("strategy", strategy, Strategy)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
            raise TypeError(f"max_restarts must be an integer >= 0, not {type(max_restarts).__name__}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, not {max_restarts!r}")
        window = _seconds("restart_window", restart_window, positive=True, allow_inf=True)
        if isinstance(backoff, (str, bytes)) or not isinstance(backoff, (tuple, list)) or len(backoff) != 2:
            raise TypeError(f"backoff must be a pair (first, longest) of seconds, not {backoff!r:.60}")
        low = _seconds("backoff[0]", backoff[0], positive=False, allow_inf=False)
        high = _seconds("backoff[1]", backoff[1], positive=False, allow_inf=False)
        if low > high:
            raise ValueError(f"backoff must grow: backoff[0] ({low}) is more than backoff[1] ({high})")
        beat = None
        if heartbeat is not None:
            beat = _seconds("heartbeat", heartbeat, positive=True, allow_inf=True)
            if beat < MIN_HEARTBEAT:  # probed every quarter: past what a pump's timers can keep
                raise ValueError(f"heartbeat must be at least {MIN_HEARTBEAT} seconds, not {heartbeat!r}")
            if beat == math.inf:
                beat = None  # never hung: no detection
        return cls(policy, max_restarts, window, (low, high), kind, beat)

    @property
    def restarts(self) -> bool:
        return self.restart is not Restart.NEVER

    def wants_restart(self, outcome: Outcome) -> bool:
        """Does this policy restart a worker that ended with `outcome`?"""
        if self.restart is Restart.ALWAYS:
            return outcome is not Outcome.STOPPED
        if self.restart is Restart.ON_FAILURE:
            return outcome in FAILURES
        return False


class Action(enum.Enum):
    NONE = "none"  # leave it ended
    RESTART = "restart"  # restart after `delay` seconds
    GIVE_UP = "give_up"  # the intensity limit is reached: stop everything


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    #: Restarts within the window, this one included (for the event).
    recent: int = 0


class Supervisor:
    """The restart decisions of one controller: intensity over all workers,
    backoff per worker (or per group, for one_for_all).  Times are
    time.monotonic() values passed in, so tests can drive it by hand."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._recent: deque[float] = deque()  # every restart decided, oldest first
        self._by_key: dict[Hashable, deque[float]] = {}
        self.total = 0  # restarts decided so far

    def _forget_before(self, times: deque[float], now: float) -> None:
        horizon = now - self.plan.restart_window
        while times and times[0] <= horizon:
            times.popleft()

    def on_exit(self, key: Hashable, outcome: Outcome, now: float) -> Decision:
        """A worker (or, for one_for_all, the group `key`) ended with `outcome`."""
        if not self.plan.wants_restart(outcome):
            return Decision(Action.NONE)
        self._forget_before(self._recent, now)
        if len(self._recent) >= self.plan.max_restarts:
            return Decision(Action.GIVE_UP, recent=len(self._recent))
        mine = self._by_key.setdefault(key, deque())
        self._forget_before(mine, now)
        delay = self.backoff(len(mine))
        self._recent.append(now)
        mine.append(now)
        self.total += 1
        return Decision(Action.RESTART, delay, len(self._recent))

    def cancel(self, key: Hashable, decided: float) -> None:
        """The restart decided at `decided` for `key` will not happen (the
        worker was stopped or removed during its backoff): it counts toward
        neither the intensity limit nor the next backoff."""
        for times in (self._recent, self._by_key.get(key)):
            if times is not None and decided in times:
                times.remove(decided)
        self.total -= 1

    def forget(self, key: Hashable) -> None:
        """`key` (a worker id a shrink removed) is gone: one that comes back later
        is a new worker, whose backoff starts afresh (its restarts still count
        toward the intensity limit, which is the controller's)."""
        self._by_key.pop(key, None)

    def backoff(self, earlier: int) -> float:
        """The wait before a restart that follows `earlier` ones within the window."""
        low, high = self.plan.backoff
        return min(high, low * 2.0 ** min(earlier, 64))


# -- hang detection: the second look ------------------------------------------

#: A worker that checkpoints answers a probe within microseconds of CPU time:
#: one that ran this long without answering is not checkpointing.
CPU_TO_ANSWER = 0.002


@dataclass(frozen=True)
class SchedSample:
    """What the kernel says of a worker's main thread at one moment (Linux /proc)."""

    ran: int  # ns on a CPU
    waited: int  # ns runnable, waiting for a CPU (counted when it next gets one)
    runnable: bool  # state R: on a CPU or queued for one


def sched_sample(pid: int | None) -> SchedSample | None:
    """The scheduler's view of process `pid`; None where /proc does not say."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            ran, waited, _ = f.read().split()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]  # (the name may hold spaces and parens)
        return SchedSample(int(ran), int(waited), state == b"R")
    except (OSError, ValueError, IndexError):
        return None


def looks_hung(before: SchedSample | None, after: SchedSample | None, interval: float) -> bool:
    """Between two looks `interval` seconds apart at a worker that has not
    answered its probe: is it hung, or did it only wait for a CPU?

    Hung if it ran meanwhile without answering (a long computation, the GIL
    held) or slept (blocked in a C call). Not if it mostly waited for a CPU,
    or is runnable now: the kernel adds a wait to the counts only when the
    task next gets a CPU, so one queued through the whole interval shows no
    change at all, as a sleeper does; its state (R) tells them apart.
    Without /proc, the second look decides: hung.
    """
    if before is None or after is None:
        return True
    ran = (after.ran - before.ran) / 1e9
    waited = (after.waited - before.waited) / 1e9
    if ran > CPU_TO_ANSWER:
        return True
    return not (waited >= interval / 2 or after.runnable)
