"""ProcessExecutor: a concurrent.futures.Executor you can pause, that a crash cannot break.

    caller threads                  manager thread                   workers
    --------------                  --------------                   -------
    submit()/map() -> _pending  -->  _dispatch(): TASK -------------> run_tasks()
    pause()/resume()/stop() ---->   _commands; broadcasts            checkpoint()
    Future <- set_result ---------  _on_result() <-------- RESULT --
                                    _on_worker_end(): reclaim, fail one task, respawn

One manager thread owns the ProcessController (which is not thread-safe),
as CPython's _ExecutorManagerThread owns its pool: the caller's methods
queue work and commands, then wake it.  Each worker's link (workwire.py)
carries its tasks; the manager sends a worker at most WINDOW of them and
knows which ones each worker holds, in order: the first has started, the
rest wait unread in the worker's socket.  When a worker dies the manager
reads the unread ones back (they go first in line again) and fails or
retries only the one that had started.  Futures stay pending until their
result comes, so that `stop()` can cancel every one that did not complete.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from typing import Any

from . import workwire
from .channel import InheritedFd
from .controller import ProcessController
from .errors import RemoteTraceback, TaskTimeout, WorkerCrashed
from .shutdown import describe_exit, signal_name
from .states import Event, Outcome, State, WorkerReport, WorkerStatus
from .worker_plane import ERR, OK, run_tasks
from .workwire import Kind

log = logging.getLogger("procctl")

#: Tasks in flight per worker: the one running and the next, so a worker
#: never waits for the manager between two tasks.
WINDOW = 2
#: Automatic map chunks: at most this many items each, so that pause and stop
#: keep a fine grain.
MAX_AUTO_CHUNK = 1024


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


class _Task:
    __slots__ = ("tid", "future", "blob", "items", "chunk", "attempts", "started")

    def __init__(self, tid: int, future: Future[Any], blob: bytes, items: list[Any], chunk: bool) -> None:
        self.tid = tid
        self.future = future
        self.blob = blob
        self.items = items  # the submitted items this task carries (one, or a map chunk)
        self.chunk = chunk
        self.attempts = 0
        self.started = 0.0  # monotonic time it began running (first in its worker's line)


class _WorkerLine:
    """The manager's view of one worker's link and the tasks it holds."""

    __slots__ = ("wid", "sock", "child", "held", "done", "timed_out", "closed")

    def __init__(self, wid: int) -> None:
        self.wid = wid
        self.sock, self.child = workwire.pair()
        self.sock.setblocking(False)
        self.child.setblocking(False)
        self.held: deque[_Task] = deque()
        self.done = 0
        self.timed_out: _Task | None = None
        self.closed = False


def _item_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `Unfinished.items` holds for one call: the single argument, else
    the argument tuple, else (args, kwargs)."""
    if kwargs:
        return (args, kwargs)
    return args[0] if len(args) == 1 else args


class ProcessExecutor(Executor):
    """A process pool with the `concurrent.futures` API, plus pause, resume and a stop
    that hands back the unfinished work. A crashed worker fails only its task."""

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
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, not {max_workers!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        if task_timeout is not None:
            if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
                raise TypeError(f"task_timeout must be a number of seconds, not {task_timeout!r}")
            if not task_timeout > 0 or math.isnan(task_timeout):
                raise ValueError(f"task_timeout must be > 0, not {task_timeout!r}")
            if math.isinf(task_timeout):
                task_timeout = None
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")
        if max_tasks_per_worker is None:
            max_tasks_per_worker = max_tasks_per_child
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool) or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker < 1
        ):
            raise ValueError(f"max_tasks_per_worker must be a positive integer, not {max_tasks_per_worker!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if mp_context is not None:
            if start_method is not None:
                raise ValueError("give start_method or mp_context, not both")
            start_method = mp_context.get_start_method()
        self.retries = retries
        self.task_timeout = task_timeout
        self.grace = float(grace)
        self._max_workers = max_workers
        self._on_event = on_event
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._commands: deque[tuple[str, Any, Future[Any]]] = deque()
        self._tids = itertools.count()
        self._idle = False  # the manager sleeps: wake it up
        self._shutdown = False
        self._broken: str | None = None
        self._paused = False
        self._paused_at = 0.0
        self._stopping = False
        self._closing = False
        self._kill_asked = False  # kill() was called: the manager SIGKILLs the workers
        self._killed = False
        self._pause_waiters: list[tuple[State, Future[Any]]] = []
        self._lines: dict[int, _WorkerLine] = {}
        self._respawn: set[int] = set()
        self._unfinished: list[tuple[_Task, bool]] = []  # (task, was running)
        self._submitted = self._completed = self._failed = self._cancelled = 0
        self._t0 = time.monotonic()
        self._pc = ProcessController(
            run_tasks, max_workers, args=(initializer, tuple(initargs), max_tasks_per_worker),
            start_method=start_method, grace=self.grace, initial_state=State.RUNNING,
            on_event=on_event, ack_timeout=None,
        )
        self._pc._plane = self
        self._pc.start()
        self._thread = threading.Thread(target=self._manage, name="procctl-executor", daemon=True)
        self._thread.start()
        _live_executors.add(self)

    @property
    def workers(self) -> int:
        return self._max_workers

    # -- the Executor API -----------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule `fn(*args, **kwargs)`; return its Future."""
        return self._submit_calls(fn, [(args, kwargs)], [_item_of(args, kwargs)], chunk=False)[0]

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any],
        timeout: float | None = None, chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Results of `fn` over the items, in order. `chunksize` None picks one
        (as Pool.map does); `timeout` counts from this call, as the stdlib's."""
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                      or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer or None, not {chunksize!r}")
        if timeout is not None:
            end_time = timeout + time.monotonic()
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(args, {}) for args in zip(*iterables)]  # noqa: B905 - as the stdlib's map: the shortest ends it
        items = [args[0] if len(iterables) == 1 else args for args, _ in calls]
        if chunksize is None:
            chunksize = max(1, min(MAX_AUTO_CHUNK, math.ceil(len(calls) / (4 * self._max_workers))))
        if chunksize == 1:
            futures = self._submit_calls(fn, calls, items, chunk=False)
        else:
            futures = self._submit_chunks(fn, calls, items, chunksize)
        chunked = chunksize > 1

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    fut = futures[-1]
                    value = fut.result() if timeout is None else fut.result(end_time - time.monotonic())
                    futures.pop()
                    if chunked:
                        yield from value
                    else:
                        yield value
                    del fut
            finally:
                for fut in futures:
                    fut.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the stdlib's: no new tasks; with `cancel_futures`, cancel those
        not yet sent to a worker; the rest run (a paused pool is resumed)."""
        with self._lock:
            self._shutdown = True
        # The manager first sends out what it can, as ProcessPoolExecutor
        # has its call queue filled, then cancels the rest.
        self._command("shutdown", cancel_futures)
        if wait:
            self._thread.join()

    # -- pause, resume, stop ------------------------------------------------------

    def pause(self, timeout: float | None = None) -> None:
        """Start no new task; return once every worker acknowledged (a task that
        never checkpoints pauses when it ends). TimeoutError after `timeout`."""
        self._command("pause", None).result(timeout)

    def resume(self, timeout: float | None = None) -> None:
        """Let the pool run again; return once every worker acknowledged."""
        self._command("resume", None).result(timeout)

    def stop(self, grace: float | None = None) -> Unfinished:
        """Take no new task, stop the running ones (checkpoint() returns False),
        escalate after `grace` seconds, and hand back every item that did not
        complete, once each. Their futures are cancelled."""
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                                  or not grace >= 0):
            raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")
        with self._lock:
            self._shutdown = True
        fut = self._command("stop", self.grace if grace is None else float(grace))
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
        """Submitted tasks, by where they are now."""
        with self._lock:
            queued = len(self._pending)
        held = sum(len(line.held) for line in list(self._lines.values()))
        return TaskCounts(self._submitted, self._completed, self._failed, self._cancelled, held, queued)

    def status(self) -> list[WorkerStatus]:
        """Each worker's status; `done` counts its completed tasks, and the
        totals add up to every task submitted."""
        if not self._thread.is_alive():
            return []
        return list(self._command("status", None).result())

    # -- the caller's side of the manager ------------------------------------------

    def _command(self, name: str, arg: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        if not self._thread.is_alive():
            if name == "stop":
                fut.set_result(Unfinished())
            elif name in ("pause", "resume"):
                fut.set_exception(RuntimeError("the executor is shut down"))
            else:
                fut.set_result(None)
            return fut
        with self._lock:
            self._commands.append((name, arg, fut))
        self._pc.wakeup()
        return fut

    def _submit_calls(
        self, fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        items: list[Any], chunk: bool,
    ) -> list[Future[Any]]:
        tasks = []
        for call, item in zip(calls, items, strict=True):
            tasks.append(self._new_task(fn, [call], [item], chunk))
        self._enqueue(tasks)
        return [t.future for t in tasks]

    def _submit_chunks(
        self, fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        items: list[Any], size: int,
    ) -> list[Future[Any]]:
        tasks = [self._new_task(fn, calls[i:i + size], items[i:i + size], True)
                 for i in range(0, len(calls), size)]
        self._enqueue(tasks)
        return [t.future for t in tasks]

    def _new_task(self, fn: Callable[..., Any], calls: list[Any], items: list[Any], chunk: bool) -> _Task:
        future: Future[Any] = Future()
        try:
            blob = pickle.dumps((fn, calls, chunk), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - the future carries it, as ProcessPoolExecutor's does
            future.set_exception(exc)
            blob = b""
        return _Task(next(self._tids), future, blob, items, chunk)

    def _enqueue(self, tasks: list[_Task]) -> None:
        with self._lock:
            if self._broken is not None:
                raise BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitted += len(tasks)
            self._pending.extend(t for t in tasks if t.blob)
            self._failed += sum(1 for t in tasks if not t.blob)
            wake, self._idle = self._idle, False
        if wake:
            self._pc.wakeup()

    # -- the manager thread ------------------------------------------------------

    def _manage(self) -> None:
        try:
            while True:
                self._pc._pump(self._sleep_for())
                if self._kill_asked:
                    self._kill_now()
                if self._take_commands():
                    break
                self._replace_ended()
                self._dispatch()
                self._expire()
                self._settle_broadcasts()
                if self._closing and (self._drained() or self._killed):
                    self._finish(self.grace)
                    break
        except BaseException:  # noqa: BLE001 - never leave workers or callers behind
            log.exception("the executor's manager thread failed")
            self._finish(0.0)
            raise

    def _sleep_for(self) -> float | None:
        """How long the manager may sleep: until the next task deadline."""
        with self._lock:
            if self._commands or (self._pending and self._has_room()):
                return 0.0
            self._idle = True
        if self.task_timeout is None or self._paused:
            return None
        starts = [line.held[0].started for line in self._lines.values() if line.held and not line.closed]
        if not starts:
            return None
        return max(0.0, min(starts) + self.task_timeout - time.monotonic())

    def _has_room(self) -> bool:
        if self._paused or self._stopping:
            return False
        return any(len(line.held) < WINDOW and not line.closed for line in self._lines.values())

    def _take_commands(self) -> bool:
        """Run queued commands; True once the executor has stopped."""
        while True:
            with self._lock:
                if not self._commands:
                    return False
                name, arg, fut = self._commands.popleft()
            if name == "pause" or name == "resume":
                self._broadcast(State.PAUSED if name == "pause" else State.RUNNING, fut)
            elif name == "status":
                fut.set_result(self._statuses())
            elif name == "shutdown":
                self._closing = True
                if self._paused:
                    self._broadcast(State.RUNNING, None)
                if arg:
                    self._dispatch()
                    with self._lock:
                        pending, self._pending = self._pending, deque()
                    for task in pending:
                        if task.future.cancel():
                            self._cancelled += 1
                fut.set_result(None)
            elif name == "stop":
                fut.set_result(self._finish(arg))
                return True

    def _broadcast(self, state: State, fut: Future[Any] | None) -> None:
        if self._stopping:
            if fut is not None:
                fut.set_exception(RuntimeError("the executor is stopping"))
            return
        pausing = state is State.PAUSED
        if pausing and not self._paused:
            self._paused_at = time.monotonic()
        elif not pausing and self._paused:
            # A paused task is not running late: move its clock on.
            shift = time.monotonic() - self._paused_at
            for line in self._lines.values():
                if line.held:
                    line.held[0].started += shift
        self._paused = pausing
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
        """An idle worker takes over a task still unread behind another's long one."""
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
            task = next(t for t in line.held if t.tid == msg.tag)
            line.held.remove(task)
            with self._lock:
                self._pending.appendleft(task)
            self._fill(idle.pop(), 1)

    def _fill(self, line: _WorkerLine, window: int = WINDOW) -> None:
        """Send `line` tasks up to the window."""
        while len(line.held) < window:
            with self._lock:
                if not self._pending:
                    return
                task = self._pending.popleft()
            if task.future.cancelled():
                self._cancelled += 1
                continue
            try:
                workwire.send(line.sock, Kind.TASK, 0, task.tid, task.blob)
            except OSError:
                with self._lock:
                    self._pending.appendleft(task)
                return
            if not line.held:
                task.started = time.monotonic()
            line.held.append(task)

    def _expire(self) -> None:
        if self.task_timeout is None or self._paused:
            return
        now = time.monotonic()
        for line in self._lines.values():
            if line.held and not line.closed and line.timed_out is None:
                task = line.held[0]
                if now - task.started >= self.task_timeout:
                    line.timed_out = task
                    self._pc._kill_worker(line.wid)

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
        self._stopping = True
        with self._lock:
            self._shutdown = True
            pending, self._pending = self._pending, deque()
            commands, self._commands = self._commands, deque()
        for task in pending:
            self._unfinished.append((task, False))
        try:
            self._pc.stop(self._wait_grace(grace))
        finally:
            for line in list(self._lines.values()):
                if not line.closed:
                    self._end_line(line, None)
            for _, fut in self._pause_waiters:
                fut.set_exception(RuntimeError("the executor stopped"))
            self._pause_waiters = []
            for name, _, fut in commands:
                if name == "stop":
                    fut.set_result(Unfinished())
                elif name == "status":
                    fut.set_result([])
                elif name == "shutdown":
                    fut.set_result(None)
                else:
                    fut.set_exception(RuntimeError("the executor stopped"))
        unfinished = sorted(self._unfinished, key=lambda pair: pair[0].tid)
        items: list[Any] = []
        running: list[Any] = []
        futures: list[Future[Any]] = []
        for task, was_running in unfinished:
            if task.future.cancel():
                self._cancelled += 1
                items.extend(task.items)
                futures.append(task.future)
                if was_running:
                    running.extend(task.items)
        self._unfinished = []
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
        self._lines[wid] = line
        return InheritedFd(line.child.fileno()), line.sock.fileno()

    def wire_spec(self) -> dict[str, tuple[int, int]]:
        return {}

    def readable(self, wid: int) -> None:
        line = self._lines.get(wid)
        if line is not None and not line.closed:
            for msg in workwire.recv_all(line.sock):
                self._on_message(line, msg)
            if not self._stopping and not self._paused:
                self._fill(line)

    def posted(self, state: State) -> None:
        if state is State.STOPPED:
            self._stopping = True

    def ended(self, wid: int, report: WorkerReport | None = None) -> None:
        line = self._lines.get(wid)
        if line is not None and not line.closed:
            self._end_line(line, report)

    def release(self) -> None:
        for line in self._lines.values():
            if not line.closed:
                self._end_line(line, None)

    # -- results and ends ------------------------------------------------------------

    def _on_message(self, line: _WorkerLine, msg: workwire.Message) -> None:
        if msg.kind is Kind.RESULT:
            self._on_result(line, msg)
        elif msg.kind is Kind.INIT_FAILED:
            self._break(f"the initializer failed in worker {line.wid}:\n"
                        f"{msg.payload.decode(errors='replace')}")

    def _on_result(self, line: _WorkerLine, msg: workwire.Message) -> None:
        if not line.held or line.held[0].tid != msg.tag:
            log.error("worker %d answered task %d it does not hold", line.wid, msg.tag)
            return
        task = line.held.popleft()
        if line.held:
            line.held[0].started = time.monotonic()
        line.done += 1
        try:
            status, value, tb = pickle.loads(msg.payload)
        except Exception as exc:  # noqa: BLE001 - unpickling runs the result's own code
            status, value, tb = ERR, exc, f"the result could not be unpickled here: {exc!r}\n"
        fut = task.future
        if status == OK:
            if fut.cancelled():
                self._cancelled += 1
                return
            fut.set_result(value)
            self._completed += 1
            self._task_event("task-done", line, task)
        elif status == ERR:
            if fut.cancelled():
                self._cancelled += 1
                return
            if isinstance(value, BaseException):
                value.__cause__ = RemoteTraceback(tb)
            else:
                value = RuntimeError(str(value))
            fut.set_exception(value)
            self._failed += 1
            self._task_event("task-failed", line, task, error=_last_line(tb))
        else:  # stopped: it saw STOPPED at a checkpoint and did not complete
            self._unfinished.append((task, True))

    def _end_line(self, line: _WorkerLine, report: WorkerReport | None) -> None:
        """The worker is gone: results it sent count, unread tasks go back in
        line, the task it was running fails, is retried or is unfinished."""
        for msg in workwire.recv_all(line.sock):
            self._on_message(line, msg)
        unread = [msg.tag for msg in workwire.recv_all(line.child) if msg.kind is Kind.TASK]
        line.closed = True
        self._pc._unregister(line.sock.fileno())
        line.sock.close()
        line.child.close()
        back = [t for t in line.held if t.tid in set(unread)]
        started = [t for t in line.held if t.tid not in set(unread)]
        line.held.clear()
        if self._stopping:
            self._unfinished.extend((t, False) for t in back)
        else:
            with self._lock:
                self._pending.extendleft(reversed(back))
        for task in started:
            self._task_lost(line, task, report)
        if report is not None and not self._stopping:
            if report.outcome is Outcome.FAILED and line.done == 0 and self._broken is None:
                self._break(f"worker {line.wid} could not start: {report.error_line}")
            else:
                self._respawn.add(line.wid)

    def _task_lost(self, line: _WorkerLine, task: _Task, report: WorkerReport | None) -> None:
        if self._stopping and line.timed_out is not task:
            self._unfinished.append((task, True))
            return
        if line.timed_out is task:
            error: BaseException = TaskTimeout(
                f"the task ran longer than task_timeout={self.task_timeout}s; "
                f"worker {line.wid} (pid {report.pid if report else '?'}) was killed")
            name = "task-timeout"
        else:
            exitcode = report.exitcode if report is not None else None
            how = describe_exit(exitcode)
            if exitcode is not None and exitcode < 0:
                how = f"was killed by {signal_name(-exitcode)}"
            error = WorkerCrashed(
                f"worker {line.wid} (pid {report.pid if report else '?'}) {how} while running this task "
                f"(exit code {exitcode})")
            name = "task-crashed"
        if task.attempts < self.retries and not self._stopping:
            task.attempts += 1
            with self._lock:
                self._pending.appendleft(task)
            self._task_event("task-retry", line, task, error=str(error))
            return
        if task.future.cancelled():
            self._cancelled += 1
            return
        task.future.set_exception(error)
        self._failed += 1
        self._task_event(name, line, task, error=str(error))

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
        for task in list(pending) + held:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(BrokenExecutor(why))
                self._failed += 1
            else:
                self._cancelled += 1
        self._closing = True

    # -- status and events -----------------------------------------------------------

    def _statuses(self) -> list[WorkerStatus]:
        base = {s.worker_id: s for s in self._pc._snapshot()}
        with self._lock:
            queued = len(self._pending)
        live = [line for line in self._lines.values() if not line.closed] or list(self._lines.values())
        share = queued / max(1, len(live))
        out = []
        now = time.monotonic()
        for wid, line in sorted(self._lines.items()):
            s = base.get(wid)
            if s is None:
                continue
            total = line.done + len(line.held) + share
            rate = line.done / (now - self._t0) if now > self._t0 else None
            eta = (total - line.done) / rate if rate else None
            out.append(WorkerStatus(wid, s.pid, s.state, s.alive, s.outcome, float(line.done),
                                    float(total), rate, eta, s.info))
        return out

    def _task_event(self, name: str, line: _WorkerLine, task: _Task, error: str | None = None) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(Event(round(time.monotonic() - self._t0, 6), name, worker=line.wid,
                                 error=error, done=float(self._completed + self._failed),
                                 total=float(self._submitted), task=task.tid))
        except Exception:
            log.exception("on_event callback failed for %s", name)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"<ProcessExecutor {self._max_workers} workers, {c.submitted} submitted, "
                f"{c.completed} completed, {c.queued} queued{', paused' if self._paused else ''}>")


def _last_line(tb: str | None) -> str | None:
    if not tb:
        return None
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


_live_executors: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()


def _shutdown_at_exit() -> None:
    # As ProcessPoolExecutor: the work submitted is done before the
    # interpreter exits (registered after the controller's hook: runs first).
    for ex in list(_live_executors):
        try:
            ex.shutdown(wait=True)
        except Exception:
            log.exception("shutting down %r at exit failed", ex)


atexit.register(_shutdown_at_exit)

__all__ = ["ProcessExecutor", "TaskCounts", "Unfinished", "signal"]
