"""The messages between the client and its node agents, over Dask queues.

Commands go down one queue per node, each with a sequence number; the agent
applies a number once and answers each copy, so the client can send one
again when its answer is missing (a put into a Dask queue can be lost when a
worker dies). Everything an agent says goes up one queue shared by the run,
in batches (one put carries every message that was waiting).

What goes into a queue is pickled here first (`encode`; a batch: each message
on its own, so that one the client cannot read costs only itself): the scheduler passes
bytes through as they are, where an object msgpack does not know would be
pickled by Dask's fallback, with an INFO line in the log for every put (and
a scheduler that must import procctl to pass it on).
"""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass
from typing import Any


class Op(str, enum.Enum):
    """What the client asks of an agent."""

    LEASE = "lease"  # nothing but a renewal of the lease (any command renews it)
    BROADCAST = "broadcast"  # arg: State value
    STATUS = "status"
    KILL = "kill"
    STOP = "stop"  # arg: grace seconds; the agent exits after it
    STOP_SOME = "stop-some"  # arg: (grace, local ids); those workers only, the agent goes on
    SIGNAL = "signal"  # arg: a signal number, sent to every live worker; answer: their pids
    TASKS = "tasks"  # executor: arg: list of (tid, fn, calls, chunk)
    PAUSE = "pause"  # executor
    RESUME = "resume"  # executor
    CANCEL = "cancel"  # executor: cancel the tasks not yet started; answer: their tids
    GIVE_BACK = "give-back"  # executor: arg: how many unfinished tasks to keep; answer: the tids of the
    # unstarted ones given back (cancelled there, newest first: they never run on that node)
    EXPIRED = "expired"  # from the agent's own watchdog: its lease ran out


class Up(str, enum.Enum):
    """What an agent tells the client."""

    HELLO = "hello"  # body: list of worker pids, in local id order
    ACK = "ack"  # seq: the command answered; body: its answer
    EVENT = "event"  # body: (wall time, procctl Event)
    REPORT = "report"  # body: WorkerReport (local ids)
    RESULT = "result"  # executor: body: (tid, ok, value or exception, traceback text)
    BEAT = "beat"  # the agent is alive and its lease runs
    GONE = "gone"  # the agent ends; body: why


@dataclass(frozen=True)
class Command:
    seq: int
    op: Op
    arg: Any = None


@dataclass(frozen=True)
class Message:
    node: int
    kind: Up
    seq: int = 0
    body: Any = None


@dataclass(frozen=True)
class AgentSpec:
    """What one agent needs: where to listen, where to answer, how long its lease is."""

    run: str
    node: int
    commands: str  # the name of this node's command queue
    up: str  # the name of the run's up queue
    lease: float
    beat: float  # seconds between two BEATs when nothing else is said
    grace: float
    claim: str  # the name of the Event that marks this agent as started once
    nodes: int = 1  # how many nodes the run has (a worker's ctx.workers counts them all)


def queue_names(run: str, nodes: int) -> tuple[list[str], str]:
    return [f"procctl-{run}-cmd-{i}" for i in range(nodes)], f"procctl-{run}-up"


def encode(obj: Any) -> bytes:
    """What goes into a Dask queue: `obj` pickled."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    """What came out of a Dask queue, as it was put."""
    return pickle.loads(data)
