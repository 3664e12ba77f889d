"""ProcessController: start N workers, broadcast states, reap, close.

Data flow (see channel.py for the wire):

    ProcessController                             worker processes
    -----------------                             ----------------
    broadcast(state) -- Board slot + doorbell --> ctx.checkpoint()
    _pump_until() <- report pipe: ACK / RESULT -- ack on every applied command
    _pump_until() <- pidfd ---------------------- process exit
    _reap_worker(): drain pipe, waitpid(WNOHANG), decode exit, close the worker's fds

One selector (epoll) holds every report pipe, every worker's pidfd and a
wakeup pipe, registered once; every blocking call of the controller is
`_pump_until()` with a deadline, so a dead worker wakes the controller at once
and nothing sleeps.  Supervision (restarts after a backoff, per-worker stop
escalation, heartbeat checks) runs on timers: the pump folds the nearest one
(`_next_deadline()`) into its wait and fires what is due after each pass
(`_run_timers()`); the decisions themselves are supervise.py's.  The pidfd,
unlike a pipe, cannot be held open by what the worker forks or execs, nor
closed by it.  Only the controller closes channels,
and it closes a worker's as soon as it reaps it.  Any thread may call the
public methods: one lock guards the state, one thread at a time waits in the
kernel.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401 - registers its atexit hook before ours (see _close_at_exit)
import numbers
import os
import pickle
import queue
import selectors
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol

from . import containment, limits, registry, shutdown, threads
from .channel import (
    ACK,
    ACK_BODY,
    BEAT_DONE,
    PROBE_LIMIT,
    PROGRESS,
    RESULT,
    START_FAILED,
    Board,
    InheritedFd,
    WorkerLink,
    pack_command,
    unpack_command,
    with_probe,
)
from .channels import Channel, ChannelPlane
from .states import CLEAN_OUTCOMES, STATES, Event, Outcome, State, WorkerReport, WorkerStatus
from .supervise import Action, Plan, SchedSample, Strategy, Supervisor, looks_hung, sched_sample
from .threads import MANAGED_SIGNALS
from .worker import WORKER_NAME_PREFIX, Payload, WorkerSpec, worker_main
from .workwire import MAX_WAIT, check_timeout

log = logging.getLogger("procctl")

#: Default bound on how long run()/pause() wait for acknowledgements.
ACK_TIMEOUT = 10.0
#: How long start() waits for the workers to come up.
START_TIMEOUT = 60.0

_REPORT, _SENTINEL, _WAKE, _LINK = "report", "sentinel", "wake", "link"
_NEW, _STARTED, _CLOSED = "new", "started", "closed"


class WorkPlane(Protocol):
    """What carries work over each worker's link (channels.py, executor.py).

    The controller calls these hooks; a plane that serves its links from its
    own thread returns None from attach() for the selector fd.
    """

    def wire_spec(self) -> dict[str, tuple[int, int]]: ...

    def attach(self, wid: int) -> tuple[InheritedFd, int | None]: ...

    def readable(self, wid: int) -> None: ...

    def ended(self, wid: int, report: WorkerReport) -> None: ...

    def posted(self, state: State) -> None: ...

    def acknowledged(self, wid: int, state: State) -> None:
        """Worker `wid` applied `state`, the last command it was given
        (PAUSED: it reads nothing more from its link until the next one)."""

    def settle(self) -> None: ...

    def release(self) -> None: ...


class WorkerStartError(RuntimeError):
    """A worker could not be started, or died before it was ready."""


class _Worker:
    """The controller's record of one worker process."""

    __slots__ = (
        "id", "process", "pid", "link", "started", "state", "acked_seq",
        "result", "start_error", "signalled", "report", "progress_first", "info",
        "final_progress", "pidfd", "cgroup", "restarts", "probe", "probe_at", "suspect", "hung", "escalation",
        "retiring", "ended_at", "paused_since", "paused_for", "start_by",
    )

    def __init__(self, wid: int, process: Any, link: WorkerLink) -> None:
        self.id = wid
        self.process = process
        self.pid: int | None = process.pid
        self.link = link
        self.started = time.time()
        self.state = State.PAUSED
        self.acked_seq = -1
        self.result: tuple[str, Any, str | None] | None = None
        self.start_error: str | None = None
        self.signalled: int | None = None
        self.report: WorkerReport | None = None
        self.progress_first: tuple[float, float] | None = None  # (monotonic, done): the rate's origin
        self.info: dict[str, Any] = {}
        self.final_progress: tuple[float | None, float | None] = (None, None)
        self.ended_at: float | None = None  # monotonic: the rate of an ended worker stays its last
        #: Time paused since its first run (acknowledged PAUSED to RUNNING): not
        #: counted in its rate, as the time a stopwatch is stopped.
        self.paused_since: float | None = None
        self.paused_for = 0.0
        #: What the controller watches for the process's end: a pidfd where the
        #: kernel has them, which nothing the worker does can hold open.
        self.pidfd = -1
        self.cgroup: str | None = None
        #: How many times this worker id was restarted before this process.
        self.restarts = 0
        #: Heartbeat: the last probe posted, and when (None: none outstanding).
        self.probe = 0
        self.probe_at: float | None = None
        #: A probe went unanswered for `heartbeat`: (when, its scheduler times then).
        self.suspect: tuple[float, SchedSample | None] | None = None
        self.hung = False
        #: A stop of this worker alone in progress: (stage, monotonic deadline),
        #: stage "grace" -> SIGTERM, "term" -> SIGKILL, "kill" -> leave it to close().
        self.escalation: tuple[str, float] | None = None
        #: STOPPED was posted to this worker alone (resize, stop(workers=), one_for_all).
        self.retiring = False
        #: A restarted worker not yet up is given up (killed, failed) at this monotonic time.
        self.start_by: float | None = None

    @property
    def watch_fd(self) -> int:
        return self.pidfd if self.pidfd >= 0 else int(self.process.sentinel)

    @property
    def alive(self) -> bool:
        return self.report is None


@dataclasses.dataclass
class _Birth:
    """A worker about to be started: what its process takes along."""

    wid: int
    restarts: int
    cgroup: str | None
    link: WorkerLink
    process: Any
    work_fd: int | None


def _deliver(births: list[_Birth], started: list[int], start_method: str) -> None:
    """Start the processes of `births` in turn, noting each in `started`
    (the caller's count if one fails); each child's ends are let go of as
    soon as it has them. The caller has MANAGED_SIGNALS blocked."""
    if births and start_method != "fork":
        _helpers_first(start_method)
    for birth in births:
        birth.process.start()
        started.append(birth.wid)
        birth.link.release_child_fds()


def _helpers_first(start_method: str) -> None:
    """Have multiprocessing's resource tracker (and fork server) running, then
    block MANAGED_SIGNALS again, before a worker is exec'd.

    A fresh interpreter inherits the signal mask across exec: started with
    MANAGED_SIGNALS blocked, a spawn worker (or the fork server) holds a
    Ctrl-C to the process group until the worker has set its own handlers
    (worker.py), through the interpreter's start-up and the import of the
    parent's main module. But multiprocessing unblocks SIGINT and SIGTERM in
    the calling thread once it has started its resource tracker, which it
    does at the first start in a process: every worker exec'd after that
    started with them unblocked and died of such a Ctrl-C with a
    KeyboardInterrupt traceback. (Once running, the tracker's later checks,
    one at each start, leave the mask alone.)
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
    if start_method == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


#: The event a worker's acknowledgement of a state is.
_EVENT_OF = {State.RUNNING: "running", State.PAUSED: "paused"}


class _Deadline:
    """The time left of a timeout (None: no limit, also for float('inf')).

    `remaining()` is what one kernel wait may take: at most MAX_WAIT, so a
    huge finite timeout is waited out in turns instead of overflowing.
    """

    def __init__(self, timeout: float | None) -> None:
        no_limit = timeout is None or timeout == float("inf")
        self.at = None if no_limit else time.monotonic() + timeout  # type: ignore[operator]

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def remaining(self) -> float:
        if self.at is None:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, self.at - time.monotonic()))


def check_start_method(start_method: Any) -> str | None:
    """`start_method`, if this system has it (or None: its default); else ValueError naming it."""
    methods = multiprocessing.get_all_start_methods()
    if start_method is not None and not isinstance(start_method, str):
        raise TypeError(f"start_method must be a string such as 'fork', or None, not {type(start_method).__name__}")
    if start_method is not None and start_method not in methods:
        raise ValueError(f"start_method must be one of {', '.join(map(repr, methods))} or None, "
                         f"not {start_method!r}")
    return start_method


def check_state(name: str, value: Any) -> State:
    """A State argument: the member, its name ('paused', any case) or its int
    value; else ValueError naming it, TypeError for another type (a bool or a
    float, which State would take as numbers)."""
    if isinstance(value, State):
        return value
    if isinstance(value, str):
        try:
            return State[value.strip().upper()]
        except KeyError:
            pass
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a procctl.State, not {value!r}")
    else:
        try:
            return State(int(value))
        except ValueError:
            pass
    raise ValueError(f"{name} must be a procctl.State ({', '.join(s.name for s in State)}), not {value!r}")


def check_signal(sig: Any) -> int:
    """A signal number argument; else TypeError/ValueError naming it."""
    if isinstance(sig, bool) or not isinstance(sig, int):
        raise TypeError(f"sig must be a signal number, not {type(sig).__name__}")
    if not 0 < sig < signal.NSIG:
        raise ValueError(f"sig must be a signal number from 1 to {signal.NSIG - 1}, not {sig!r}")
    return sig


def check_worker_ids(workers: Any, count: int) -> list[int]:
    """A `workers=` argument: worker ids from 0 to count - 1, sorted, once each."""
    if isinstance(workers, (str, bytes)) or not isinstance(workers, Iterable):
        raise TypeError(f"workers must be a list of worker ids, not {type(workers).__name__}")
    ids = list(workers)
    for wid in ids:
        if isinstance(wid, bool) or not isinstance(wid, int):
            raise TypeError(f"workers must be a list of worker ids (ints), not {ids!r:.80}")
        if not 0 <= wid < count:
            raise ValueError(f"workers: {wid} is not a worker id (0 to {count - 1})")
    return sorted(set(ids))


def check_worker_id(worker_id: Any, count: int) -> int:
    """One worker id (history()): an int from 0 to count - 1."""
    if isinstance(worker_id, bool) or not isinstance(worker_id, int):
        raise TypeError(f"worker_id must be an int, not {type(worker_id).__name__}")
    if not 0 <= worker_id < count:
        raise ValueError(f"worker_id {worker_id} is not a worker of this controller")
    return worker_id


class Shortcuts:
    """run() and pause() as broadcasts, for both controllers (local and cluster)."""

    def broadcast(self, state: State, *, timeout: float | None = None,
                  workers: Iterable[int] | None = None) -> None:
        raise NotImplementedError

    def run(self, *, timeout: float | None = None, workers: Iterable[int] | None = None) -> None:
        """Broadcast RUNNING (to `workers` only, when given)."""
        self.broadcast(State.RUNNING, timeout=timeout, workers=workers)

    def pause(self, *, timeout: float | None = None, workers: Iterable[int] | None = None) -> None:
        """Broadcast PAUSED (to `workers` only, when given): they block in checkpoint()
        until the next command."""
        self.broadcast(State.PAUSED, timeout=timeout, workers=workers)


class _Spawner:
    """One long-lived thread that starts the workers of controllers used from other threads.

    The kernel's parent-death signal fires when the *thread* that forked the
    child exits, not the process. A controller started from a short-lived
    thread would leave its workers unguarded once that thread ended; forking
    from this thread, which lives as long as the process, keeps them guarded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event, list[BaseException]]]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = -1

    def call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._loop, args=(self._jobs,),
                                                name="procctl-spawner", daemon=True)
                self._pid = os.getpid()
                threads.start(self._thread)
            jobs = self._jobs
        done = threading.Event()
        errors: list[BaseException] = []
        jobs.put((fn, done, errors))
        done.wait()  # process.start() returns by itself: it only forks (or execs) and writes
        if errors:
            raise errors[0]

    @staticmethod
    def _loop(jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event, list[BaseException]]]) -> None:
        # No handler of the manager may ever run in a child, and no signal may
        # land in this thread (see threads.py): keep them blocked here for good,
        # again after each job, as multiprocessing unblocks SIGINT and SIGTERM
        # in the thread that starts its resource tracker (under spawn).
        while True:
            signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
            fn, done, errors = jobs.get()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)
            finally:
                done.set()


_spawner = _Spawner()


class ProcessController(Shortcuts):
    """Run `target(ctx, *args, **kwargs)` in `workers` processes under control.

    Workers start PAUSED (see `initial_state`); `run()`, `pause()` and
    `stop()` broadcast to all of them (or to `workers=[ids]`).  Use it as a
    context manager: leaving the block stops what still runs and releases
    everything.  `restart`, `max_restarts`, `restart_window`, `backoff`,
    `strategy` and `heartbeat` make it a supervisor (see supervise.py);
    `resize(n)` grows or shrinks the pool while it runs.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        workers: int,
        *,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        start_method: str | None = None,
        grace: float = 5.0,
        initial_state: State = State.PAUSED,
        on_event: Callable[[Event], None] | None = None,
        ack_timeout: float | None = ACK_TIMEOUT,
        channels: dict[str, int] | None = None,
        cgroup: bool | None = None,
        restart: str = "never",
        max_restarts: int = 5,
        restart_window: float = 60.0,
        backoff: tuple[float, float] = (0.1, 10.0),
        strategy: str = "one_for_one",
        heartbeat: float | None = None,
        control: bool | str = False,
    ) -> None:
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, not {workers!r}")
        too_many = limits.capacity_problem(
            workers, limits.MANAGER_FDS_PER_WORKER if channels is None else limits.WORK_FDS_PER_WORKER)
        if too_many is not None:
            raise ValueError(f"workers={workers} is more than this system lets us start: {too_many}")
        if isinstance(args, (str, bytes)) or not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple or list of arguments, not {type(args).__name__}")
        if kwargs is not None and not (
            isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)
        ):
            raise TypeError(f"kwargs must be a mapping of str to values, not {kwargs!r:.80}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, not {type(on_event).__name__}")
        if not isinstance(control, (bool, str)):
            raise TypeError(f"control must be True, False or a run name, not {type(control).__name__}")
        if isinstance(control, str):
            from .control import check_name

            check_name(control)  # ValueError naming the run name
        grace = check_timeout("grace", grace, allow_none=False)  # type: ignore[assignment]
        # (> 0: at 0, every broadcast would time out before a worker could answer)
        ack_timeout = check_timeout("ack_timeout", ack_timeout, positive=True)
        if cgroup is not None and not isinstance(cgroup, bool):
            raise TypeError(f"cgroup must be None (where writable), True or False, not {cgroup!r}")
        initial_state = check_state("initial_state", initial_state)
        if initial_state is State.STOPPED:
            raise ValueError("initial_state must be PAUSED or RUNNING")
        plan = Plan.check(restart, max_restarts, restart_window, backoff, strategy, heartbeat)
        self._mp: Any = multiprocessing.get_context(check_start_method(start_method))  # (typeshed lacks Process)
        self.start_method: str = self._mp.get_start_method()
        self.target = target
        self.workers = workers
        #: What the workers' ctx.worker_id and ctx.workers say: (base, total) makes them
        #: base + worker id, of total (None: self.workers). A cluster node's agent sets it
        #: before start(), so that its workers see their global ids; everything else here
        #: (reports, status, events) keeps the local ids.
        self._context_ids: tuple[int, int | None] = (0, None)
        self.grace = grace
        self.initial_state: State = initial_state
        self.ack_timeout = ack_timeout
        #: Contain each worker's tree in a cgroup v2 too: None where one is
        #: writable, True the same but say so where none is, False never.
        self.cgroup = cgroup
        self._trees: containment.WorkerTrees | None = None
        #: Escalation timeouts after the grace period; tests may shrink them.
        self.term_timeout = shutdown.TERM_TIMEOUT
        self.kill_timeout = shutdown.KILL_TIMEOUT
        self.start_timeout = START_TIMEOUT
        self._payload = Payload(target, tuple(args), dict(kwargs or {}))
        if self.start_method == "forkserver":
            _preload_in_fork_server()
        self._on_event = on_event
        self._phase = _NEW
        self._stop_cut_short = False  # a Ctrl-C came during stop()'s wait: the next stop escalates at once
        self._owner_pid = os.getpid()
        self._workers: list[_Worker] = []
        self._reports: dict[int, WorkerReport] = {}
        self._new_reports: list[WorkerReport] = []
        self._live = 0
        self._seq = 0
        self._state: State = initial_state
        self._awaiting: set[int] = set()
        self._awaiting_seq = 0
        self._t0 = time.monotonic()
        self._board: Board | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        #: Held to ring and to close the wake pipe: a ring from another thread (a
        #: signal watcher, the control server) must not write to a closed number
        #: that a new descriptor took. Re-entrant: wakeup() runs in signal handlers.
        self._wake_lock = threading.RLock()
        self._wakes = 0  # wakeup() calls seen by the pump
        self._passes = 0  # kernel waits done by the pump
        self._collect = True  # the manager's garbage collector is on (passed to workers)
        # Any thread may call the public methods: one lock guards the state,
        # and one thread at a time (the pumper) waits in the kernel for I/O,
        # with the lock released, while the others wait for it to report.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._owner: int | None = None
        self._pumper: int | None = None
        # A thread of our own that pumps while the script does something else
        # (feeds a channel, sleeps): restarts, hang detection, a dead consumer's
        # items taken back. None: one when supervision or channels need it;
        # the executor and the command line, which pump all the time, say False.
        self._background: bool | None = None
        self._bg_thread: threading.Thread | None = None
        self._bg_quit = threading.Event()
        self._dispatching = 0  # inside a pass: events wait in _told until its end
        self._told: deque[Event] = deque()
        self._plane: WorkPlane | None = None
        #: A predicate (the CLI's: a stop was asked) that ends a broadcast's
        #: wait for acknowledgements early; the command stays posted.
        self._interrupt_waits: Callable[[], bool] | None = None
        self._init_supervision(plan)
        self._control_name = control
        self._control: Any = None  # the ControlServer of control=True (control.py)
        #: The controller's channels, by name (see channels.py).
        self.channels: dict[str, Channel] = {}
        if channels is not None:
            if not isinstance(channels, dict):
                raise TypeError(f"channels must be a dict of name -> maxsize, not {type(channels).__name__}")
            plane = ChannelPlane(channels)
            self._plane = plane
            self.channels = plane.channels

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> ProcessController:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> ProcessController:
        """Start every worker and return once each is up (in `initial_state`)."""
        with self._locked():
            return self._start()

    def _start(self) -> ProcessController:
        if self._phase is _STARTED:
            return self
        if self._phase is _CLOSED:
            raise RuntimeError("this controller is closed; create a new one")
        self._phase = _STARTED
        self._t0 = time.monotonic()
        word = pack_command(0, self.initial_state)
        try:  # from the first resource: a start that fails (EMFILE, say) releases all
            if self._control_name is not False:
                self._serve_control()
            self._board = Board(self.workers)
            self._selector = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._selector.register(self._wake_r, selectors.EVENT_READ, (_WAKE, None))
            registry.open_controllers.add(self)
            self._trees = containment.WorkerTrees(self.cgroup)
            self._collect = gc.isenabled()
            with _quiet_collector(self.start_method):
                for wid in range(self.workers):
                    self._board.post(wid, word)
                self._spawn(range(self.workers))
            self._await_ready()
        except BaseException:
            self._abort()
            raise
        self._begin_supervision()
        self._start_background()
        return self

    def _start_background(self) -> None:
        wanted = self._background
        if wanted is None:
            wanted = self._supervisor is not None or self._heartbeat is not None or self._plane is not None
        if not wanted:
            return
        self._bg_quit.clear()
        self._bg_thread = threading.Thread(target=self._pump_in_background, name="procctl-supervisor",
                                           daemon=True)
        threads.start(self._bg_thread)

    def _pump_in_background(self) -> None:
        """The background thread: pump until told to quit (it takes the pump
        only when no caller has it; a caller's wait takes its turn as ever).

        It restarts workers itself: their parent-death signal is tied to this
        thread, which therefore ends only once every worker has (_end_background),
        and never earlier, not even on an error."""
        quit_ = self._bg_quit
        try:
            with self._locked():
                while not quit_.is_set() and self._phase is _STARTED and self._selector is not None:
                    self._pump_until(quit_.is_set, None)
        except Exception:  # noqa: BLE001 - the script's own calls pump on; this thread waits to end
            log.warning("procctl: the controller's background thread stopped pumping", exc_info=True)
            quit_.wait()

    def _end_background(self) -> None:
        """End the background thread: called holding the lock, once every
        worker has ended, before the selector it may wait on is closed."""
        thread = self._bg_thread
        if thread is None:
            return
        self._bg_quit.set()
        if thread is threading.current_thread():
            return  # (stop() from on_event in this thread: it ends once that returns)
        self._nudge()
        if self._pumper == thread.ident:
            # It waits in the selector (we hold the lock: it is not dispatching):
            # let it take the lock, finish its pass and end.
            self._unlocked_wait(partial(thread.join, None))
        self._bg_thread = None  # otherwise it waits for the lock or a pass: _release() notifies it

    def _nudge(self) -> None:
        """Wake the pumper to look at its timers and flags again (not a wakeup())."""
        self._ring(b"\1")

    def _ring(self, byte: bytes) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, byte)
                except (BlockingIOError, OSError):
                    pass

    def _serve_control(self) -> None:
        """control=True: a control socket for `procctl status/pause/resume/stop`."""
        from .control import ControlServer, RunHooks

        name = self._control_name if isinstance(self._control_name, str) else None
        job = f"script {getattr(self.target, '__qualname__', type(self.target).__name__)}"
        self._control = ControlServer(RunHooks(job, lambda: self, self._stop_from_control, self.resize),
                                      name).start()

    def _stop_from_control(self) -> None:
        # stop() without the wait: post STOPPED and arm every worker's escalation.
        # Whoever pumps (the script's wait(), the background thread) carries it
        # out, and the script's wait() returns True once every worker has ended.
        with self._locked():
            if self._phase is _STARTED and self._state is not State.STOPPED:
                self._post(State.STOPPED)
                at = time.monotonic() + self.grace
                for w in self._workers:
                    if w.alive and w.escalation is None:
                        w.escalation = ("grace", at)
                        self._schedule(at)
        self._nudge()

    def _spawn(self, wids: Iterable[int], restarts: int = 0) -> None:
        """Start a process for each worker id in `wids`.

        In three passes: everything the children need is made first, then
        the processes are forked back to back, then the manager records
        them. Under fork, each fork makes every page of the manager
        copy-on-write again, and whatever the manager writes before the
        next fork is copied once more; with nothing but the forks in the
        middle pass, the bookkeeping of N workers is copied once, not N times.
        """
        births: list[_Birth] = []
        started: list[int] = []
        try:
            for wid in wids:
                try:
                    births.append(self._conceive(wid, restarts))
                except OSError as exc:
                    why = limits.describe_start_failure(exc) or exc
                    raise WorkerStartError(f"cannot start worker {wid}: {why}") from exc
            try:
                # The kernel's parent-death signal fires when the *thread* that
                # forked exits: only the main thread (or the fork server) lives
                # as long as the process, so other threads have the spawner fork;
                # but our background thread, which ends only after the workers.
                me = threading.current_thread()
                if self.start_method != "forkserver" and me is not threading.main_thread() and (
                        me is not self._bg_thread):
                    _spawner.call(partial(_deliver, births, started, self.start_method))
                else:
                    # Blocked while the children are made, so that no handler of ours
                    # runs in one; each resets its handlers, then unblocks (worker.py).
                    with threads.blocked():
                        _deliver(births, started, self.start_method)
            except Exception as exc:
                # A limit (EMFILE, EAGAIN) is the system's refusal; anything
                # else here comes from pickling what the child must receive.
                why = limits.describe_start_failure(exc) or (
                    f"the target or its arguments cannot be sent to the child ({exc!r})"
                )
                raise WorkerStartError(
                    f"cannot start worker {births[len(started)].wid} with start method"
                    f" {self.start_method!r}: {why}"
                ) from exc
        finally:
            for birth in births[len(started):]:
                birth.link.close()
            for birth in births[: len(started)]:
                self._adopt(birth)
            if self._trees is not None:
                self._trees.flush()

    def _conceive(self, wid: int, restarts: int) -> _Birth:
        """The links and the (unstarted) process of one worker."""
        assert self._board is not None and self._trees is not None
        cgroup = self._trees.worker_cgroup(wid)
        link = WorkerLink()
        doorbell, report = link.child_fds()
        try:
            work, work_fd = self._attach_work_link(wid)
        except BaseException:
            link.close()
            raise
        spec = WorkerSpec(
            wid, self.workers, self._payload, InheritedFd(self._board.fd), doorbell, report, os.getpid(),
            die_with_parent=True, forkserver=self.start_method == "forkserver", collect=self._collect,
            work=work, channels=self._plane.wire_spec() if self._plane is not None else {},
            cgroup=cgroup,
            restarts=restarts,
            end=link.child_end(wid, self._board) if self.start_method == "fork" else None,
            id_base=self._context_ids[0], total=self._context_ids[1],
        )
        process = self._mp.Process(target=worker_main, args=(spec,), name=f"{WORKER_NAME_PREFIX}{wid}")
        return _Birth(wid, restarts, cgroup, link, process, work_fd)

    def _adopt(self, birth: _Birth) -> None:
        """Record a started worker and watch it."""
        assert self._selector is not None and self._trees is not None
        wid, link = birth.wid, birth.link
        worker = _Worker(wid, birth.process, link)
        worker.restarts = birth.restarts
        worker.pidfd = _open_pidfd(birth.process.pid, self.start_method)
        worker.cgroup = birth.cgroup
        self._trees.started(worker.pid)
        if wid < len(self._workers):
            self._workers[wid] = worker  # a new incarnation (see _respawn)
        else:
            self._workers.append(worker)
        self._live += 1
        self._selector.register(link.report_fd, selectors.EVENT_READ, (_REPORT, worker))
        self._selector.register(worker.watch_fd, selectors.EVENT_READ, (_SENTINEL, worker))
        if birth.work_fd is not None:
            self._selector.register(birth.work_fd, selectors.EVENT_READ, (_LINK, worker))

    # -- the work plane's hooks (channels, executor; see WorkPlane) ------------

    def _attach_work_link(self, wid: int) -> tuple[InheritedFd | None, int | None]:
        """A fresh work link for worker `wid`, at each spawn."""
        if self._plane is None:
            return None, None
        return self._plane.attach(wid)

    def _respawn(self, wid: int) -> None:
        """Start a new incarnation of ended worker `wid`: same id, new process,
        new links, in the state last broadcast. Does not wait for it to be ready."""
        self._require_started()
        assert self._board is not None
        if not 0 <= wid < len(self._workers) or self._workers[wid].alive:
            raise ValueError(f"worker {wid} has not ended")
        self._require_not_final()
        self._board.reset(wid, pack_command(self._seq, self._state_of(wid)))
        with _quiet_collector(self.start_method):  # restart latency: no collection around the fork
            self._spawn([wid], self._workers[wid].restarts + 1)
        if self._killed:  # (kill() from a signal handler meanwhile)
            self._kill_worker(wid)
        # Nobody waits for it, as start() does for the first ones: one that never comes up
        # (an import that blocks, say) would stay "running" for ever.
        w = self._workers[wid]
        if w.alive and w.acked_seq < 0:
            w.start_by = time.monotonic() + self.start_timeout
            self._schedule(w.start_by)
        self._restarts_total += 1

    def _kill_worker(self, wid: int) -> None:
        """SIGKILL one live worker now; it is reported as killed."""
        w = self._workers[wid]
        if w.alive and w.pid is not None:
            w.signalled = signal.SIGKILL
            containment.kill_trees([w.pid])  # its tree too: it cannot end it itself

    def _await_ready(self) -> None:
        self._awaiting = {w.id for w in self._workers if w.acked_seq < 0 and w.alive}
        self._awaiting_seq = 0
        if not self._pump_until(lambda: not self._awaiting, self.start_timeout):
            raise WorkerStartError(
                f"workers {sorted(self._awaiting)} did not come up within {self.start_timeout:.0f}s"
            )
        # A worker that stopped before it was up was told to by a SIGTERM from
        # outside (to the whole process group, say): a graceful stop, not a
        # failure to start; the others go on.
        failed = [w for w in self._workers
                  if w.report is not None and w.acked_seq < 0 and w.report.outcome is not Outcome.STOPPED
                  and not (self._kills_at_start_ok and w.start_error is None and w.signalled is None
                           and (w.report.exitcode or 0) < 0)]
        if failed:
            w = failed[0]
            why = (w.start_error or "").strip().splitlines()
            detail = why[-1] if why else shutdown.describe_exit(w.report.exitcode if w.report else None)
            hint = ""
            if w.signalled is not None:
                detail = f"killed by the controller with {shutdown.signal_name(w.signalled)} while starting"
            elif self.start_method != "fork" and (w.start_error or (w.report and w.report.exitcode == 1)):
                hint = (
                    f"; under {self.start_method} the target must be importable by module and name"
                    " in a fresh interpreter"
                )
            raise WorkerStartError(
                f"worker {w.id} failed before it was ready: {detail}{hint}"
            )

    def close(self) -> None:
        """Stop what still runs, reap everything, release every resource. Idempotent."""
        if self._phase is _CLOSED or os.getpid() != self._owner_pid:
            return
        with self._locked():
            if self._phase is _NEW:
                self._phase = _CLOSED
                return
            try:
                # After a Ctrl-C that cut a stop short (the with block's exit): as a second Ctrl-C.
                self.stop(0.0 if self._stop_cut_short else None)
            except KeyboardInterrupt:
                # A second Ctrl-C while stopping: do not wait any longer.
                self._abort()
                raise

    def _abort(self) -> None:
        """Kill every live worker now, reap and release."""
        self.kill()
        self._pump_until(lambda: self._live == 0, self.kill_timeout)
        self._end_background()
        self._release()

    def _release(self) -> None:
        if self._phase is _CLOSED:
            return  # (a stop() from on_event, inside another stop's wait, released all)
        for w in self._workers:
            if w.alive:
                # Survived SIGKILL (uninterruptible sleep): report and let go.
                self._end_tree(w)
                self._finish(w, w.process.exitcode)
        if self._plane is not None:
            self._plane.release()
        if self._trees is not None:
            self._trees.close(self.kill_timeout)
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        with self._wake_lock:  # (-1 first: a handler's ring on this thread comes between)
            fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        if self._board is not None:
            self._board.close()
            self._board = None
        if self._control is not None:
            self._control.close()
            self._control = None
        self._phase = _CLOSED
        registry.open_controllers.discard(self)
        self._cond.notify_all()  # a background thread waiting for a pass: there is none to come
        if self._told and not self._dispatching:
            self._tell()  # (said in a pass an exception cut short): all is told before stop() returns

    # -- commands -----------------------------------------------------------

    def broadcast(self, state: State, *, timeout: float | None = None,
                  workers: Iterable[int] | None = None) -> None:
        """Send `state` to every live worker; return once each acknowledged it or ended.

        Ended workers are reaped first and never waited for.  `timeout`
        (default: the controller's `ack_timeout`; pass float('inf') to wait as
        long as it takes) bounds the wait: TimeoutError names the workers that
        have not acknowledged.  `workers` (worker ids) sends it to those only;
        STOPPED to some workers is `stop(workers=...)`.
        """
        state = check_state("state", state)
        timeout = check_timeout("timeout", timeout)
        with self._locked():
            self._require_started()
            ids = None if workers is None else self._check_ids(workers)
            if ids is not None and state is State.STOPPED:
                self._stop_some(ids, self.grace)
                return
            if state is not State.STOPPED:
                self._require_not_final()
            self._poll()
            self._post(state, ids)
            seq = self._seq
            limit = self.ack_timeout if timeout is None else timeout
            # Done when every worker acknowledged this command, or a later
            # command (another thread's) superseded it, or the caller gave way.
            interrupt = self._interrupt_waits or (lambda: False)
            if not self._pump_until(lambda: not self._awaiting or self._awaiting_seq != seq or interrupt(),
                                    limit):
                raise TimeoutError(
                    f"workers {sorted(self._awaiting)} did not acknowledge {state.name} within {limit}s"
                )
            if self._plane is not None and not self._awaiting:
                self._plane.settle()

    def stop(self, grace: float | None = None, *,
             workers: Iterable[int] | None = None) -> dict[int, WorkerReport]:
        """Broadcast STOPPED, wait up to `grace`, escalate, reap all, close all.

        Returns every worker's report, by worker id.  With `workers` (worker
        ids), stop only those (each escalated on its own, never restarted)
        and return their reports; the controller goes on.
        """
        grace = self.grace if grace is None else check_timeout("grace", grace, allow_none=False)
        assert grace is not None
        if os.getpid() != self._owner_pid:
            return dict(sorted(self._reports.items()))  # (a forked child's copy: nothing of it is ours)
        if workers is not None:
            with self._locked():
                self._require_started()
                return self._stop_some(self._check_ids(workers), grace)
        with self._locked():
            if self._phase is _STARTED:
                self._supervising = False
                try:
                    # (The post inside: a Ctrl-C just after it, before the wait, cuts the
                    # stop short all the same; close() waited out the whole grace.)
                    self._poll()
                    if self._state is not State.STOPPED:
                        self._post(State.STOPPED)
                    shutdown.escalate(self, grace, self.term_timeout, self.kill_timeout)
                except KeyboardInterrupt:
                    self._stop_cut_short = True  # (close() then ends what is left at once)
                    raise
                self._end_background()
                self._release()
            elif self._phase is _NEW:
                self._phase = _CLOSED
            return dict(sorted(self._reports.items()))

    def kill(self) -> None:
        """SIGKILL every live worker now. Safe to call from a signal handler;
        the workers are reaped (as killed) by the next call that waits.
        Final, as a stop is: nothing is restarted after it."""
        self._killed = True
        self._supervising = False
        self.signal_live(signal.SIGKILL)

    def wakeup(self) -> None:
        """Make a blocked wait() return early. Safe from a signal handler."""
        self._ring(b"\0")

    def _post(self, state: State, ids: list[int] | None = None) -> None:
        """Post `state` to every live worker (or to `ids`) and await their acks."""
        assert self._board is not None
        self._seq += 1
        if ids is None:
            self._state = state
            self._overrides.clear()
            if state is State.STOPPED:
                self._end_supervision()
            if self._plane is not None:
                self._plane.posted(state)
        else:
            for wid in ids:
                self._overrides[wid] = state
        word = pack_command(self._seq, state)
        self._awaiting_seq = self._seq
        self._awaiting = set()
        for w in self._workers if ids is None else [self._workers[wid] for wid in ids]:
            if w.alive and (not w.retiring or state is State.STOPPED):
                self._board.post(w.id, with_probe(word, w.probe) if w.probe else word)
                w.link.ring()
                self._awaiting.add(w.id)
                if self._resuming(w):
                    # Its answer is due within a heartbeat as a running worker's: one
                    # that cannot take the command (frozen, SIGSTOPped) is hung.
                    self._probe(w, time.monotonic())
        if ids is None:
            self._emit(Event(self._elapsed(), "broadcast", state=state.name.lower()))

    # -- waiting and reaping ------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """True once every worker has ended; False on timeout or wakeup()."""
        timeout = check_timeout("timeout", timeout)
        with self._locked():
            if self._phase is _NEW:
                raise RuntimeError("the controller is not started; call start() or use a with block")
            if self._phase is _CLOSED:
                return True
            return self._pump_until(self._all_ended, timeout, until_wakeup=True)

    def wait_ended(self, timeout: float | None) -> bool:
        """As wait(), but wakeup() does not cut it short."""
        timeout = check_timeout("timeout", timeout)
        with self._locked():
            if self._phase is _NEW:
                raise RuntimeError("the controller is not started; call start() or use a with block")
            if self._selector is None:
                return True
            return self._pump_until(self._all_ended, timeout)

    def reap(self, timeout: float | None = 0.0) -> list[WorkerReport]:
        """Reports of workers that ended since the last reap().

        With a timeout (None: no limit), block until at least one is there.
        """
        timeout = check_timeout("timeout", timeout)
        with self._locked():
            if self._phase is _STARTED:
                self._pump_until(lambda: bool(self._new_reports) or self._all_ended(), timeout,
                                 until_wakeup=True)
            reports, self._new_reports = self._new_reports, []
            return reports

    def status(self) -> list[WorkerStatus]:
        """A snapshot of every worker, live or ended."""
        with self._locked():
            if self._phase is _STARTED:
                self._poll()
            return [self._status_of(w) for w in self._workers[: self.workers]]

    def _tasks_done_total(self) -> float:
        """The work done so far, for the metrics' counter: the progress of every ended
        incarnation (a restarted worker's earlier ones, those a shrink removed) and of
        the live workers; in a run without restarts or shrinks, the sum of status()'s."""
        with self._locked():
            return self._done_ended + sum(self._progress_of(w)[0] or 0.0 for w in self._workers if w.alive)

    @property
    def reports(self) -> dict[int, WorkerReport]:
        """Reports of the workers that have ended, by worker id."""
        return dict(sorted(self._reports.items()))

    @property
    def state(self) -> State:
        """The state last broadcast."""
        return self._state

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self._workers if w.alive and w.pid is not None]

    def _signal_thread(self, wid: int, tid: int, sig: int) -> None:
        """Send `sig` to thread `tid` of live worker `wid`, for it to act on (not to end
        the worker: it is not marked signalled). Not yet reaped, its pid is its own."""
        w = self._workers[wid]
        if w.alive and w.pid is not None:
            containment.signal_thread(w.pid, tid, sig)

    def signal_live(self, sig: int) -> list[int]:
        """Send `sig` to every live worker; they will be reported as killed."""
        check_signal(sig)
        hit = []
        pids = []
        for w in self._workers:
            if w.alive and w.pid is not None:
                w.signalled = sig
                if sig == signal.SIGTERM and self._board is not None:
                    self._board.mark_terminate(w.id)  # read by the worker's handler
                if sig == signal.SIGKILL:
                    pids.append(w.pid)
                else:
                    try:
                        os.kill(w.pid, sig)
                    except ProcessLookupError:
                        pass
                hit.append(w.id)
        if pids:
            # Killed from outside, a worker cannot end its own tree: freeze and kill it here.
            containment.kill_trees(pids)
        return hit

    # -- the event pump -----------------------------------------------------

    @contextmanager
    def _locked(self) -> Generator[None, None, None]:
        """Hold the controller's lock (re-entrant for the thread that holds it)."""
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        if os.getpid() != self._owner_pid:
            # A child the script forked: its copy of the lock may be held by a
            # thread that does not exist here, and the workers are not its own.
            raise RuntimeError(f"this controller belongs to process {self._owner_pid}; "
                               "a process forked from it cannot use it")
        self._lock.acquire()
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def _unlocked_wait(self, wait: Callable[[], Any]) -> Any:
        """Run a blocking wait with the lock released, then take it back."""
        me = self._owner
        self._owner = None
        self._lock.release()
        try:
            return wait()
        finally:
            self._lock.acquire()
            self._owner = me

    def _pump_until(self, done: Callable[[], bool], timeout: float | None,
                    *, until_wakeup: bool = False) -> bool:
        """Deal with I/O until done() holds or the timeout expires (or, with
        `until_wakeup`, wakeup() is called); return done().

        The one wait of the controller. Call it holding the lock: one thread
        at a time waits in the kernel, the others wait for it to report.
        """
        deadline = _Deadline(timeout)
        wakes = self._wakes
        me = threading.get_ident()
        first = True  # a zero timeout still makes one pass
        while not done():
            if self._selector is None or (until_wakeup and self._wakes != wakes):
                break
            if deadline.expired and not first:
                break
            first = False
            if self._pumper is not None and self._pumper != me:
                self._owner = None
                try:
                    self._cond.wait(deadline.remaining())  # releases the lock while it waits
                finally:
                    self._owner = me
                continue
            # (The pumper itself, re-entered from an on_event callback of its own
            # pass, pumps on: a stop() there waits for the workers as any other.)
            outer = self._pumper
            self._pumper = me
            try:
                wait = deadline.remaining()
                if self._due is not None:  # a supervision timer comes first
                    wait = min(wait, max(0.0, self._due - time.monotonic()))
                selector = self._selector
                try:
                    ready = self._unlocked_wait(partial(selector.select, wait))
                except (OSError, ValueError):
                    if self._selector is not selector:  # released meanwhile (a close() at exit)
                        break
                    raise
                self._dispatching += 1
                try:
                    self._dispatch(ready)
                    self._run_timers()
                finally:
                    self._dispatching -= 1
                if self._told and not self._dispatching:
                    self._tell()
            finally:
                self._passes += 1
                self._pumper = outer
                self._cond.notify_all()
        return done()

    def _pump(self, timeout: float | None) -> bool:
        """One wait of up to `timeout` for I/O, and its handling (the work
        plane's manager loop drives the controller with it); True if
        wakeup() was called."""
        with self._locked():
            passes, wakes = self._passes, self._wakes
            self._pump_until(lambda: self._passes != passes, timeout)
            return self._wakes != wakes

    def _snapshot(self) -> list[WorkerStatus]:
        """status() without handling any I/O (for a thread that does not own the pump)."""
        with self._locked():
            return [self._status_of(w) for w in self._workers[: self.workers]]

    def _poll(self) -> None:
        """One pass over what is ready now, without waiting."""
        self._pump_until(lambda: False, 0)

    def _dispatch(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in ready:
            kind, worker = key.data
            if kind is _REPORT:
                if worker.alive:
                    self._read_reports(worker)
            elif kind is _SENTINEL:
                if worker.alive:
                    self._reap_worker(worker)
            elif kind is _LINK:
                if worker.alive and self._plane is not None:
                    self._plane.readable(worker.id)
            elif self._wake_r >= 0:
                woken = False
                try:
                    while data := os.read(self._wake_r, 512):
                        woken = woken or data.count(1) != len(data)  # b"\0": wakeup(); b"\1": a nudge
                except BlockingIOError:
                    pass
                if woken:
                    self._wakes += 1
        if self._trees is not None:
            self._trees.flush()  # the workers reaped in this pass, in one message

    def _read_reports(self, w: _Worker) -> None:
        frames, eof = w.link.read_frames()
        for kind, payload in frames:
            if kind == ACK:
                seq, state = ACK_BODY.unpack(payload)
                self._on_ack(w, seq, STATES[state])
            elif kind == RESULT:
                try:
                    w.result = pickle.loads(payload)
                except Exception as exc:  # noqa: BLE001 - unpickling runs arbitrary code
                    w.result = (Outcome.FAILED.value, None, f"the result could not be unpickled: {exc!r}")
            elif kind == PROGRESS:
                try:
                    w.info = pickle.loads(payload)
                except Exception:  # noqa: BLE001 - e.g. a class the manager cannot import
                    pass  # keep the last info
            elif kind == START_FAILED:
                w.start_error = payload.decode(errors="replace")
        if eof and not w.link.eof:
            # The worker closed its end; its sentinel follows.
            w.link.eof = True
            self._unregister(w.link.report_fd)

    def _on_ack(self, w: _Worker, seq: int, state: State) -> None:
        if seq >= self._awaiting_seq:
            self._awaiting.discard(w.id)
        first = w.acked_seq < 0  # this incarnation's first: it says its state, even PAUSED
        w.acked_seq = seq
        if self._plane is not None and self._board is not None and (
                unpack_command(self._board.command(w.id))[0] == seq):
            self._plane.acknowledged(w.id, state)
        if state is not w.state or first:
            w.state = state
            if state is not State.STOPPED:
                self._worker_event(w, _EVENT_OF[state])
            if state is State.PAUSED and w.progress_first is not None and w.paused_since is None:
                w.paused_since = time.monotonic()
            if state is State.RUNNING:
                if w.paused_since is not None:
                    w.paused_for += time.monotonic() - w.paused_since
                    w.paused_since = None
                if w.progress_first is None:
                    # Its rate counts from its first run: status() has one at its first call.
                    w.progress_first = (time.monotonic(), 0.0)
                if self._heartbeat is not None and not w.retiring:
                    self._probe(w, time.monotonic())  # silence counts from now

    def _reap_worker(self, w: _Worker) -> None:
        if not w.link.closed:
            self._read_reports(w)
        self._end_tree(w)
        if w.pidfd >= 0:
            # The pidfd is readable: the process has ended, and the exit
            # status is there for a waitpid(WNOHANG). Never a blocking join:
            # a worker's own children can hold any pipe, not its pidfd.
            exitcode = w.process.exitcode
        else:
            # The fork server's status pipe, which the worker never holds;
            # the server writes the status as soon as it has reaped it.
            w.process.join(self.kill_timeout)
            exitcode = w.process.exitcode
        self._finish(w, exitcode)

    def _finish(self, w: _Worker, exitcode: int | None) -> None:
        w.final_progress = self._progress_of(w)
        w.ended_at = time.monotonic()
        self._done_ended += w.final_progress[0] or 0.0
        report = self._decode(w, exitcode)
        if w.restarts:
            report = dataclasses.replace(report, restarts=w.restarts)
        w.report = report
        w.escalation = None
        self._live -= 1
        self._awaiting.discard(w.id)
        if not w.link.eof:
            self._unregister(w.link.report_fd)
        self._unregister(w.watch_fd)
        if w.pidfd >= 0:
            os.close(w.pidfd)
            w.pidfd = -1
        w.link.close()
        if exitcode is not None:
            w.process.close()
        self._reports[w.id] = report
        self._new_reports.append(report)
        if self._plane is not None:
            self._plane.ended(w.id, report)
        log.debug("worker %d (pid %s) ended: %s, %s", w.id, w.pid, report.outcome.value,
                  shutdown.describe_exit(exitcode))
        if report.outcome is not Outcome.HUNG:  # a hung worker's event came when it was found hung
            self._worker_event(w, report.outcome.value, exitcode=exitcode,
                               error=None if report.outcome in CLEAN_OUTCOMES else report.error)
        self._history.setdefault(w.id, []).append(report)
        self._supervise_exit(w, report)

    def _decode(self, w: _Worker, exitcode: int | None) -> WorkerReport:
        """Turn what we know of an ended worker into its report."""
        now = time.time()
        if w.result is not None:
            outcome, result, error = w.result
            return WorkerReport(w.id, w.pid, Outcome(outcome), result, error, exitcode, w.started, now)
        if w.start_error is not None:
            return WorkerReport(w.id, w.pid, Outcome.FAILED, None, w.start_error, exitcode, w.started, now)
        if w.hung:
            how = shutdown.describe_exit(exitcode)
            return WorkerReport(w.id, w.pid, Outcome.HUNG, None,
                                f"no heartbeat for {self._heartbeat}s while running: the worker {how}",
                                exitcode, w.started, now)
        if w.signalled is not None:
            error = f"killed by the controller with {shutdown.signal_name(w.signalled)}"
            if exitcode is not None and exitcode >= 0:
                error = None
                outcome = Outcome.CRASHED
            else:
                outcome = Outcome.KILLED
            return WorkerReport(w.id, w.pid, outcome, None, error or shutdown.crash_message(exitcode),
                                exitcode, w.started, now)
        return WorkerReport(w.id, w.pid, Outcome.CRASHED, None, shutdown.crash_message(exitcode),
                            exitcode, w.started, now)

    def _end_tree(self, w: _Worker) -> None:
        # Before the join: the worker's zombie still holds its pid, the id of its group.
        if self._trees is not None:
            self._trees.ended(w.pid, w.cgroup)
    # -- supervision: restarts, hang detection, resize (policy: supervise.py) --

    def _init_supervision(self, plan: Plan) -> None:
        self.supervision = plan
        self._supervisor = Supervisor(plan) if plan.restarts else None
        self._heartbeat = plan.heartbeat
        self._supervising = False  # from the end of start() to the first STOPPED or kill()
        self._killed = False  # kill() was called: final, as a stop is
        self._starting_exits: list[tuple[_Worker, WorkerReport]] = []
        self._history: dict[int, list[WorkerReport]] = {}
        self._overrides: dict[int, State] = {}  # per-worker commands since the last broadcast
        #: Worker id -> monotonic time of its restart, and the supervisor's (key, time)
        #: of the decision, undone if it is cancelled (None: one_for_all's group restart).
        self._restart_at: dict[int, tuple[float, tuple[Any, float] | None]] = {}
        self._group: set[int] | None = None  # one_for_all: the workers still stopping
        self._group_ids: set[int] = set()  # one_for_all: the ids to restart once they have
        self._group_delay = 0.0
        self._held: set[int] = set()  # stopped on request: never restarted
        self._resizes = 0  # resize() calls so far: a later one supersedes one still under way
        #: A job that goes on without a worker killed from outside (the sum job) has it
        #: reported, not raised, when that happens before the worker is up.
        self._kills_at_start_ok = False
        self._gave_up = False
        self._restarts_total = 0  # every restart so far, of workers a shrink removed too (the metric)
        self._done_ended = 0.0  # the progress of every ended incarnation (see tasks_done_total)
        self._due: float | None = None  # the nearest timer (see _next_deadline)

    @property
    def gave_up(self) -> bool:
        """True once the restart limit was reached and the controller stopped every worker."""
        return self._gave_up

    def history(self, worker_id: int) -> list[WorkerReport]:
        """The report of every ended incarnation of worker `worker_id`, oldest first."""
        with self._locked():
            check_worker_id(worker_id, max(self.workers, len(self._workers)))
            return list(self._history.get(worker_id, []))

    def resize(self, n: int) -> None:
        """Grow to `n` workers (new ids, started in the current state) or shrink
        (the highest ids are stopped gracefully and report stopped); return
        once the new workers are up or the removed ones have ended."""
        if isinstance(n, bool):
            raise ValueError(f"resize(n): n must be a positive integer, not {n!r}")
        if not isinstance(n, int):
            raise TypeError(f"resize(n): n must be a positive integer, not {type(n).__name__}")
        if n < 1:
            raise ValueError(f"resize(n): n must be a positive integer, not {n!r}")
        with self._locked():
            self._require_started()
            self._require_not_final()
            # The last resize asked for wins: one that waits (for new workers to come up, removed
            # ones to end, from another thread) gives way to a later one, and starts no more.
            self._resizes += 1
            if n > self.workers:
                too_many = limits.capacity_problem(n - self.workers, limits.MANAGER_FDS_PER_WORKER
                                                   if self._plane is None else limits.WORK_FDS_PER_WORKER)
                if too_many is not None:
                    raise limits.BeyondCapacity(f"resize(n): n={n} is more than this system lets us start"
                                                f" ({n - self.workers} more than the {self.workers} running):"
                                                f" {too_many}")
                self._grow(n, self._resizes)
            elif n < self.workers:
                self._shrink(n)

    def _grow(self, n: int, mine: int) -> None:
        assert self._board is not None
        # A shrink under way (another thread's) may still be stopping the last
        # processes of these ids: an id is taken again once its process has
        # ended, or that stop (its escalation) would reach the new one.
        old = [w for w in self._workers[self.workers:n] if w.alive]
        interrupt = self._interrupt_waits or (lambda: False)
        if old:
            self._pump_until(lambda: not any(w.alive for w in old) or interrupt(), self._escalation_bound(self.grace))
            if interrupt():
                return  # a stop came: it ends them, and starts nothing
            self._require_not_final()
        if n <= self.workers or self._resizes != mine:
            return  # another resize came meanwhile
        self._board.grow(n)
        word = pack_command(self._seq, self._state)
        new = list(range(self.workers, n))
        # A stop asked for meanwhile (the command line's SIGTERM, `procctl stop`)
        # ends the growth where it is: thousands of workers take a while to start.
        try:
            with _quiet_collector(self.start_method):
                for wid in new:
                    if interrupt() or self._resizes != mine or self._killed:
                        break
                    self._held.discard(wid)
                    self._overrides.pop(wid, None)
                    self._cancel_restart(wid)
                    self._board.reset(wid, word)
                    self.workers = wid + 1  # before the spawn: the new worker's ctx.workers
                    self._spawn([wid])
        finally:
            self._tell_size()  # (also when a start failed part way: the size is what started)
            if self._killed:
                self.signal_live(signal.SIGKILL)  # (kill() from another thread or a handler meanwhile)
        up = [self._workers[wid] for wid in new if wid < self.workers]
        if not self._pump_until(lambda: all(w.acked_seq >= 0 or not w.alive for w in up) or interrupt(),
                                self.start_timeout) and not interrupt():
            late = [w for w in up if w.acked_seq < 0 and w.alive]
            for w in late:  # (not left running unseen: failed, as a restart that does not come up)
                self._fail_start(w, "the resize")
            raise WorkerStartError(f"workers {[w.id for w in late]} did not come up within {self.start_timeout:.0f}s")

    def _shrink(self, n: int) -> None:
        gone = self._workers[n : self.workers]
        self.workers = n
        self._tell_size()
        for w in gone:
            self._cancel_restart(w.id)
            if self._supervisor is not None:
                self._supervisor.forget(w.id)
            self._overrides.pop(w.id, None)
            self._group_ids.discard(w.id)
            if w.alive:
                self._retire(w, self.grace)
        # A stop that comes meanwhile (a signal, a key) does not wait for these first:
        # their own escalation goes on within it.
        interrupt = self._interrupt_waits or (lambda: False)
        self._pump_until(lambda: not any(w.alive for w in gone) or interrupt(), self._escalation_bound(self.grace))

    def _tell_size(self) -> None:
        """Every live worker's ctx.workers says the size a resize made."""
        assert self._board is not None
        for w in self._workers[: self.workers]:
            if w.alive:
                self._board.set_workers(w.id, self.workers)

    def _stop_some(self, ids: list[int], grace: float) -> dict[int, WorkerReport]:
        """stop(workers=ids): each escalated on its own; never restarted."""
        for wid in ids:
            self._held.add(wid)
            self._cancel_restart(wid)
            self._group_ids.discard(wid)
            w = self._workers[wid]
            if w.alive:
                self._retire(w, grace)
        chosen = [self._workers[wid] for wid in ids]
        self._pump_until(lambda: not any(w.alive for w in chosen), self._escalation_bound(grace))
        return {w.id: w.report for w in chosen if w.report is not None}

    def _cancel_restart(self, wid: int) -> None:
        """Worker `wid` will not be restarted after all: its pending restart is undone."""
        _, decided = self._restart_at.pop(wid, (0.0, None))
        if decided is not None and self._supervisor is not None:
            self._supervisor.cancel(*decided)

    def _restart_pending(self, wid: int) -> bool:
        """Whether ended worker `wid` waits for its restart (backoff, or its group's)."""
        with self._locked():
            return wid in self._restart_at or (self._group is not None and wid in self._group_ids)

    def _escalation_bound(self, grace: float) -> float:
        return grace + self.term_timeout + self.kill_timeout + 1.0

    def _check_ids(self, workers: Iterable[int]) -> list[int]:
        return check_worker_ids(workers, self.workers)

    def _state_of(self, wid: int) -> State:
        """The state worker `wid` was last told: a per-worker command, or the broadcast."""
        return self._overrides.get(wid, self._state)

    def _all_ended(self) -> bool:
        """No worker is running, and none is waiting for its restart."""
        return self._live == 0 and not (self._supervising and (self._restart_at or self._group is not None))

    def _begin_supervision(self) -> None:
        """start() is done: from now on ended workers are restarted by the policy."""
        self._supervising = self._state is not State.STOPPED and not self._killed
        early, self._starting_exits = self._starting_exits, []
        for w, report in early:
            self._supervise_exit(w, report)

    def _end_supervision(self) -> None:
        """STOPPED was broadcast: nothing is restarted any more."""
        self._supervising = False
        self._restart_at.clear()
        self._group = None
        self._group_ids = set()

    def _supervise_exit(self, w: _Worker, report: WorkerReport) -> None:
        """Worker `w` has ended: ask the policy, and restart it, its group, or give up."""
        if self._supervisor is None:
            return
        if self._group is not None and w.id in self._group:
            self._group.discard(w.id)  # stopped by us for a one_for_all restart
            if not self._group:
                self._restart_group()
            return
        if not self._supervising:
            if self._phase is _STARTED and self._state is not State.STOPPED and (
                    w.acked_seq >= 0 or report.outcome is Outcome.STOPPED):
                self._starting_exits.append((w, report))  # ended while start() waits for the others
            return
        if w.retiring or w.id in self._held or w.id >= self.workers:
            return
        one_for_all = self._supervisor.plan.strategy is Strategy.ONE_FOR_ALL
        key = "all" if one_for_all else w.id
        outcome = report.outcome
        if outcome is Outcome.STOPPED:
            # Stopped, but not by us (no STOPPED broadcast, no stop of this worker): a SIGTERM
            # from outside (`kill PID`). A normal end, as a return: "always" restarts it
            # (OTP's permanent child), "on-failure" does not.
            outcome = Outcome.FINISHED
        now = time.monotonic()
        decision = self._supervisor.on_exit(key, outcome, now)
        if decision.action is Action.GIVE_UP:
            self._give_up(w, report)
        elif decision.action is Action.RESTART:
            if one_for_all:
                self._stop_group(w, decision.delay)
            else:
                self._schedule_restart(w.id, decision.delay, (key, now))

    def _schedule_restart(self, wid: int, delay: float, decided: tuple[Any, float] | None = None) -> None:
        at = time.monotonic() + delay
        self._restart_at[wid] = (at, decided)
        self._schedule(at)
        w = self._workers[wid]
        self._emit(Event(self._elapsed(), "restarting", worker=wid, pid=w.pid, restarts=w.restarts + 1,
                         delay=round(delay, 6)))

    def _stop_group(self, first: _Worker, delay: float) -> None:
        """one_for_all: stop every other worker gracefully, restart all once they have ended."""
        members = [w for w in self._workers[: self.workers] if w.id not in self._held]
        # (Added to a group restart under way: two that ended together, say
        # while start() waited, are both restarted.)
        self._group_ids = self._group_ids | {first.id} | {w.id for w in members if w.alive}
        self._group = {w.id for w in members if w.alive}
        self._group_delay = delay
        for w in members:
            if w.alive:
                self._retire(w, self.grace)
        if not self._group:
            self._restart_group()

    def _restart_group(self) -> None:
        self._group = None
        ids, self._group_ids = sorted(self._group_ids), set()
        for wid in ids:
            if wid < self.workers and wid not in self._held and not self._workers[wid].alive:
                self._schedule_restart(wid, self._group_delay)

    def _give_up(self, w: _Worker, report: WorkerReport) -> None:
        """The restart limit is reached: stop everything (grace, then escalation)."""
        plan = self.supervision
        self._gave_up = True
        log.info("worker %d %s: more than %d restarts in %gs, giving up", w.id, report.outcome.value,
                  plan.max_restarts, plan.restart_window)
        self._emit(Event(self._elapsed(), "gave_up", worker=w.id, pid=w.pid, restarts=w.restarts,
                         error=report.error or report.outcome.value))
        self._post(State.STOPPED)
        at = time.monotonic() + self.grace
        for x in self._workers:
            if x.alive and x.escalation is None:
                x.escalation = ("grace", at)
                self._schedule(at)

    def _retire(self, w: _Worker, grace: float) -> None:
        """Post STOPPED to worker `w` alone; escalate on a timer if it does not end."""
        assert self._board is not None
        self._seq += 1
        w.retiring = True  # (no override: a one_for_all restart brings it back in its state)
        self._board.post(w.id, with_probe(pack_command(self._seq, State.STOPPED), w.probe))
        w.link.ring()
        self._awaiting.discard(w.id)
        if w.escalation is None:
            w.escalation = ("grace", time.monotonic() + grace)
            self._schedule(w.escalation[1])

    def _signal_worker(self, w: _Worker, sig: int) -> None:
        if w.alive and w.pid is not None:
            if sig == signal.SIGKILL:
                self._kill_worker(w.id)  # with its process tree, as signal_live() does
                return
            w.signalled = sig
            if sig == signal.SIGTERM and self._board is not None:
                self._board.mark_terminate(w.id)  # read by the worker's handler: die of it
            try:
                os.kill(w.pid, sig)
            except ProcessLookupError:
                pass

    # The timers: every one is a monotonic deadline; `_due` is the nearest,
    # which the pump folds into its one wait.

    def _next_deadline(self) -> float | None:
        return self._due

    def _schedule(self, at: float) -> None:
        if self._due is None or at < self._due:
            self._due = at
            if self._pumper is not None and self._pumper != threading.get_ident():
                self._nudge()  # another thread waits in the pump, with the old timer

    def _run_timers(self) -> None:
        if self._due is None:
            return
        now = time.monotonic()
        if now < self._due:
            return
        self._due = None
        self._fire_escalations(now)
        self._check_heartbeats(now)
        self._check_starts(now)
        self._fire_restarts(now)

    def _check_starts(self, now: float) -> None:
        """A restarted worker that did not come up within start_timeout: failed, killed."""
        for w in self._workers:
            if w.start_by is None:
                continue
            if not w.alive or w.acked_seq >= 0:
                w.start_by = None
            elif now >= w.start_by:
                w.start_by = None
                self._fail_start(w, "its restart")
            else:
                self._schedule(w.start_by)

    def _fail_start(self, w: _Worker, since: str) -> None:
        """Worker `w` did not come up within start_timeout: it fails, killed."""
        w.start_error = f"did not come up within {self.start_timeout:g}s of {since}"
        log.warning("worker %d (pid %s) %s: killed", w.id, w.pid, w.start_error)
        self._signal_worker(w, signal.SIGKILL)

    def _fire_restarts(self, now: float) -> None:
        if not self._supervising:
            self._restart_at.clear()
            return
        for wid, (at, _) in sorted(self._restart_at.items()):
            if at > now:
                self._schedule(at)
                continue
            del self._restart_at[wid]  # (it happens: it counts)
            if wid >= self.workers or wid in self._held or self._workers[wid].alive:
                continue
            try:
                self._respawn(wid)
            except WorkerStartError as exc:
                w = self._workers[wid]
                assert w.report is not None
                self._give_up(w, dataclasses.replace(w.report, error=str(exc)))
                return
            except RuntimeError:
                if not self._killed:
                    raise
                return  # kill() came from a signal handler meanwhile: nothing more is restarted

    def _fire_escalations(self, now: float) -> None:
        for w in self._workers:
            if not w.alive or w.escalation is None:
                continue
            stage, at = w.escalation
            if now < at:
                self._schedule(at)
                continue
            if stage == "grace":
                self._signal_worker(w, signal.SIGTERM)
                w.escalation = ("term", now + self.term_timeout)
            elif stage == "term":
                log.info("worker %d did not end after SIGTERM: sent SIGKILL", w.id)
                self._signal_worker(w, signal.SIGKILL)
                w.escalation = ("kill", now + self.kill_timeout)
            else:
                log.error("worker %d survived SIGKILL for %.1fs", w.id, self.kill_timeout)
                w.escalation = None
                continue
            self._schedule(w.escalation[1])

    # Heartbeat: the controller changes the probe bits of a RUNNING worker's
    # command word (and rings, for a worker waiting inside procctl); the
    # worker's next checkpoint, sleep or progress stores the probe back.  A
    # probe unanswered for `heartbeat` seconds means the worker passed no
    # checkpoint for that long: it is hung.  An answered probe is followed
    # by a new one a quarter period later, so that `beat_age` (the time
    # since the first unanswered probe) is late by at most T/4; no cost on
    # the worker's hot path.

    def _probe(self, w: _Worker, now: float) -> None:
        assert self._board is not None and self._heartbeat is not None
        w.probe = w.probe % (PROBE_LIMIT - 1) + 1  # never 0, the answer of a fresh slot
        w.probe_at = now
        w.suspect = None
        self._board.post(w.id, with_probe(self._board.command(w.id), w.probe))
        w.link.ring()
        self._schedule(now + self._heartbeat / 4)

    def _resuming(self, w: _Worker) -> bool:
        """Under a heartbeat: a worker that is up and said PAUSED, and was told RUNNING since."""
        return (self._heartbeat is not None and w.state is State.PAUSED and w.acked_seq >= 0 and not w.retiring
                and self._state_of(w.id) is State.RUNNING)

    def _check_heartbeats(self, now: float) -> None:
        if self._heartbeat is None or self._board is None:
            return
        for w in self._workers:
            if not w.alive or w.escalation is not None or w.retiring or (
                    w.state is not State.RUNNING and not self._resuming(w)):
                continue
            beat = self._board.beat(w.id)
            if beat == BEAT_DONE:
                # Past its last checkpoint: it owes no more (what it saves on the
                # way out, a large result to pickle, may take longer than a period).
                # Told to stop, it is bounded by who told it (stop()'s grace and
                # escalation, the executor's, a give-up's); else (its target
                # returned, a SIGTERM from outside) it must end within the grace,
                # as in a stop: then SIGTERM, SIGKILL. (One told to stop that has
                # not seen it yet passes no checkpoint: that one can be hung.)
                if self._state_of(w.id) is not State.STOPPED:
                    w.escalation = ("grace", now + self.grace)
                    self._schedule(w.escalation[1])
                continue
            if w.probe_at is None or beat == w.probe:
                if w.probe_at is None or now - w.probe_at >= self._heartbeat / 4:
                    self._probe(w, now)
                else:
                    self._schedule(w.probe_at + self._heartbeat / 4)
            elif w.suspect is not None and now < w.suspect[0] + self._heartbeat / 4:
                # The second look is a quarter period after the first (other
                # workers' timers may run this sooner): the scheduler's counts
                # need that long to tell a worker that waits for a CPU.
                self._schedule(w.suspect[0] + self._heartbeat / 4)
            elif now - w.probe_at >= self._heartbeat:
                self._confirm_hang(w, now)
            else:  # look again within a quarter period: an answer then starts the next probe
                self._schedule(min(w.probe_at + self._heartbeat, now + self._heartbeat / 4))

    def _confirm_hang(self, w: _Worker, now: float) -> None:
        """A probe is unanswered after `heartbeat` seconds: hung, unless the
        worker only waited for a CPU.

        On a crowded machine a runnable worker can wait longer than that for
        its turn; it has done nothing wrong. So the first time, note its
        scheduler times and look again a quarter period later: a worker that
        ran meanwhile without answering (a long computation, GIL held) or
        slept (blocked in a C call) is hung; one that mostly waited for a CPU,
        or is queued for one still, gets another look (supervise.looks_hung).
        Without /proc, the second look decides.
        """
        assert self._heartbeat is not None
        sample = sched_sample(w.pid)
        assert self._board is not None
        beat = self._board.beat(w.id)
        if beat == BEAT_DONE:
            return  # its target returned meanwhile: no checkpoint is owed
        if beat == w.probe:
            # It answered since the look at its beat (the times read now include that
            # run): alive, and the next probe starts now.
            return self._probe(w, now)
        if w.suspect is not None:
            since, before = w.suspect
            if looks_hung(before, sample, now - since):
                return self._hang(w, now)
        w.suspect = (now, sample)
        self._schedule(now + self._heartbeat / 4)

    def _hang(self, w: _Worker, now: float) -> None:
        """No heartbeat for `heartbeat` seconds: SIGTERM, then SIGKILL after grace."""
        w.hung = True
        log.info("worker %d (pid %s) passed no checkpoint for %gs: hung", w.id, w.pid, self._heartbeat)
        self._worker_event(w, "hung", error=f"no heartbeat for {self._heartbeat}s")
        self._signal_worker(w, signal.SIGTERM)
        w.escalation = ("term", now + self.grace)
        self._schedule(w.escalation[1])

    def _beat_age(self, w: _Worker) -> float | None:
        if self._heartbeat is None or not w.alive or w.state is not State.RUNNING or self._board is None:
            return None
        beat = self._board.beat(w.id)
        if beat == BEAT_DONE:
            return None  # its target returned: no heartbeat is owed
        if w.probe_at is None or beat == w.probe:
            return 0.0
        return max(0.0, time.monotonic() - w.probe_at)

    # -- helpers ------------------------------------------------------------

    def _unregister(self, fd: int) -> None:
        if self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _progress_of(self, w: _Worker) -> tuple[float | None, float | None]:
        if self._board is None:
            return w.final_progress
        done, total = self._board.progress(w.id)
        if not (done or total):
            return None, None  # never reported
        return done, (None if total != total else total)  # NaN: no total

    def _status_of(self, w: _Worker) -> WorkerStatus:
        done, total = self._progress_of(w)
        rate = eta = None
        if done is not None:
            now = time.monotonic() if w.ended_at is None else w.ended_at  # an ended worker's: as it ended
            if w.progress_first is None:
                w.progress_first = (now, done)
            t0, d0 = w.progress_first
            # The time it ran: a pause stops the clock (a paused worker's rate is
            # as it was when it paused, and it has no ETA: nothing comes while paused).
            ran = (now if w.paused_since is None else min(now, w.paused_since)) - t0 - w.paused_for
            if ran > 0 and done > d0:
                rate = (done - d0) / ran
                if total is not None and w.ended_at is None and w.paused_since is None:
                    eta = max(0.0, (total - done) / rate)
        # A worker not yet up (restarted, added) is in the state it was started in.
        state = (w.state if w.acked_seq >= 0 else self._state_of(w.id)) if w.alive else State.STOPPED
        return WorkerStatus(
            w.id, w.pid, state, w.alive,
            w.report.outcome if w.report else None, done, total, rate, eta, dict(w.info),
            restarts=w.restarts, beat_age=self._beat_age(w),
        )

    def _worker_event(self, w: _Worker, name: str, **fields: Any) -> None:
        if self._on_event is None and self._control is None:
            return  # nobody listens: no event to build (a broadcast's acks are on the hot path)
        done, total = self._progress_of(w)
        self._emit(Event(self._elapsed(), name, worker=w.id, pid=w.pid, done=done, total=total, **fields))

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def _emit(self, event: Event) -> None:
        if self._control is not None:
            self._control.record(event)
        if self._on_event is None:
            return
        self._told.append(event)
        if not self._dispatching:
            self._tell()

    def _tell(self) -> None:
        """Give on_event the events said so far, in order. Never in the middle of
        a pass (a worker's frames half read): a callback may call any method,
        and one that waits (stop()) pumps on from there."""
        assert self._on_event is not None
        told = self._told
        while told:
            event = told.popleft()
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event callback failed for %s", event)
            except SystemExit:
                if threading.current_thread() is not self._bg_thread:
                    raise  # the script's own thread: it exits, as it asked
                # In our thread it would only end supervision, silently.
                log.exception("on_event callback called sys.exit() in the controller's thread: ignored")

    def _require_not_final(self) -> None:
        if self._state is State.STOPPED:
            raise RuntimeError("the workers were stopped; STOPPED is final")
        if self._killed:
            raise RuntimeError("the workers were killed; a kill is final, as a stop is")

    def _require_started(self) -> None:
        if self._phase is _NEW:
            raise RuntimeError("the controller is not started; call start() or use a with block")
        if self._phase is _CLOSED:
            raise RuntimeError("the controller is closed")

    def __repr__(self) -> str:
        return (f"<ProcessController {self.workers} workers, {self.start_method}, "
                f"{self._phase}, {self._live} live, state {self._state.name}>")


@contextmanager
def _quiet_collector(start_method: str) -> Iterator[None]:
    """While forking workers, keep the garbage collector off the shared pages.

    A collection in the manager between two forks writes to every object it
    scans, and each write copies a page the children still share; a
    collection in a new child does the same on its side. As the gc module's
    documentation advises for fork: collect nothing while forking, freeze
    what exists, and let the children collect again (worker.py) from where
    they start. A freeze the caller made is left as it is.
    """
    if start_method != "fork" or gc.get_freeze_count():
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def _open_pidfd(pid: int, start_method: str) -> int:
    """A pidfd for a worker we forked (or spawned), -1 where there is none.

    Under forkserver the fork server is the parent and reports the exit
    status on a pipe of its own, which the worker never holds: that pipe is
    watched instead (a pidfd would fire before the status is there).
    """
    if start_method == "forkserver" or not hasattr(os, "pidfd_open"):
        return -1
    try:
        return os.pidfd_open(pid)
    except OSError:  # pragma: no cover - kernel before 5.3
        return -1


def _preload_in_fork_server() -> None:
    """Have the fork server import the worker side once, before it starts,
    and stand a SIGTERM to the process group (see forkserver_preload.py).

    Else, when the script only did `import procctl` (names load lazily),
    every forkserver worker would import procctl.worker after its fork: time
    at each start and private memory in each worker. Takes effect only if the
    fork server has not started yet. The list becomes `["__main__",
    "procctl.forkserver_preload"]`: the main module, as by default, whose own
    imports preload the user's modules (multiprocessing offers no public way
    to read a list set earlier and add to it).
    """
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(list(FORK_SERVER_PRELOAD))


#: What the fork server imports before it forks any worker.
FORK_SERVER_PRELOAD = ("__main__", "procctl.forkserver_preload")


def _close_at_exit() -> None:
    # atexit runs hooks last-registered first: multiprocessing.util is imported
    # above, so this runs before it joins its children, and a script that
    # forgot close() does not hang on paused workers.
    interrupted = False
    for controller in list(registry.open_controllers):
        try:
            controller.close()
        except KeyboardInterrupt:  # a Ctrl-C while it stopped: close() killed what was left
            interrupted = True
        except Exception:
            log.exception("closing %r at exit failed", controller)
    guardian = sys.modules.get("procctl.guardian")
    if guardian is not None:  # after the controllers: it cleans up what they leave
        guardian.release_at_exit()
    if interrupted:
        # The operator's Ctrl-C ends the script as an uncaught one would: 130, not
        # "Exception ignored in atexit callback" and the status the script had.
        # (At once: exit handlers registered before procctl's own do not run;
        # the logging module's files are flushed and closed first.)
        logging.shutdown()
        threads.exit_now(130)


atexit.register(_close_at_exit)
