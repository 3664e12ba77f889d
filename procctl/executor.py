"""ProcessExecutor: a concurrent.futures.Executor you can pause, that a crash cannot break.

    caller threads                  manager thread                   workers
    --------------                  --------------                   -------
    submit()/map() -> _pending  -->  _dispatch(): TASK -------------> run_tasks()
    pause()/resume()/stop() ---->   _commands; broadcasts            checkpoint()
    Future <- set_result ---------  _on_result() <-------- RESULT --
                                    _on_worker_end(): reclaim, fail one task, respawn

One manager thread owns the ProcessController (which is not thread-safe),
as CPython's _ExecutorManagerThread owns its pool: the caller's methods
queue work and commands, then wake it.  It holds the _Pool, never the
ProcessExecutor in front of it, so that a dropped executor is collected
(and its pool shut down).  It completes futures and tells on_event at the
end of each pass, where its own state is whole: a done callback, which runs
in this thread, may call any method (a command from there runs inline).
Each worker's link (workwire.py) carries its tasks, several to a message
when tasks are quick; the manager keeps a worker's window full (a few tasks
when they are slow, many when they are quick) and knows which ones each
worker holds, in order.  The
worker runs them in that order and sends each result before it starts the
next, so the first task without a result is the only one that can have
started; the rest wait in the worker's memory or unread in its socket.
When a worker dies the manager reads the unread ones back, puts them and
the unstarted ones first in line again, and fails or retries only the one
that had started; a worker that leaves on its own gives back (RETURNED)
the ones it read and did not start, as does one the manager asks (on the
board) when a slow task runs ahead of a quick window's.  Futures stay pending until their
result comes, so that `stop()` can cancel every one that did not complete.

A map chunk is one task that checks for commands between blocks of its
items: a paused chunk waits there, and a stopped one reports the results of
its first items, so that `stop()` hands back only the items that did not run.
It says on the board which block it runs: a crash in it costs the item that
ran (_item_lost), and the chunk's other items go again.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import math
import operator
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool  # a BrokenExecutor, as ProcessPoolExecutor's
from dataclasses import dataclass, field
from typing import Any

from . import threads, workwire
from .channel import Board, InheritedFd
from .controller import ProcessController, check_start_method
from .errors import RemoteTraceback, TaskTimeout, WorkerCrashed
from .limits import WORK_FDS_PER_WORKER, capacity_problem
from .shutdown import describe_exit, signal_name
from .states import Event, Outcome, State, WorkerReport, WorkerStatus, error_line
from .worker_plane import CALL, CHUNK, ERR, ERR_AT, OK, PRECISE, RETURN_SIGNAL, run_tasks
from .workwire import MAX_WAIT, Kind, check_count, check_timeout

log = logging.getLogger("procctl")

#: Tasks in flight per worker when tasks are slow: the one running and the
#: next, so a worker never waits for the manager between two tasks, and an
#: idle worker can take over what waits behind a long one.
WINDOW = 2
#: When tasks take less than QUICK_TASK seconds, a worker holds up to
#: QUICK_WINDOW of them, sent up to QUICK_BATCH (and BATCH_BYTES) a message,
#: so that the worker never waits for the manager and the manager sends one
#: message for many tasks.
QUICK_TASK = 300e-6
QUICK_WINDOW = 64
#: A task that has run this long at the head of a quick window is not quick:
#: the window shrinks to WINDOW at once, and the tasks sent behind it (which
#: its worker would hold until it is done) are taken back for the others.
SLOW_HEAD = 0.01
QUICK_BATCH = 32
BATCH_BYTES = 64 * 1024
#: The cluster executor's bound on its automatic map chunks (this executor's
#: chunks follow Pool.map's rule: they pause and stop between their items).
MAX_AUTO_CHUNK = 1024
#: map() hands its tasks to the manager this many at a time, so
#: the workers start while the caller still builds futures.
SUBMIT_SLICE = 256
#: Workers in a row that die before they are up (no initializer: with one, the first
#: such death) before the pool is broken rather than started again for ever.
EARLY_DEATHS = 3


class _Cut(list):  # type: ignore[type-arg]
    """The result of a map chunk that stop() cut short: its first items' results."""


class _Failed(list):  # type: ignore[type-arg]
    """The result of a map chunk one of whose items crashed (or timed out):
    the results of the items before it, and its error, which map() raises there."""

    def __init__(self, results: list[Any], error: BaseException) -> None:
        super().__init__(results)
        self.error = error


class _Rerun:
    """A map chunk whose worker died in it, as it goes again: where its
    remaining items are in the chunk, those that failed (by place), how often
    each crashed, and the places of a block in which a crash came that no
    item could be told from (its PRECISE run tells which, if it crashes again)."""

    __slots__ = ("where", "errors", "crashes", "suspects", "star")

    def __init__(self, n: int, star: bool) -> None:
        self.where = list(range(n))
        self.errors: dict[int, BaseException] = {}
        self.crashes: dict[int, int] = {}
        self.suspects: set[int] = set()
        self.star = star

    def outcome(self, results: list[Any], cut: bool) -> Any:
        """The chunk's value once its last run gave `results` (a prefix if `cut` by stop())."""
        if self.errors:
            first = min(self.errors)
            before = [r for place, r in zip(self.where, results) if place < first]  # noqa: B905 - a cut: shorter
            if not cut or len(before) == sum(1 for place in self.where if place < first):
                return _Failed(before, self.errors[first])
            return _Cut(before)
        return _Cut(results) if cut else results


@dataclass(frozen=True)
class Unfinished:
    """What `ProcessExecutor.stop()` hands back: every submitted item that did
    not complete, each once, in submission order; `running` is the subset that
    had started and was interrupted."""

    items: list[Any] = field(default_factory=list)
    running: list[Any] = field(default_factory=list)
    futures: list[Future[Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class TaskCounts:
    """How many tasks were submitted, and where they are."""

    submitted: int
    completed: int
    failed: int
    cancelled: int
    running: int
    queued: int


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_PENDING = object()
_CANCELLED = object()


class _MapRun:
    """The outcomes of one map() call, in order, in one list under one
    condition: the manager sets many per pass and wakes the caller once,
    where a Future per item would cost a lock, a condition and a wakeup each."""

    __slots__ = ("values", "cond")

    def __init__(self, n: int) -> None:
        self.values: list[Any] = [_PENDING] * n
        self.cond = threading.Condition()

    def set(self, i: int, value: Any) -> bool:
        if self.values[i] is not _PENDING:
            return False  # cancelled: the caller let go of it
        self.values[i] = value
        return True

    def cancel(self, i: int) -> bool:
        value = self.values[i]
        if value is _PENDING:
            self.values[i] = _CANCELLED
            return True
        return value is _CANCELLED

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def take(self, i: int, end: float | None) -> Any:
        """Outcome i, once it is there; the run lets go of it (as the stdlib's
        map lets go of each result it yields: bpo-14406)."""
        value = self.wait(i, end)
        self.values[i] = None
        return value

    def wait(self, i: int, end: float | None) -> Any:
        value = self.values[i]
        if value is _PENDING:
            with self.cond:
                while (value := self.values[i]) is _PENDING:
                    remaining = None if end is None else end - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise FutureTimeout()
                    self.cond.wait(None if remaining is None else min(remaining, MAX_WAIT))
        if value is _CANCELLED:
            raise CancelledError()
        if type(value) is _Raised:
            raise value.exc
        return value


def _popping(chunk: list[Any]) -> Iterator[Any]:
    """A chunk's items in order, each dropped from the list as it is yielded,
    at C speed: the list reversed, then popped as many times as it is long."""
    chunk.reverse()
    return itertools.starmap(chunk.pop, itertools.repeat((), len(chunk)))


class _Chunks(itertools.chain):  # type: ignore[type-arg]
    """map()'s results when they come in chunks: a chain over the chunks'
    items (C speed per item), that closes like the stdlib map's generator."""

    _chunks: Generator[Any, None, None]

    @classmethod
    def of(cls, chunks: Generator[Any, None, None]) -> _Chunks:
        it = cls.from_iterable(chunks)
        assert isinstance(it, _Chunks)
        it._chunks = chunks
        return it

    def close(self) -> None:
        self._chunks.close()


#: Makes "not sent yet, so cancel" (a caller's cancel()) and "not cancelled,
#: so send" (the manager's claim()) exclusive; one lock for every future, held
#: for two attribute reads or writes and never while a callback runs.
_SENDING = threading.Lock()


class _TaskFuture(Future):  # type: ignore[type-arg]
    """A submitted task's Future: running() once the task went to a worker,
    and then cancel() refuses, as ProcessPoolExecutor's futures do.

    Its stdlib state stays PENDING while the task runs, so that stop() can
    still cancel it when it hands the task back. A cancelled future is
    notified at once: `wait()` and `as_completed()` see it, as they see the
    stdlib executors' cancelled futures once their queue reaches them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._procctl_sent = False
        self._procctl_cancelling = False
        self._procctl_unnotified = True  # popped by the one thread that notifies

    def running(self) -> bool:
        return self._procctl_sent and not self.done()

    def cancel(self) -> bool:
        with _SENDING:
            if self._procctl_sent:
                return False
            self._procctl_cancelling = True
        return self._cancel_and_notify()

    def __repr__(self) -> str:
        text = super().__repr__()
        return text.replace("state=pending", "state=running") if self.running() else text

    def _cancel_and_notify(self) -> bool:
        if not Future.cancel(self):
            return False
        # dict.pop is atomic: of two threads that cancel, one notifies.
        if self.__dict__.pop("_procctl_unnotified", False):
            self.set_running_or_notify_cancel()
        return True

    def claim(self) -> bool:
        """The manager sends the task: False if it was cancelled first."""
        with _SENDING:
            if self._procctl_cancelling:
                return False
            self._procctl_sent = True
            return True

    def unclaim(self) -> None:
        """The task came back from a worker unstarted: pending (cancellable) again."""
        with _SENDING:
            self._procctl_sent = False

    def revoke(self) -> bool:
        """stop() hands the task back: cancel it, sent or not."""
        self._procctl_sent = False
        self._procctl_cancelling = True
        return self._cancel_and_notify()


class _Task:
    __slots__ = ("tid", "future", "run", "index", "fn", "blob", "items", "chunk", "attempts", "started", "done",
                 "rerun")

    def __init__(self, tid: int, future: _TaskFuture | None, fn: bytes, blob: bytes, items: list[Any],
                 chunk: bool, run: _MapRun | None = None, index: int = 0) -> None:
        self.tid = tid
        self.future = future  # submit()'s, or None for a map() item (then its outcome is run[index])
        self.run = run
        self.index = index
        self.fn = fn  # the pickled function (shared by a map's tasks)
        self.blob = blob  # the pickled call: (CALL, args, kwargs) or (CHUNK, items, star)
        self.items = items  # the submitted items this task carries (one, or a map chunk)
        self.chunk = chunk
        self.attempts = 0
        self.started = 0.0  # monotonic time it began running (first in its worker's line)
        self.done: list[Any] = []  # a chunk cut short by stop(): its first items' results
        self.rerun: _Rerun | None = None  # a map chunk that goes again after a crash in it

    # The future's side, for a submitted task and a map item alike.

    def cancel(self) -> bool:
        """The manager cancels it (a queued or a handed-back task), sent or not."""
        if self.run is None:
            assert self.future is not None
            return self.future.revoke()
        return self.run.cancel(self.index)

    def unclaim(self) -> None:
        """It came back from a worker unstarted."""
        if self.future is not None:
            self.future.unclaim()

    def claim(self) -> bool:
        """It goes to a worker: False if it was cancelled meanwhile."""
        if self.run is None:
            assert self.future is not None
            return self.future.claim()
        return self.run.values[self.index] is not _CANCELLED

    def set_result(self, value: Any, later: deque[Any] | None = None) -> bool:
        """False if it was cancelled. A map item's caller is woken by _MapRun.wake().
        With `later` (the manager's), a future is completed there, in order."""
        if self.run is not None:
            return self.run.set(self.index, value)
        assert self.future is not None
        if later is not None:
            later.append((self.future, value, False, len(self.items)))
            return True
        try:
            self.future.set_result(value)
        except InvalidStateError:
            return False
        return True

    def set_exception(self, exc: BaseException, later: deque[Any] | None = None) -> bool:
        if self.run is not None:
            ok = self.run.set(self.index, _Raised(exc))
            self.run.wake()
            return ok
        assert self.future is not None
        if later is not None:
            later.append((self.future, exc, True, len(self.items)))
            return True
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            return False
        return True


class _WorkerLine:
    """The manager's view of one worker's link and the tasks it holds."""

    __slots__ = ("wid", "sock", "child", "held", "done", "sent", "timed_out", "closed", "up", "returner", "asked_back",
                 "paused_at")

    def __init__(self, wid: int) -> None:
        self.wid = wid
        self.sock, self.child = workwire.pair()
        self.sock.setblocking(False)
        self.child.setblocking(False)
        self.held: deque[_Task] = deque()
        self.done = 0
        self.sent = 0  # tasks sent to this worker (max_tasks_per_worker caps it)
        self.timed_out: _Task | None = None
        self.closed = False
        #: The worker said UP: it is past its start (and initializer), and the
        #: task_timeout of its first task counts from then.
        self.up = False
        self.returner = 0  # the thread id of the worker's returner thread, once up
        #: The task at the head when the worker was last asked for the ones behind it.
        self.asked_back: _Task | None = None
        #: When the worker acknowledged PAUSED (None while it runs): its task's clock stops
        #: then, not at the pause's broadcast (a task that never checkpoints runs on).
        self.paused_at: float | None = None


def check_task_timeout(task_timeout: Any) -> float | None:
    """`task_timeout` in seconds (None: no limit, as is infinity); else TypeError/ValueError naming it."""
    if task_timeout is None:
        return None
    if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
        raise TypeError(f"task_timeout must be a number of seconds, not {task_timeout!r}")
    if not task_timeout > 0:  # (NaN too)
        raise ValueError(f"task_timeout must be > 0, not {task_timeout!r}")
    try:
        seconds = float(task_timeout)
    except OverflowError:  # an int beyond any float: no limit, as infinity
        return None
    return None if math.isinf(seconds) else seconds


def check_initializer(initializer: Any, initargs: Any) -> tuple[Any, ...]:
    """`initargs` as a tuple, once `initializer` is None or callable; else TypeError naming them."""
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be callable")
    if isinstance(initargs, (str, bytes)):  # ('a', 'b') from 'ab' is never what was meant
        raise TypeError(f"initargs must be a tuple of arguments, not {type(initargs).__name__}")
    try:
        return tuple(initargs)
    except TypeError:
        raise TypeError(f"initargs must be a tuple of arguments, not {type(initargs).__name__}") from None


def map_deadline(timeout: Any) -> float | None:
    """When map()'s `timeout` ends (monotonic; None: no limit, also for inf).

    As the stdlib's, it counts from the call and a negative one has passed
    already; NaN or a non-number is refused."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds, not NaN")
    try:
        end = float(timeout) + time.monotonic()
    except OverflowError:  # an int beyond a float
        return None if timeout > 0 else -math.inf
    return None if end == math.inf else end


def _item_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `Unfinished.items` holds for one call: the single argument, else
    the argument tuple, else (args, kwargs)."""
    if kwargs:
        return (args, kwargs)
    return args[0] if len(args) == 1 else args


class _Pool:
    """A ProcessExecutor's workers, tasks and manager thread. The manager
    thread holds this, never the ProcessExecutor (as ProcessPoolExecutor's
    manager holds a weak reference to its executor): an executor dropped
    without shutdown() is collected, and its pool then shuts down."""

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        start_method: str | None = None,
        retries: int = 0,
        task_timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        grace: float = 5.0,
        max_tasks_per_worker: int | None = None,
        max_tasks_per_child: int | None = None,
        place: tuple[int, int, str] | None = None,
    ) -> None:
        """`place`, for a node of a ClusterExecutor: its first global worker id,
        the run's number of workers and the node's name (ids and errors say them)."""
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        check_count("max_workers", max_workers, None, "a positive integer")
        if max_workers < 1:  # the stdlib's words, which code written for it may match
            raise ValueError(f"max_workers must be greater than 0, not {max_workers!r}")
        too_many = capacity_problem(max_workers, WORK_FDS_PER_WORKER)
        if too_many is not None:
            raise ValueError(f"max_workers={max_workers} is more than this system lets us start: {too_many}")
        check_count("retries", retries, 0, "an integer >= 0")
        task_timeout = check_task_timeout(task_timeout)
        grace_s = check_timeout("grace", grace, allow_none=False)  # as ProcessController's
        assert grace_s is not None
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, not {type(on_event).__name__}")
        if max_tasks_per_worker is None:
            max_tasks_per_worker = max_tasks_per_child
        elif max_tasks_per_child is not None:
            raise ValueError("give max_tasks_per_worker or max_tasks_per_child (its stdlib name), not both")
        name = "max_tasks_per_worker" if max_tasks_per_child is None else "max_tasks_per_child"
        if max_tasks_per_worker is not None:
            check_count(name, max_tasks_per_worker, 1, "a positive integer")
        initargs = check_initializer(initializer, initargs)
        if mp_context is not None:
            if start_method is not None:
                raise ValueError("give start_method or mp_context, not both")
            get_start_method = getattr(mp_context, "get_start_method", None)
            if not callable(get_start_method):
                raise TypeError(f"mp_context must be a multiprocessing context (multiprocessing.get_context(...)), "
                                f"not {mp_context!r}")
            start_method = get_start_method()
        check_start_method(start_method)
        self.retries = retries
        self.task_timeout = task_timeout
        self.grace = grace_s
        self._max_workers = max_workers
        self._has_initializer = initializer is not None
        self._early_deaths = 0  # workers in a row that died before they were up (see _end_line)
        self._on_event = on_event
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._commands: deque[tuple[str, Any, Future[Any]]] = deque()
        #: Map runs let go of, whose tasks a worker holds come back (a deque: append and popleft are atomic).
        self._reclaims: deque[_MapRun] = deque()
        self._commands_closed = False  # the manager thread has ended: nobody runs a command
        self._tids = itertools.count()
        self._idle = False  # the manager sleeps: wake it up
        self._shutdown = False
        self._broken: str | None = None
        self._broken_told = False  # a submit() or map() after the break has returned
        self._paused = False
        self._stopping = False
        self._closing = False
        self._kill_asked = False  # kill() was called: the manager SIGKILLs the workers
        self._killed = False
        self._finishing = False  # the manager stops the workers and accounts for every task
        self._finished = False  # ... and has: it leaves
        #: Futures the manager completes and events it tells, in order: it
        #: delivers them where its own state is whole (_deliver), so that a
        #: done callback or on_event, which run in the manager thread, may call
        #: any method of the executor (a stop() there runs inline).
        self._later: deque[Any] = deque()
        self._pause_waiters: list[tuple[State, Future[Any]]] = []
        self._lines: dict[int, _WorkerLine] = {}
        self._respawn: set[int] = set()
        self._unfinished: list[tuple[_Task, bool]] = []  # (task, was running)
        self._max_tasks = max_tasks_per_worker
        self._task_time = 1.0  # a running mean of seconds per task (slow until measured)
        #: shutdown(cancel_futures=True) came: a task given back by a worker is cancelled.
        self._cancel_unstarted = False
        self._submitted = self._completed = self._failed = self._cancelled = 0
        self._t0 = time.monotonic()
        self._pc = ProcessController(
            run_tasks, max_workers, args=(initializer, initargs, max_tasks_per_worker, task_timeout is not None),
            start_method=start_method, grace=self.grace, initial_state=State.RUNNING,
            on_event=None if on_event is None else self._event, ack_timeout=None,
        )
        self._pc._plane = self
        self._pc._background = False  # the manager thread pumps it
        self._place = place
        if place is not None:
            self._pc._context_ids = place[:2]
        self._pc.start()
        self._owner: weakref.ref[Any] | None = None  # the ProcessExecutor, once watch() is called
        self._thread = threading.Thread(target=self._manage, name="procctl-executor", daemon=True)
        threads.start(self._thread)
        _live_executors.add(self)

    @property
    def workers(self) -> int:
        return self._max_workers

    def watch(self, owner: object) -> None:
        """Shut down, as shutdown(wait=False), once `owner` is collected: its
        collection wakes the manager, which finds the reference dead."""
        wakeup = self._pc.wakeup
        self._owner = weakref.ref(owner, lambda _: wakeup())

    # -- the Executor API -----------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule `fn(*args, **kwargs)`; return its Future."""
        return self._submit(self._new_task(self._pickled(fn), (CALL, args, kwargs), [_item_of(args, kwargs)], False))

    def _submit(self, task: _Task) -> Future[Any]:
        self._enqueue([task])
        self._broken_told = self._broken is not None
        assert task.future is not None
        return task.future

    def submit_counted(self, count: int, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """submit(), the task counted as `count` items in counts(), status() and
        its events (a ClusterExecutor node's task that runs a map chunk)."""
        return self._submit(self._new_task(self._pickled(fn), (CALL, args, {}), [_item_of(args, {})] * max(1, count),
                                           False))

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any],
        timeout: float | None = None, chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Results of `fn` over the items, in order. `chunksize` None picks one
        as Pool.map does (len / (4 * workers)); a chunk still pauses and stops
        between its items. `timeout` counts from this call, as the stdlib's."""
        if chunksize is not None:
            check_count("chunksize", chunksize, 1, "a positive integer or None")
        end = map_deadline(timeout)
        star = len(iterables) != 1
        items: Sequence[Any]
        if star:
            items = list(zip(*iterables))  # noqa: B905 - as the stdlib's map: the shortest ends it
        elif isinstance(iterables[0], (list, tuple, range)):
            items = iterables[0]  # sliced below: each task gets its own copy
        else:
            items = list(iterables[0])
        if chunksize is None:
            # Pool.map's rule; with max_tasks_per_worker, one item a task as the stdlib's
            # map: a chunk counts as one task, and a worker would run the whole map.
            chunksize = 1 if self._max_tasks is not None else max(1, math.ceil(len(items) / (4 * self._max_workers)))
        fn_blob = self._pickled(fn)
        run = _MapRun(-(-len(items) // chunksize))  # (integers: a chunksize of 10**400 is one chunk)
        chunked = chunksize > 1
        # Whole chunks per slice; big chunks go out one by one, as soon as pickled.
        step = chunksize * max(1, SUBMIT_SLICE // chunksize)
        for start in range(0, len(items), step):
            part: Any = items[start:start + step]
            first = start // chunksize
            if not chunked:
                tasks = [self._new_task(fn_blob, (CALL, item if star else (item,), {}), [item], False,
                                        run, first + i)
                         for i, item in enumerate(part)]
            else:
                tasks = [self._new_task(fn_blob, (CHUNK, part[i:i + chunksize], star), part[i:i + chunksize],
                                        True, run, first + i // chunksize)
                         for i in range(0, len(part), chunksize)]
            self._enqueue(tasks)
        self._broken_told = self._broken is not None

        def results() -> Generator[Any, None, None]:
            # Nothing here holds an outcome once it is yielded: a chunk's items
            # are popped off its list as they go (_Chunks chains the pops).
            i = 0
            try:
                if not chunked:
                    for i in range(len(run.values)):
                        yield run.take(i, end)
                else:
                    for i in range(len(run.values)):
                        chunk = run.take(i, end)
                        if type(chunk) is _Cut:
                            yield _popping(chunk)
                            raise CancelledError()  # stop() cut the chunk: the rest was handed back
                        if type(chunk) is _Failed:
                            error = chunk.error
                            yield _popping(chunk)
                            raise error  # an item of the chunk crashed: the ones before it are yielded
                        yield _popping(chunk)
                i = len(run.values)
            finally:
                if sum(run.cancel(j) for j in range(i, len(run.values))):
                    # Let go of (the iterator closed, a timeout): what a worker holds of
                    # it and has not begun comes back, and is cancelled as the rest is.
                    # No lock here: the collector may close the iterator in any thread,
                    # while it holds one (the manager's pass takes the request).
                    self._reclaims.append(run)
                    self._pc.wakeup()

        if chunked:
            return _Chunks.of(results())
        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the stdlib's: no new tasks; with `cancel_futures`, cancel those
        not yet sent to a worker; the rest run (a paused pool is resumed)."""
        with self._lock:
            self._shutdown = True
        if self._in_manager():
            self._inline("shutdown", cancel_futures)
            if wait:  # as the stdlib's, whose callbacks run in its manager thread too
                raise RuntimeError("shutdown(wait=True) cannot wait from a done callback or on_event: they run "
                                   "in the executor's own thread (the shutdown goes on; use wait=False there)")
            return
        # The manager first sends out what it can, as ProcessPoolExecutor
        # has its call queue filled, then cancels the rest.
        self._command("shutdown", cancel_futures)
        if wait:
            self._thread.join()

    # -- pause, resume, stop ------------------------------------------------------

    def pause(self, timeout: float | None = None) -> None:
        """Start no new task; return once every worker acknowledged (a task that
        never checkpoints pauses when it ends). TimeoutError after `timeout`.

        From a done callback or on_event (the executor's own thread, which
        reads the acknowledgements) it returns once PAUSED is posted: no task
        is sent from then on."""
        timeout = check_timeout("timeout", timeout)
        if self._in_manager():
            self._inline("pause", None)
            return
        self._acknowledged(self._command("pause", None), timeout, State.PAUSED)

    def resume(self, timeout: float | None = None) -> None:
        """Let the pool run again; return once every worker acknowledged
        (from a done callback or on_event: once RUNNING is posted)."""
        timeout = check_timeout("timeout", timeout)
        if self._in_manager():
            self._inline("resume", None)
            return
        self._acknowledged(self._command("resume", None), timeout, State.RUNNING)

    def _acknowledged(self, fut: Future[Any], timeout: float | None, state: State) -> None:
        """Wait for a pause or resume; a TimeoutError names the workers that
        did not acknowledge, as the controller's does."""
        try:
            _result_within(fut, timeout)
        except FutureTimeout:
            try:
                late = sorted(self._pc._awaiting)  # read from this thread: a copy, for the message only
            except RuntimeError:  # it changed meanwhile
                late = []
            who = f"workers {late}" if late else "the executor's workers"
            raise TimeoutError(f"{who} did not acknowledge {state.name} within {timeout}s") from None

    def stop(self, grace: float | None = None) -> Unfinished:
        """Take no new task, stop the running ones (checkpoint() returns False),
        escalate after `grace` seconds, and hand back every item that did not
        complete, once each. Their futures are cancelled.

        From a done callback or on_event it runs there and then, in the
        executor's own thread (a second stop() returns an empty Unfinished)."""
        given = None if grace is None else check_timeout("grace", grace, allow_none=False)
        with self._lock:
            self._shutdown = True
        seconds = self.grace if given is None else given
        if self._in_manager():
            done: Unfinished = self._inline("stop", seconds)
            return done
        fut = self._command("stop", seconds)
        result: Unfinished = fut.result()
        self._thread.join()
        return result

    def kill(self) -> None:
        """SIGKILL every worker now and run no more tasks; the tasks they ran
        are interrupted. Then `stop()` (or `shutdown()`) hands back every item
        that did not complete, once each, as after any stop.

        Safe to call from a signal handler (a second Ctrl-C): it only records
        the request and wakes the manager thread, which kills, also in the
        middle of a stop's grace period.
        """
        self._kill_asked = True
        self._pc.wakeup()

    @property
    def paused(self) -> bool:
        return self._paused

    def counts(self) -> TaskCounts:
        """Submitted tasks, by where they are now; a map counts each of its
        items as a task, whatever its chunks. `running` is one a busy worker
        (a worker runs one item at a time, and a task it holds runs once it
        has begun it: a paused worker's next tasks wait); the rest not done
        are `queued`."""
        board = self._pc._board
        with self._lock:
            submitted, completed, failed, cancelled = (
                self._submitted, self._completed, self._failed, self._cancelled)
            # A future its caller cancelled is counted once the manager meets it
            # in the queue (it skips it there): until then, here.
            cancelled += sum(1 for task in self._pending if task.future is not None and task.future.cancelled())
            running = sum(1 for line in list(self._lines.values()) if not line.closed and _begun(line, board))
        queued = max(0, submitted - completed - failed - cancelled - running)
        return TaskCounts(submitted, completed, failed, cancelled, running, queued)

    def status(self) -> list[WorkerStatus]:
        """Each worker's status; `done` counts the tasks it ended (completed
        or failed, a replaced worker's too), and the totals add up to every
        task submitted but the cancelled."""
        if self._in_manager():
            return list(self._inline("status", None))
        if not self._thread.is_alive():
            return []
        return list(self._command("status", None).result())

    # -- the caller's side of the manager ------------------------------------------

    def _command(self, name: str, arg: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            closed = self._commands_closed
            if not closed:
                self._commands.append((name, arg, fut))
        if closed:
            _answer_stopped(name, fut, "the executor is shut down")
        else:
            self._pc.wakeup()
        return fut

    def _in_manager(self) -> bool:
        """Called from the manager thread: from a done callback or on_event."""
        return threading.current_thread() is self._thread

    def _inline(self, name: str, arg: Any) -> Any:
        """Run a command here in the manager thread (where a done callback or
        on_event runs, at a point where the manager's state is whole): waiting
        for the manager would wait for ourselves. A pause or resume is
        acknowledged later, where nobody can wait for it."""
        fut: Future[Any] = Future()
        if self._finishing and name == "status":
            fut.set_result(self._statuses())
        elif self._finishing:
            _answer_stopped(name, fut, "the executor is stopping")
        else:
            self._run_command(name, arg, fut)
        return fut.result() if fut.done() else None

    def _pickled(self, fn: Callable[..., Any]) -> bytes | BaseException:
        """`fn` pickled (once for a map's tasks), or why it cannot be."""
        try:
            return pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - the futures carry it, as ProcessPoolExecutor's do
            return exc

    def _new_task(self, fn: bytes | BaseException, call: tuple[Any, ...], items: list[Any], chunk: bool,
                  run: _MapRun | None = None, index: int = 0) -> _Task:
        task = _Task(next(self._tids), _TaskFuture() if run is None else None, b"", b"", items, chunk, run, index)
        if isinstance(fn, BaseException):
            task.set_exception(fn)
            return task
        try:
            task.blob = pickle.dumps(call, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - the future carries it, as ProcessPoolExecutor's does
            task.set_exception(exc)
            return task
        task.fn = fn
        return task

    def _enqueue(self, tasks: list[_Task]) -> None:
        wake = False
        with self._lock:
            broken = self._broken
            if broken is not None and self._broken_told:
                raise BrokenProcessPool(broken)
            if broken is None and self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitted += sum(len(t.items) for t in tasks)
            if broken is not None:
                self._failed += sum(len(t.items) for t in tasks)
            else:
                self._pending.extend(t for t in tasks if t.blob)
                self._failed += sum(len(t.items) for t in tasks if not t.blob)
                wake, self._idle = self._idle, False
        if broken is not None:
            # The pool broke (its initializer failed) before this call could
            # know: as with ProcessPoolExecutor's first submit, which starts
            # the workers, the futures carry it; later calls raise. (Outside
            # the lock: a done-callback may submit.)
            for task in tasks:
                task.set_exception(BrokenProcessPool(broken))
        elif wake:
            self._pc.wakeup()

    # -- the manager thread ------------------------------------------------------

    def _manage(self) -> None:
        try:
            while not self._finished:
                self._pc._pump(self._sleep_for())
                if self._owner is not None and self._owner() is None:
                    self._abandoned()
                if self._kill_asked:
                    self._kill_now()
                if self._take_commands():
                    break
                self._replace_ended()
                self._dispatch()
                self._expire()
                self._shrink_slow_windows()
                self._settle_broadcasts()
                self._deliver()  # a callback there may stop us: then we are finished
                if not self._finished and self._closing and (self._drained() or self._killed):
                    self._finish(self.grace)
        except BaseException:  # noqa: BLE001 - never leave workers or callers behind
            log.exception("the executor's manager thread failed")
            self._finish(0.0)
            raise
        finally:
            # A command that came while the stop ran (a second stop(), a
            # shutdown at exit after a Ctrl-C) is answered, not left waiting.
            with self._lock:
                self._commands_closed = True
                left, self._commands = self._commands, deque()
            for name, _, fut in left:
                _answer_stopped(name, fut, "the executor stopped")

    def _abandoned(self) -> None:
        """The ProcessExecutor was collected without shutdown(): shut down as
        shutdown(wait=False) does (the tasks submitted still run, for whoever
        holds their futures; then the workers stop and this thread ends)."""
        self._owner = None
        with self._lock:
            self._shutdown = True
        self._run_command("shutdown", False, Future())

    def _sleep_for(self) -> float | None:
        """How long the manager may sleep: until the next task deadline."""
        with self._lock:
            if self._commands or self._reclaims or self._later or (self._pending and self._has_room()):
                return 0.0
            self._idle = True
        # While paused too: a task that never reaches a checkpoint does not pause, and times out.
        due = [self._head_started(line) + self.task_timeout for line in self._lines.values()
               if line.held and line.up and not line.closed and line.paused_at is None
               ] if self.task_timeout is not None else []
        if not self._paused:
            due += [self._head_started(line) + SLOW_HEAD for line in self._lines.values() if self._may_shrink(line)]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def _has_room(self) -> bool:
        if self._paused or self._stopping:
            return False
        window = self._window()
        return any(len(line.held) < window and not line.closed for line in self._lines.values())

    def _window(self) -> int:
        return QUICK_WINDOW if self._task_time < QUICK_TASK else WINDOW

    def _take_commands(self) -> bool:
        """Run queued commands; True once the executor has stopped."""
        while self._reclaims and not self._finished:
            self._reclaim(self._reclaims.popleft())
        while not self._finished:
            with self._lock:
                if not self._commands:
                    return False
                name, arg, fut = self._commands.popleft()
            self._run_command(name, arg, fut)
        return True

    def _reclaim(self, run: _MapRun) -> None:
        """What workers hold of a map run let go of comes back (then cancelled: its
        slots are); all a worker has not begun comes back, what is not the run's goes out again."""
        for line in self._lines.values():
            if not line.closed and any(task.run is run for task in line.held):
                self._ask_back(line)

    def _run_command(self, name: str, arg: Any, fut: Future[Any]) -> None:
        if name == "pause" or name == "resume":
            self._broadcast(State.PAUSED if name == "pause" else State.RUNNING, fut)
        elif name == "status":
            fut.set_result(self._statuses())
        elif name == "shutdown":
            self._closing = True
            if self._paused:
                self._broadcast(State.RUNNING, None)
            if arg:
                # As the stdlib's: what has not gone to a worker is cancelled
                # (an idle worker takes one first, as the stdlib's call queue
                # holds some), and so is what a worker gives back from now on.
                self._cancel_unstarted = True
                self._dispatch()
                with self._lock:
                    pending, self._pending = self._pending, deque()
                self._cancel_tasks(pending)
                # And what a busy worker holds behind the task it has begun (a
                # worker not yet at its first keeps it: it is about to start it).
                for line in self._lines.values():
                    if len(line.held) > 1 and not line.closed and _begun(line, self._pc._board):
                        self._ask_back(line)
            fut.set_result(None)
        elif name == "stop":
            fut.set_result(self._finish(arg))

    def _broadcast(self, state: State, fut: Future[Any] | None) -> None:
        if self._stopping:
            if fut is not None:
                fut.set_exception(RuntimeError("the executor is stopping"))
            return
        self._paused = state is State.PAUSED
        self._pc._post(state)
        if fut is not None:
            self._pause_waiters.append((state, fut))
        self._settle_broadcasts()

    def _settle_broadcasts(self) -> None:
        if self._pause_waiters and not self._pc._awaiting:
            waiters, self._pause_waiters = self._pause_waiters, []
            for _, fut in waiters:
                fut.set_result(None)

    def _dispatch(self) -> None:
        if self._paused or self._stopping:
            return
        for line in self._lines.values():  # one each first: idle workers start at once
            if not line.held and not line.closed:
                self._fill(line, 1)
        for line in self._lines.values():
            if not line.closed:
                self._fill(line)
        self._steal_for_idle()

    def _steal_for_idle(self) -> None:
        """An idle worker takes over tasks still unread behind another's long one."""
        idle = [line for line in self._lines.values() if not line.held and not line.closed]
        if not idle:
            return
        with self._lock:
            if self._pending:
                return
        for line in self._lines.values():
            if not idle:
                return
            if line.closed or len(line.held) < 2:
                continue
            try:
                msg = workwire.recv(line.child)  # atomic: the worker reads it or we do
            except (BlockingIOError, InterruptedError):
                continue
            if msg is None or msg.kind is not Kind.TASK:
                continue
            self._take_back(line, set(workwire.task_ids(msg)))
            self._fill(idle.pop(), 1)

    def _take_back(self, line: _WorkerLine, tids: set[int]) -> None:
        """Tasks `line` holds and will never start go first in line again
        (after shutdown(cancel_futures=True), they are cancelled)."""
        head = line.held[0] if line.held else None
        back = [t for t in line.held if t.tid in tids]
        line.held = deque(t for t in line.held if t.tid not in tids)
        line.sent -= len(back)
        if line.held and line.held[0] is not head:
            line.held[0].started = time.monotonic()
        if self._stopping:
            self._unfinished.extend((t, False) for t in back)
            return
        for task in back:
            task.unclaim()
        if self._cancel_unstarted:
            self._cancel_tasks(back)
        else:
            with self._lock:
                self._pending.extendleft(reversed(back))

    def _cancel_tasks(self, tasks: Iterable[_Task]) -> None:
        runs = set()
        for task in tasks:
            if task.cancel():
                self._cancelled += len(task.items)
            if task.run is not None:
                runs.add(task.run)
        for run in runs:
            run.wake()  # a map's caller waiting on one of them sees it cancelled

    def _may_shrink(self, line: _WorkerLine) -> bool:
        """`line` holds more than a slow window behind a head it was not asked about."""
        return (len(line.held) > WINDOW and line.up and not line.closed
                and line.asked_back is not line.held[0])

    def _shrink_slow_windows(self) -> None:
        """A head that has run SLOW_HEAD or more: tasks are not quick (any more),
        so the window is a slow one, and the tasks behind the head go back."""
        if self._paused or self._stopping:
            return
        now = time.monotonic()
        for line in self._lines.values():
            if self._may_shrink(line):
                ran = now - self._head_started(line)
                if ran >= SLOW_HEAD:
                    self._task_time = max(self._task_time, ran)
                    self._ask_back(line)

    def _ask_back(self, line: _WorkerLine) -> None:
        """Take back what `line`'s worker holds and has not started: the tasks
        it has not read now, the ones it read as soon as its returner thread
        hears the signal (RETURNED), even while it runs the slow one."""
        if not line.held or line.closed:
            return
        line.asked_back = line.held[0]
        # Every task of what we read comes back, the head too if it was there
        # (then it had not started): the worker may read the next message
        # meanwhile, and runs what it holds in the order sent, so only whole
        # messages taken out keep that order the manager's.
        self._take_back(line, _unread(line))
        if len(line.held) > 1 and self._pc._board is not None:
            self._pc._board.ask_back(line.wid)
            if line.returner:  # (the worker's thread that waits for the signal)
                self._pc._signal_thread(line.wid, line.returner, RETURN_SIGNAL)

    def _fill(self, line: _WorkerLine, window: int | None = None) -> None:
        """Send `line` tasks up to the window, several to a message when tasks are quick."""
        room = (window or self._window()) - len(line.held)
        if self._max_tasks is not None:
            room = min(room, self._max_tasks - line.sent)
        batch = QUICK_BATCH if self._task_time < QUICK_TASK else 1
        while room > 0:
            tasks: list[_Task] = []
            size = 0
            with self._lock:
                pending = self._pending
                while pending and len(tasks) < room and len(tasks) < batch and size < BATCH_BYTES:
                    task = pending.popleft()
                    tasks.append(task)
                    size += len(task.blob) + len(task.fn)
            if not tasks:
                return
            live = []
            for task in tasks:
                if task.claim():
                    live.append(task)
                else:
                    self._cancelled += len(task.items)
            if not live:
                continue
            try:
                workwire.send(line.sock, Kind.TASK, 0, len(live),
                              workwire.pack_tasks([(t.tid, t.fn, t.blob) for t in live]))
            except OSError:
                with self._lock:
                    self._pending.extendleft(reversed(live))
                return
            if not line.held:
                live[0].started = time.monotonic()
            line.held.extend(live)
            line.sent += len(live)
            room -= len(live)

    def _expire(self) -> None:
        """Kill the worker of a task past task_timeout. A paused worker's clock is
        stopped; one that has not acknowledged a pause (its task never reaches a
        checkpoint) is running, and its task times out as ever."""
        if self.task_timeout is None:
            return
        now = time.monotonic()
        for line in self._lines.values():
            if line.held and line.up and not line.closed and line.timed_out is None and line.paused_at is None:
                task = line.held[0]
                if self._pc._board is not None and not self._pc._board.task_running(line.wid, task.tid):
                    continue  # not begun yet (its worker still sends the last result), or returned
                if now - self._head_started(line) >= self.task_timeout:
                    line.timed_out = task
                    self._pc._kill_worker(line.wid)

    def _head_started(self, line: _WorkerLine) -> float:
        """When what `line`'s worker runs began: its first task, or inside a
        map chunk, the item it is at (the worker says so on the board), so
        that task_timeout counts per item, not per chunk."""
        task = line.held[0]
        if self._pc._board is None:
            return task.started
        return max(task.started, self._pc._board.item_started(line.wid))

    def _replace_ended(self) -> None:
        if self._stopping or self._broken is not None:
            self._respawn.clear()
            return
        for wid in sorted(self._respawn):
            self._respawn.discard(wid)
            self._pc._respawn(wid)

    def _drained(self) -> bool:
        with self._lock:
            if self._pending:
                return False
        return not any(line.held for line in self._lines.values() if not line.closed)

    def _finish(self, grace: float) -> Unfinished:
        """Stop every worker, account for every task, leave."""
        # A stop that hands back 100,000 tasks makes and drops objects by the
        # hundred thousand: the collector would walk every future meanwhile,
        # for nothing (as while forking, controller.py, it waits until we are done).
        collect = gc.isenabled()
        gc.disable()
        self._finishing = True
        try:
            self._deliver()  # what came before the stop, in order, before what comes in it
            return self._stop_and_account(grace)
        finally:
            if collect:
                gc.enable()
            self._finished = True

    def _stop_and_account(self, grace: float) -> Unfinished:
        self._stopping = True
        with self._lock:
            self._shutdown = True
            pending, self._pending = self._pending, deque()
            commands, self._commands = self._commands, deque()
        try:
            # Tell the workers first: they stop while we cancel the queued futures.
            if self._pc._state is not State.STOPPED and self._pc._board is not None:
                self._pc._post(State.STOPPED)
        except Exception:  # noqa: BLE001 - stop() below posts it again and escalates
            log.debug("posting STOPPED early failed", exc_info=True)
        queued: list[_Task] = []
        runs: set[_MapRun] = set()
        for task in pending:
            if task.cancel():
                queued.append(task)
                if task.run is not None:
                    runs.add(task.run)
        self._cancelled += sum(len(task.items) for task in queued)
        for run in runs:
            run.wake()
        try:
            self._pc.stop(self._wait_grace(grace))
        finally:
            for line in list(self._lines.values()):
                if not line.closed:
                    self._end_line(line, None)
            # A pause or resume overtaken by a stop returns: no task starts
            # from now on, which is all either could still promise.
            for _, fut in self._pause_waiters:
                fut.set_result(None)
            self._pause_waiters = []
            for name, _, fut in commands:
                _answer_stopped(name, fut, "the executor stopped")
        held: list[tuple[_Task, bool]] = []
        for task, was_running in self._unfinished:
            if task.done and task.chunk:
                # A chunk cut short: its first items completed, the rest go back.
                if not task.set_result(_Cut(task.done) if task.rerun is None else task.rerun.outcome(task.done, True)):
                    continue
                self._completed += len(task.done)
                self._cancelled += len(task.items) - len(task.done)
                held.append((task, was_running))
            elif task.cancel():
                self._cancelled += len(task.items)
                held.append((task, was_running))
            if task.run is not None:
                task.run.wake()
        self._unfinished = []
        # In submission order, with no object made per task (100,000 of them
        # would wake the garbage collector over every future). The queued ones
        # are in order as a rule (a sort of a sorted list is one pass in C), but
        # not always: what a worker gave back or a retry goes first in line
        # again. The few the workers held merge in.
        tid = operator.attrgetter("tid")
        queued.sort(key=tid)
        interrupted = sorted((task for task, flag in held if flag), key=tid)
        others = sorted((task for task, _ in held), key=tid)
        if not others or (queued and tid(others[-1]) < tid(queued[0])):
            everything = others + queued  # as a rule, workers hold the first ones
        else:
            everything = queued + others
            everything.sort(key=tid)
        left = [task.items[len(task.done):] if task.done else task.items for task in others]
        for task, rest in zip(others, left, strict=True):
            task.items = rest  # a cut chunk: only what did not run goes back
        items = [item for task in everything for item in task.items]
        futures: list[Future[Any]] = [task.future for task in everything if task.future is not None and not task.done]
        # Of a chunk, only the item it was in (the first of its block) ran.
        running = [task.items[0] for task in interrupted if task.items]
        _live_executors.discard(self)
        return Unfinished(items, running, futures)

    def _kill_now(self) -> None:
        """kill() was called: stop taking tasks, SIGKILL every worker (their
        deaths, handled as during a stop, make their tasks unfinished)."""
        if self._killed:
            return
        self._killed = True
        self._stopping = True
        with self._lock:
            self._shutdown = True
        self._pc.kill()

    def _wait_grace(self, grace: float) -> float:
        """Wait up to `grace` for the workers to end after STOPPED, here where
        kill() can cut it short; what is left of it for the controller's stop
        (which escalates after it)."""
        if not self._pc.pids():
            return grace
        if self._pc.state is not State.STOPPED:
            self._pc._post(State.STOPPED)
        end = time.monotonic() + grace
        while not self._kill_asked:
            left = end - time.monotonic()
            if left <= 0 or self._pc.wait(None if math.isinf(left) else left):
                break
        if self._kill_asked:
            self._kill_now()
            self._pc.wait_ended(self._pc.kill_timeout)  # SIGKILLed: they end at once
            return 0.0
        return max(0.0, end - time.monotonic())

    # -- the controller's hooks (called in the manager thread, inside _pump) -----------

    def attach(self, wid: int) -> tuple[InheritedFd, int | None]:
        old = self._lines.get(wid)
        if old is not None and not old.closed:
            self._end_line(old, None)
        line = _WorkerLine(wid)
        if old is not None:  # a new incarnation of worker `wid`: its tally goes on (status() adds up)
            line.done = old.done
        self._lines[wid] = line
        return InheritedFd(line.child.fileno()), line.sock.fileno()

    def wire_spec(self) -> dict[str, tuple[int, int]]:
        return {}

    def readable(self, wid: int) -> None:
        line = self._lines.get(wid)
        if line is not None and not line.closed:
            msgs = workwire.recv_all(line.sock)
            results = [msg for msg in msgs if msg.kind is Kind.RESULT]
            if len(results) == len(msgs):
                self._on_results(line, results)
            else:
                for msg in msgs:
                    self._on_message(line, msg)
            # UP frees no room: the tasks go out in _dispatch's order (one to
            # each idle worker first), not to whichever worker said UP first.
            if not self._stopping and not self._paused and any(msg.kind is not Kind.UP for msg in msgs):
                self._fill(line)

    def posted(self, state: State) -> None:
        if state is State.STOPPED:
            self._stopping = True

    def ended(self, wid: int, report: WorkerReport | None = None) -> None:
        line = self._lines.get(wid)
        if line is not None and not line.closed:
            self._end_line(line, report)

    def acknowledged(self, wid: int, state: State) -> None:
        # A paused worker's tasks stay with it (it runs them once resumed); the
        # clock of the one it was running stops while it is paused.
        line = self._lines.get(wid)
        if line is None or line.closed:
            return
        if state is State.PAUSED:
            if line.paused_at is None:
                line.paused_at = time.monotonic()
        elif line.paused_at is not None:
            if line.held:
                # A paused task is not running late: move its clock on by the time
                # it spent paused (from the pause, or from when it came, if later:
                # one sent on the resume waited only for the worker to wake).
                start = self._head_started(line)
                line.held[0].started = start + time.monotonic() - max(line.paused_at, start)
            line.paused_at = None

    def settle(self) -> None:
        pass  # the manager thread reads every result as it comes

    def release(self) -> None:
        for line in self._lines.values():
            if not line.closed:
                self._end_line(line, None)

    # -- results and ends ------------------------------------------------------------

    def _on_message(self, line: _WorkerLine, msg: workwire.Message) -> None:
        if msg.kind is Kind.RESULT:
            self._on_results(line, [msg])
        elif msg.kind is Kind.RETURNED:
            self._take_back(line, set(workwire.task_ids(msg)))
        elif msg.kind is Kind.UP:
            line.up = True
            line.returner = msg.tag
            if line.held:
                line.held[0].started = time.monotonic()  # a slow start is not the task's time
        elif msg.kind is Kind.INIT_FAILED:
            self._break(f"the initializer failed in {self._name(line.wid)}:\n"
                        f"{msg.payload.decode(errors='replace')}")

    def _on_results(self, line: _WorkerLine, msgs: list[workwire.Message]) -> None:
        held = line.held
        now = time.monotonic()
        mean = self._task_time
        runs: set[_MapRun] = set()
        for msg in msgs:
            if not held or held[0].tid != msg.tag:
                log.error("worker %d answered task %d it does not hold", line.wid, msg.tag)
                continue
            task = held.popleft()
            # A running mean of the time a task holds the head of its line.
            mean += (now - task.started - mean) * 0.25
            if held:
                held[0].started = now
            try:
                status, value, tb = pickle.loads(msg.payload)
            except BaseException as exc:  # noqa: BLE001 - unpickling runs the result's own code, even sys.exit()
                # That task's error, as a task's own SystemExit would be; the pool goes on.
                status, value, tb = ERR, exc, ("the result could not be unpickled in the executor's process:\n"
                                               + traceback.format_exc())
            if status == OK:
                line.done += len(task.items)
                if task.run is not None:
                    runs.add(task.run)
                if task.rerun is not None:
                    value = task.rerun.outcome(value, False)
                # A map item whose caller let go while it ran (its map() ended
                # early) still completed, as a running future the stdlib's map
                # cannot cancel: counted so, its result dropped.
                if not task.set_result(value, self._outbox()) and task.run is None:  # a future handed back
                    self._cancelled += len(task.items)
                    continue
                if self._on_event is None:
                    self._completed += len(task.items)
                else:
                    for _ in task.items:  # one event an item, also in a map chunk
                        self._completed += 1
                        self._task_event("task-done", line, task)
            elif status == ERR:
                line.done += len(task.items)
                self._on_error(line, task, value, tb)
            elif status == ERR_AT:
                line.done += len(task.items)
                self._on_item_error(line, task, value, tb)
            else:  # stopped: it saw STOPPED and did not complete (a chunk: not all of it)
                task.done = value
                self._unfinished.append((task, bool(tb)))
        self._task_time = mean
        value = None  # the caller who takes the last result may be its only holder (bpo-14406)
        for run in runs:
            run.wake()

    def _on_error(self, line: _WorkerLine, task: _Task, value: Any, tb: str) -> None:
        if isinstance(value, BaseException):
            value.__cause__ = RemoteTraceback(tb)
        else:
            value = RuntimeError(str(value))
        if not task.set_exception(value, self._outbox()) and task.run is None:  # (a map item: see _on_results)
            self._cancelled += len(task.items)
            return
        self._failed += len(task.items)
        self._task_event("task-failed", line, task, error=error_line(tb))

    def _on_item_error(self, line: _WorkerLine, task: _Task, value: tuple[BaseException, list[Any]],
                       tb: str) -> None:
        """An item of a map chunk raised: map() yields the results of the items
        before it, then raises its exception there (as the stdlib's map does
        with one item a task); the chunk's items after it did not run and
        fail with it, as a chunk's items did."""
        exc, before = value
        if len(before) >= len(task.items):
            self._on_error(line, task, exc, tb)
            return
        exc.__cause__ = RemoteTraceback(tb)
        if task.rerun is not None:
            task.rerun.errors.setdefault(task.rerun.where[len(before)], exc)
            outcome = task.rerun.outcome(before, False)
        else:
            outcome = _Failed(before, exc)
        ok = task.set_result(outcome)
        if task.run is not None:
            task.run.wake()
        if not ok and task.run is None:  # (a map item: see _on_results)
            self._cancelled += len(task.items)
            return
        for _ in before:
            self._completed += 1
            self._task_event("task-done", line, task)
        self._failed += len(task.items) - len(before)
        self._task_event("task-failed", line, task, error=error_line(tb))

    def _end_line(self, line: _WorkerLine, report: WorkerReport | None) -> None:
        """The worker is gone: results it sent count, unread tasks go back in
        line, the task it was running fails, is retried or is unfinished."""
        for msg in workwire.recv_all(line.sock):
            self._on_message(line, msg)
        unread = _unread(line)
        line.closed = True
        self._pc._unregister(line.sock.fileno())
        line.sock.close()
        line.child.close()
        # The worker ran its tasks in order, each result sent before the next
        # began: of those it read, only the first without a result can have started.
        started = [t for t in line.held if t.tid not in unread][:1]
        self._take_back(line, {t.tid for t in line.held if t not in started})
        line.held.clear()
        for task in started:
            self._task_lost(line, task, report)
        if report is not None and not self._stopping:
            # A worker that never said UP failed in its start (its initializer
            # says INIT_FAILED): the pool cannot run tasks. One that said UP
            # failed in a task, its first or not: that task's loss, above.
            # One that died before it was up without a word (an os._exit, a segfault) died in
            # its initializer, or, without one, again and again: started anew, it would die anew.
            failed = report.outcome is Outcome.FAILED
            if not line.up and self._broken is None and (
                    failed or self._has_initializer or self._early_deaths >= EARLY_DEATHS):
                how = "could not start" if failed else "died before it was up"
                self._break(f"{self._name(line.wid)} {how}: {report.error_line or describe_exit(report.exitcode)}")
            else:
                self._early_deaths = 0 if line.up else self._early_deaths + 1
                self._respawn.add(line.wid)

    def _global_id(self, wid: int) -> int:
        """A worker's id as the run knows it (on a cluster node, counted over all the nodes)."""
        return wid if self._place is None else self._place[0] + wid

    def _name(self, wid: int) -> str:
        """How errors name a worker: its id (on a cluster node, the global one and the node)."""
        if self._place is None:
            return f"worker {wid}"
        return f"worker {self._global_id(wid)} on node {self._place[2]}"

    def _task_lost(self, line: _WorkerLine, task: _Task, report: WorkerReport | None) -> None:
        if self._stopping and line.timed_out is not task:
            self._unfinished.append((task, True))
            return
        if line.timed_out is task:
            error: BaseException = TaskTimeout(
                f"the task ran longer than task_timeout={self.task_timeout}s; "
                f"{self._name(line.wid)} (pid {report.pid if report else '?'}) was killed")
            name = "task-timeout"
        else:
            exitcode = report.exitcode if report is not None else None
            how = describe_exit(exitcode)
            if exitcode is not None and exitcode < 0:
                how = f"was killed by {signal_name(-exitcode)}"
            elif report is not None and report.outcome is Outcome.FAILED and report.error_line:
                how = f"failed ({report.error_line})"  # its exit code says nothing then
            error = WorkerCrashed(
                f"{self._name(line.wid)} (pid {report.pid if report else '?'}) {how} while running this task "
                f"(exit code {exitcode})")
            name = "task-crashed"
        error.worker_id = self._global_id(line.wid)  # type: ignore[attr-defined]
        if task.chunk and not self._stopping and self._item_lost(line, task, error, name):
            return
        if task.attempts < self.retries and not self._stopping:
            task.attempts += 1
            with self._lock:
                self._pending.appendleft(task)
            self._task_event("task-retry", line, task, error=str(error))
            return
        if not task.set_exception(error, self._outbox()):
            self._cancelled += len(task.items)
            return
        self._failed += len(task.items)
        line.done += len(task.items)  # its worker's, as a task that raised is
        self._task_event(name, line, task, error=str(error))

    def _item_lost(self, line: _WorkerLine, task: _Task, error: BaseException, name: str) -> bool:
        """A map chunk's worker died in it: the item it ran fails (or is
        retried), the others go first in line again, those that ran too (their
        results died with the worker), none of it counted as a retry. False if
        the board does not say which items ran (the chunk then fails whole)."""
        board = self._pc._board
        at = None if board is None else board.items_running(line.wid, task.tid)
        if at is None or at[1] == 0 or at[0] >= len(task.items):
            return False  # it died before its first item, or between two (its results' pickling)
        first, count = at
        if task.rerun is None:
            task.rerun = _Rerun(len(task.items), pickle.loads(task.blob)[2])
        rerun = task.rerun
        if count > 1:
            # Somewhere in a block of quick items: run them again one by one, saying each.
            rerun.suspects.update(rerun.where[first:first + count])
            log.info("worker %d died in a block of %d items of map chunk %d: running them again one by one",
                     line.wid, count, task.tid)
        else:
            place = rerun.where[first]
            # A crash in a block this item was in was its too (the one that made us look).
            crashes = rerun.crashes.get(place, 0) + 1 + (place in rerun.suspects)
            rerun.crashes[place] = crashes
            rerun.suspects = {p for p in rerun.suspects if p > place}
            if crashes <= self.retries:
                self._task_event("task-retry", line, task, error=str(error))
            else:
                rerun.errors[place] = error
                del rerun.where[first]
                if not isinstance(task.items, list):  # map() keeps a range or a tuple as it is
                    task.items = list(task.items)
                del task.items[first]
                self._failed += 1
                line.done += 1
                self._task_event(name, line, task, error=str(error))
        if not task.items:  # it was the last one
            task.set_result(rerun.outcome([], False))
            if task.run is not None:
                task.run.wake()
            return True
        kind = PRECISE if rerun.suspects else CHUNK
        task.blob = pickle.dumps((kind, task.items, rerun.star), pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._pending.appendleft(task)
        return True

    def _break(self, why: str) -> None:
        """The pool cannot run tasks (its initializer fails): fail them all."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = why
            self._shutdown = True
            pending, self._pending = self._pending, deque()
        held = [t for line in self._lines.values() for t in line.held]
        for line in self._lines.values():
            line.held.clear()
        if pending or held:
            self._broken_told = True  # their futures say so: later calls raise
        for task in list(pending) + held:
            if task.set_exception(BrokenProcessPool(why), self._outbox()):
                self._failed += len(task.items)
            else:
                self._cancelled += len(task.items)
        self._closing = True

    # -- status and events -----------------------------------------------------------

    def _statuses(self) -> list[WorkerStatus]:
        base = {s.worker_id: s for s in self._pc._snapshot()}
        counts = self.counts()
        held = {wid: sum(len(task.items) for task in list(line.held)) for wid, line in list(self._lines.items())}
        queued = max(0, counts.running + counts.queued - sum(held.values()))  # not in a worker's hands
        live = [line for line in self._lines.values() if not line.closed] or list(self._lines.values())
        share = queued / max(1, len(live))
        out = []
        now = time.monotonic()
        for wid, line in sorted(self._lines.items()):
            s = base.get(wid)
            if s is None:
                continue
            total = line.done + held.get(wid, 0) + share
            rate = line.done / (now - self._t0) if now > self._t0 else None
            eta = (total - line.done) / rate if rate else None
            out.append(WorkerStatus(wid, s.pid, s.state, s.alive, s.outcome, float(line.done),
                                    float(total), rate, eta, s.info))
        return out

    def _task_event(self, name: str, line: _WorkerLine, task: _Task, error: str | None = None) -> None:
        if self._on_event is None:
            return
        self._event(Event(round(time.monotonic() - self._t0, 6), name, worker=line.wid,
                          error=error, done=float(self._completed + self._failed),
                          total=float(self._submitted), task=task.tid))

    def _outbox(self) -> deque[Any] | None:
        """Where the manager puts what it completes: _later, or during the
        final stop (where a second stop() returns at once) nowhere: it is done
        there and then, so that a task completing in the grace is seen then."""
        return None if self._finishing else self._later

    def _event(self, event: Event) -> None:
        """An event of ours or of the controller: for on_event, in order."""
        if self._finishing:
            self._tell(event)
        else:
            self._later.append(event)

    def _tell(self, event: Event) -> None:
        assert self._on_event is not None
        try:
            self._on_event(event)
        except BaseException:  # noqa: BLE001 - even its sys.exit() must not end the manager thread
            log.exception("on_event callback failed for %s", event.event)

    def _deliver(self) -> None:
        """Complete the futures and tell on_event what the manager queued, in
        order, here where its own state is whole: a callback may call any
        method (a stop() runs inline, and then we are finished)."""
        later = self._later
        while later:
            entry = later.popleft()
            if isinstance(entry, Event):
                self._tell(entry)
                continue
            fut, value, failed, n = entry
            try:
                if failed:
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
            except InvalidStateError:  # the caller cancelled it before it was sent
                if failed:
                    self._failed -= n
                else:
                    self._completed -= n
                self._cancelled += n
            except BaseException:  # noqa: BLE001 - a callback's sys.exit() (the Future logs the others)
                log.exception("a done callback of %r failed", fut)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"<ProcessExecutor {self._max_workers} workers, {c.submitted} submitted, "
                f"{c.completed} completed, {c.queued} queued{', paused' if self._paused else ''}>")


class PoolFront(Executor):
    """What ProcessExecutor and ClusterExecutor show of their pool (`_pool`): the
    calls, passed on. The pool's threads hold the pool, never this front, so that
    a front dropped without shutdown() is collected, and its pool shut down."""

    _pool: Any

    @property
    def workers(self) -> int:
        return int(self._pool.workers)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = self._pool.submit(fn, *args, **kwargs)
        return future

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any],
        timeout: float | None = None, chunksize: int | None = None,
    ) -> Iterator[Any]:
        results: Iterator[Any] = self._pool.map(fn, *iterables, timeout=timeout, chunksize=chunksize)
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)

    def pause(self, timeout: float | None = None) -> None:
        self._pool.pause(timeout)

    def resume(self, timeout: float | None = None) -> None:
        self._pool.resume(timeout)

    def stop(self, grace: float | None = None) -> Unfinished:
        left: Unfinished = self._pool.stop(grace)
        return left

    def kill(self) -> None:
        self._pool.kill()

    @property
    def paused(self) -> bool:
        return bool(self._pool.paused)

    def counts(self) -> TaskCounts:
        counts: TaskCounts = self._pool.counts()
        return counts

    def status(self) -> list[WorkerStatus]:
        rows: list[WorkerStatus] = self._pool.status()
        return rows

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """As the stdlib's, shutdown(wait=True); but leaving the block by Ctrl-C (or a
        test's timeout, pytest's outcomes) stops the tasks instead of waiting for them."""
        if exc_type is not None and not issubclass(exc_type, (Exception, SystemExit, GeneratorExit)):
            interrupted(self._pool)
            return
        try:
            self._pool.shutdown(True)
        except KeyboardInterrupt:  # Ctrl-C while it waits for the tasks
            interrupted(self._pool)
            raise

    def __repr__(self) -> str:
        return repr(self._pool)


def interrupted(pool: Any) -> None:
    """What Ctrl-C means for a pool: stop (grace, then escalation), and a second one
    while that stop waits kills the workers at once. The workers ignore SIGINT: the
    manager decides, as a ProcessController's close() does."""
    try:
        pool.stop(pool.grace)
    except KeyboardInterrupt:
        pool.kill()
        raise


class ProcessExecutor(PoolFront):
    """A process pool with the `concurrent.futures` API, plus pause, resume and a stop
    that hands back the unfinished work. A crashed worker fails only its task.

    Dropped without shutdown(), it shuts down when it is collected (the tasks
    submitted still run; then its workers stop), as ProcessPoolExecutor does.
    """

    _pool: _Pool

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        start_method: str | None = None,
        retries: int = 0,
        task_timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        grace: float = 5.0,
        max_tasks_per_worker: int | None = None,
        max_tasks_per_child: int | None = None,
    ) -> None:
        self._pool = _Pool(max_workers, mp_context, initializer, initargs, start_method=start_method,
                           retries=retries, task_timeout=task_timeout, on_event=on_event, grace=grace,
                           max_tasks_per_worker=max_tasks_per_worker, max_tasks_per_child=max_tasks_per_child)
        self._pool.watch(self)

    @property
    def _max_workers(self) -> int:  # as ProcessPoolExecutor's, which code written for it reads
        return self._pool.workers

    @property
    def retries(self) -> int:
        return self._pool.retries

    @property
    def task_timeout(self) -> float | None:
        return self._pool.task_timeout

    @property
    def grace(self) -> float:
        return self._pool.grace


# One text for each public method: the pool's, where the behaviour is.
for _name in ("submit", "map", "shutdown", "pause", "resume", "stop", "kill", "counts", "status"):
    getattr(PoolFront, _name).__doc__ = getattr(_Pool, _name).__doc__


def _answer_stopped(name: str, fut: Future[Any], why: str) -> None:
    """Answer a command the manager will not run: it has stopped (or is stopping)."""
    if name == "stop":
        fut.set_result(Unfinished())
    elif name == "status":
        fut.set_result([])
    elif name == "shutdown":
        fut.set_result(None)
    else:
        fut.set_exception(RuntimeError(why))


def _unread(line: _WorkerLine) -> set[int]:
    """The tasks waiting unread in `line`'s worker's socket, read back here
    (each message whole: the worker reads it or we do)."""
    return {tid for msg in workwire.recv_all(line.child) if msg.kind is Kind.TASK for tid in workwire.task_ids(msg)}


def _begun(line: _WorkerLine, board: Board | None) -> bool:
    """Whether the worker has begun the first task it holds, as it said on the board."""
    try:
        head = line.held[0]
    except IndexError:  # (the manager thread may take it meanwhile)
        return False
    return board is None or board.items_running(line.wid, head.tid) is not None


def _result_within(fut: Future[Any], timeout: float | None) -> Any:
    """fut.result(timeout), with inf as no limit and a huge timeout waited
    out in turns of MAX_WAIT (a Future's wait takes no more at once)."""
    if timeout is None or math.isinf(timeout):
        return fut.result()
    end = time.monotonic() + timeout
    while True:
        try:
            return fut.result(min(MAX_WAIT, max(0.0, end - time.monotonic())))
        except FutureTimeout:
            if time.monotonic() >= end:
                raise


_live_executors: weakref.WeakSet[_Pool] = weakref.WeakSet()


def _shutdown_at_exit() -> None:
    # As ProcessPoolExecutor: the work submitted is done before the
    # interpreter exits (registered after the controller's hook: runs first);
    # unless the script ends by Ctrl-C (its KeyboardInterrupt is sys.last_value
    # by now), which stops the tasks instead, as ProcessExecutor's `with` does.
    by_ctrl_c = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for ex in list(_live_executors):
        try:
            if not by_ctrl_c:
                try:
                    ex.shutdown(wait=True)
                    continue
                except KeyboardInterrupt:  # Ctrl-C while it waits: a stop, for it and the rest
                    by_ctrl_c = True
            interrupted(ex)
        except KeyboardInterrupt:  # one more: kill what is left (the script's own traceback was said)
            for left in list(_live_executors):
                left.kill()
            return
        except Exception:
            log.exception("shutting down %r at exit failed", ex)


atexit.register(_shutdown_at_exit)

__all__ = ["ProcessExecutor", "TaskCounts", "Unfinished", "signal"]
