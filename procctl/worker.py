"""The child side: the worker's entry point, its context and the parent-death watch.

Everything a worker uses arrives in its `WorkerSpec`; nothing here reaches
back into the controller's module.
"""

from __future__ import annotations

import errno
import gc
import math
import os
import pickle
import reprlib
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any, SupportsFloat

from . import containment, threads, workwire
from .channel import (
    BEAT_DONE,
    COMMAND_MASK,
    PROGRESS,
    RESULT,
    START_FAILED,
    Board,
    ControlEnd,
    InheritedFd,
    probe_of,
    unpack_command,
)
from .errors import format_exc
from .statecodes import STATES, SYS_EXIT_NOTE, Outcome, State
from .threads import MANAGED_SIGNALS  # blocked around a fork: no handler of the manager's runs in the child
from .worker_plane import WorkEnd

#: How long an orphaned worker may take to return by itself before it exits.
ORPHAN_GRACE = 0.5
EXIT_ORPHANED = 70
EXIT_START_FAILED = 3
PR_SET_PDEATHSIG = 1
#: At most one progress-info message per this many seconds.
INFO_INTERVAL = 0.25


_INF = math.inf
_NO_TOTAL = math.nan  # on the board: no total given
_PLAIN = frozenset({int, float})  # progress()'s fast path; other numbers are checked (numbers.Real)


def _is_number(value: Any) -> bool:
    """A real number (a Decimal too) that is not a bool, a str or bytes ("3" is not a count)."""
    import numbers

    if isinstance(value, bool):
        return False
    # Decimal is a Number but not a Real (it does not mix with floats): a count all the same.
    return isinstance(value, numbers.Real) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex))


def _bad_progress(done: Any, total: Any) -> str:
    short = reprlib.Repr()
    short.maxlong = short.maxstring = short.maxother = 40
    for name, value in (("done", done), ("total", total)):
        if name == "total" and value is None:
            continue
        try:
            ok = _is_number(value) and 0.0 <= float(value) < _INF
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            return f"progress(): {name} must be a finite number >= 0, not {short.repr(value)}"
    return "progress(): done and total must be finite numbers >= 0"  # pragma: no cover


class Payload:
    """The target and its arguments.

    Under spawn and forkserver they are pickled as one opaque blob, so that a
    target the child cannot import fails inside `worker_main`, where the error
    can be reported to the controller, instead of in multiprocessing's loader.
    """

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.target, self.args, self.kwargs = target, args, kwargs

    def __reduce__(self) -> Any:
        blob = bytes(ForkingPickler.dumps((self.target, self.args, self.kwargs)))
        return _DeferredPayload, (blob,)

    def load(self) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        return self.target, self.args, self.kwargs


class _DeferredPayload:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def load(self) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        target, args, kwargs = pickle.loads(self.blob)
        return target, args, kwargs


class WorkerSpec:
    """What a worker process is given. (A plain class: a spawn worker then
    need not import dataclasses.)"""

    def __init__(
        self,
        worker_id: int,
        workers: int,
        payload: Payload,
        board: InheritedFd,
        doorbell: InheritedFd,
        report: InheritedFd,
        manager_pid: int,
        *,
        die_with_parent: bool = False,
        forkserver: bool = False,
        cgroup: str | None = None,
        work: InheritedFd | None = None,
        channels: dict[str, tuple[int, int]] | None = None,
        collect: bool = True,
        restarts: int = 0,
        end: ControlEnd | None = None,
        id_base: int = 0,
        total: int | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.workers = workers
        self.payload = payload
        self.board = board
        self.doorbell = doorbell
        self.report = report
        self.manager_pid = manager_pid
        #: Ask the kernel to SIGKILL us when our parent dies (see _die_with_parent).
        self.die_with_parent = die_with_parent
        #: Started by the fork server: let go of its alive pipe (see _release_fork_server).
        self.forkserver = forkserver
        #: The cgroup directory to join, if the controller made one (containment.py).
        self.cgroup = cgroup
        #: The worker's end of its work link (channels, executor tasks), and the channels.
        self.work = work
        self.channels = {} if channels is None else channels
        #: The manager collects garbage: so do we (it pauses its collector while forking).
        self.collect = collect
        #: How many times this worker id has been restarted (ctx.restarts).
        self.restarts = restarts
        #: Under fork: the worker's end, made by the manager (WorkerLink.child_end).
        self.end = end
        #: What ctx.worker_id and ctx.workers say, when not worker_id and workers: a
        #: cluster node's workers are numbered id_base + local id, of all the nodes' workers.
        self.id_base = id_base
        self.total = total


class WorkerContext:
    """What a worker's target receives as its first argument."""

    def __init__(
        self, worker_id: int, end: ControlEnd, manager_fd: int | None,
        workers: int = 1, work: WorkEnd | None = None, restarts: int = 0, *, resizable: bool = True,
    ) -> None:
        self.worker_id = worker_id
        #: How many times this worker id has been restarted (0 for the first process).
        self.restarts = restarts
        self._workers = workers
        self._resizable = resizable
        self._work = work
        #: The State last applied.
        self.state: State = State.PAUSED
        self._end = end
        self._applied = -1
        self._manager_fd = manager_fd
        self._manager_gone = False
        self._term_requested = False
        # Set once checkpoint() has told the target to stop. An executor task
        # that was told is interrupted; one that was not and returned has
        # completed, even if STOPPED came meanwhile (a SIGTERM to the group).
        self._saw_stop = False
        #: Set once the worker owes the heartbeat no more answers (BEAT_DONE).
        self._beat_done = False
        #: Held to store an answer or BEAT_DONE: a progress() from a helper thread that
        #: read the flag before the target's thread set it must not write after it.
        self._beat_lock = threading.Lock()
        self._info_sent = -INFO_INTERVAL
        self._info_pending = False
        self._polls: dict[int, Any] = {}
        #: The keyword arguments of the last progress() call.
        self.info: dict[str, Any] = {}
        # A self-pipe the SIGTERM handler writes to, so a worker blocked in
        # a pause wakes up to the request.
        self._term_r, self._term_w = os.pipe()
        os.set_blocking(self._term_w, False)
        self._sleep_fds = [end.doorbell_fd, self._term_r] + ([manager_fd] if manager_fd is not None else [])
        self._sleeper = select.poll()
        for fd in self._sleep_fds:
            self._sleeper.register(fd, select.POLLIN)

    # -- the public surface -------------------------------------------------

    @property
    def workers(self) -> int:
        """How many workers the controller (or executor) has now: a resize()
        changes it for every live worker."""
        if self._resizable:
            told = self._end.board.workers(self._end.worker)
            if told:
                return told
        return self._workers

    def checkpoint(self) -> bool:
        """Apply pending commands; block while PAUSED; False once STOPPED."""
        if self.state is not State.STOPPED:
            if self._end.command() != self._applied:
                self._apply()
            while self.state is State.PAUSED:
                self._block(None)
            if self.state is State.RUNNING:
                return True
        self._saw_stop = True
        self._owe_no_beats()
        return False

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds` (math.inf: until the next command); a command
        cuts it short. Then return checkpoint()."""
        if seconds is None:  # as time.sleep (math.inf says "until the next command")
            raise TypeError("seconds must be a number of seconds, not None")
        deadline = workwire.deadline(seconds, "seconds")  # as time.sleep: not negative, not NaN
        # Counted before the first checkpoint: a pause taken there, and the run
        # that ends it, came during this call and cut it short as any other.
        applied = self._applied & COMMAND_MASK  # a heartbeat probe is not a command
        if not self.checkpoint():
            return False
        while self._applied & COMMAND_MASK == applied and self.state is State.RUNNING:
            remaining = workwire.remaining(deadline)
            if remaining is not None and remaining <= 0:
                break
            self._block(remaining)
        return self.checkpoint()

    def wait_readable(self, obj: Any, timeout: float | None = None) -> bool:
        """Block until `obj` (a Connection, fd or object with fileno()) is
        readable, or a command or the timeout comes first.

        True means `obj` is readable; call checkpoint() after a False.
        """
        end = workwire.deadline(timeout)
        if isinstance(obj, bool) or not isinstance(obj, int) and not callable(getattr(obj, "fileno", None)):
            raise TypeError(f"obj must be a file descriptor or have fileno(), not {type(obj).__name__}")
        fd = obj if isinstance(obj, int) else obj.fileno()
        if isinstance(fd, bool) or not isinstance(fd, int) or not 0 <= fd < 2**31:
            raise ValueError(f"obj: {fd!r} is not a file descriptor")
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
            for other in self._sleep_fds:
                poller.register(other, select.POLLIN)
        if self.state is State.STOPPED:
            return False  # told to stop already (its ring was read): nothing to wait for, as sleep()
        applied, state = self._applied & COMMAND_MASK, self.state
        while True:
            ready = poller.poll(workwire.poll_ms(workwire.remaining(end)))
            hit = False
            for ready_fd, events in ready:
                if ready_fd == fd:
                    if events & select.POLLNVAL:  # as select() says it
                        del self._polls[fd]
                        raise OSError(errno.EBADF, f"file descriptor {fd} is not open")
                    hit = True
                else:
                    self._on_wake(ready_fd)
            if self._applied & COMMAND_MASK != applied or self.state is not state:
                return False  # a command, even one that came with the data: the caller sees it first
            if hit:
                return True
            if end is not None and time.monotonic() >= end:
                return False
            # Nothing for the caller: a heartbeat probe (answered), or a turn of a long timeout.

    def get(self, name: str, timeout: float | None = None) -> Any:
        """Take the next item of channel `name`; block while it is empty.

        A PAUSED worker takes nothing: the get waits for RUNNING. Raises
        `procctl.Closed` when the channel is closed and empty or at STOPPED,
        `queue.Empty` when `timeout` passes first.
        """
        return self._plane().get(self, name, timeout)

    def put(self, name: str, item: Any, timeout: float | None = None) -> bool:
        """Send `item` to channel `name`; block while it is full.

        True once sent; False at STOPPED (the item was not sent, and is not
        counted). Raises `queue.Full` when `timeout` passes first.
        """
        return self._plane().put(self, name, item, timeout)

    def iter(self, name: str) -> Iterator[Any]:
        """The items of channel `name`, until it is closed and empty or STOPPED."""
        return self._plane().iter(self, name)

    def progress(self, done: SupportsFloat, total: SupportsFloat | None = None, **info: Any) -> None:
        """Report progress. Cheap enough for a tight loop: `done` and `total`
        are two stores in shared memory; `info` (small picklable values) is
        sent at most every INFO_INTERVAL seconds, and dropped rather than
        ever blocking the worker.

        `done` and `total` must be finite numbers >= 0 (ValueError otherwise:
        NaN, infinities, negatives, ints past float range, non-numbers)."""
        try:
            if type(done) not in _PLAIN and not _is_number(done) or (
                    total is not None and type(total) not in _PLAIN and not _is_number(total)):
                raise TypeError
            d = float(done)
            t = _NO_TOTAL if total is None else float(total)
        except (TypeError, ValueError, OverflowError):
            d = t = -1.0  # refused just below, with the caller's values
        # One chained comparison each; NaN fails it too.
        if not 0.0 <= d < _INF or not (total is None or 0.0 <= t < _INF):
            raise ValueError(_bad_progress(done, total))
        self._end.board.set_progress(self._end.worker, d, t)
        if self._end.command() != self._applied:
            self._answer_probe()  # progress is a sign of life too
        if info:
            self.info = info
            if time.monotonic() - self._info_sent >= INFO_INTERVAL:
                self._send_info()
            else:
                self._info_pending = True  # sent when the worker next sleeps or its target returns

    def _send_info(self) -> None:
        self._info_sent = time.monotonic()
        self._info_pending = False
        try:
            self._end.try_send(PROGRESS, pickle.dumps(self.info))
        except Exception:  # noqa: BLE001 - unpicklable info is the caller's loss, not a crash
            pass

    # -- internals ----------------------------------------------------------

    def _plane(self) -> WorkEnd:
        if self._work is None:
            raise ValueError("this worker has no channels (give ProcessController channels={name: maxsize})")
        return self._work

    def _wait_io(self, fd: int, events: int, timeout: float | None) -> bool:
        """Block until `fd` is ready for `events`, or a command or the timeout
        comes first; as wait_readable()."""
        poller = select.poll()
        poller.register(fd, events)
        for other in self._sleep_fds:
            poller.register(other, select.POLLIN)
        applied, state = self._applied & COMMAND_MASK, self.state
        hit = False
        for ready_fd, _ in poller.poll(workwire.poll_ms(timeout)):
            if ready_fd == fd:
                hit = True
            else:
                self._on_wake(ready_fd)
        return hit and self._applied & COMMAND_MASK == applied and self.state is state

    def _answer_probe(self, word: int | None = None) -> None:
        """Store the heartbeat probe of the command word (`word`, as read): we are alive."""
        with self._beat_lock:
            if not self._beat_done:
                self._end.board.set_beat(self._end.worker, probe_of(self._end.command() if word is None else word))

    def _owe_no_beats(self) -> None:
        """From now on no checkpoint is owed (the target returned, or was
        told to stop): the controller's heartbeat leaves this worker alone."""
        with self._beat_lock:
            if not self._beat_done:
                self._beat_done = True
                self._end.board.set_beat(self._end.worker, BEAT_DONE)

    def _apply(self) -> None:
        # Drain first, then read: a command posted in between rings again.
        self._end.drain_doorbell()
        word = self._end.command()
        if word != self._applied:
            self._answer_probe(word)
        probe_only = self._applied >= 0 and (word ^ self._applied) & COMMAND_MASK == 0
        self._applied = word
        if probe_only:
            return  # a heartbeat probe, answered: not a command
        seq, state = unpack_command(word)
        if self.state is State.STOPPED:
            return
        self.state = STATES[state]
        if self.state is State.STOPPED:
            return  # our exit is the acknowledgement: one less wakeup for the manager
        if self._info_pending:  # before the acknowledgement: who waited for it sees the info too
            self._send_info()
        try:
            self._end.ack(seq, state)
        except OSError:
            self._lost_manager()

    def _block(self, timeout: float | None) -> bool:
        """Sleep in the kernel until a command, the manager's death or the
        timeout. True if woken by something other than the timeout."""
        if self._work is not None and self._work.credits:
            self._work.give_back(self)  # room we hold while we sleep is room nobody can use
        if self._info_pending:  # the last info a tight loop gave, held back by the interval
            self._send_info()
        # poll(), not select(): forked workers inherit the manager's fds, and
        # with hundreds of workers ours are past select()'s limit of 1024.
        ready = self._sleeper.poll(workwire.poll_ms(timeout))
        for fd, _ in ready:
            self._on_wake(fd)
        return bool(ready)

    def _on_wake(self, fd: int) -> None:
        if fd == self._manager_fd:
            self._lost_manager()
        elif fd == self._term_r:
            self.state = State.STOPPED
        else:
            # The doorbell: _apply drains it, then reads the board (a ring for a
            # command already read changes nothing). Never look before the
            # drain: a command posted between the look and the drain would lose
            # its ring with the stale one, and wait for the next command.
            self._apply()

    def _lost_manager(self) -> None:
        self._manager_gone = True
        self.state = State.STOPPED

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # The controller marks our slot before its own SIGTERM (escalation
        # after the grace period): then die of it. An unmarked SIGTERM came
        # from elsewhere (a SIGTERM to the whole process group, say) and asks
        # for a graceful stop, as the manager will ask too; a second one kills.
        if self._term_requested or self._end.board.terminate_marked(self._end.worker):
            containment.end_descendants()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._term_requested = True
        self.state = State.STOPPED
        try:
            os.write(self._term_w, b"\0")
        except OSError:
            pass

    def _stop_was_broadcast(self) -> bool:
        return self.state is State.STOPPED or unpack_command(self._end.command())[1] == State.STOPPED


_current: WorkerContext | None = None

#: The name of every worker's multiprocessing Process (its number follows).
WORKER_NAME_PREFIX = "procctl-worker-"


def context() -> WorkerContext:
    """The WorkerContext of this worker process (inside a task of ProcessExecutor,
    or anywhere in a controller's worker)."""
    if _current is None:
        raise RuntimeError("procctl.context() is only available inside a procctl worker")
    return _current


def _ignored(signum: int, frame: Any) -> None:
    """The worker's handler of SIGINT, SIGUSR1 and SIGUSR2: nothing."""


def _reset_signals(ctx: WorkerContext) -> None:
    # The manager decides what Ctrl-C means, and USR1/USR2 (pause, resume)
    # are the manager's: its handlers (inherited under fork) must never run
    # here, nor may the worker die of them. A handler that does nothing, not
    # SIG_IGN, which a program a task starts would inherit through exec (`dd`
    # deaf to USR1, a server that a task stops with SIGINT never ending).
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _ignored)
    # TTIN/TTOU resize; a worker, in a process group of its own, must not
    # stop (their default) reading or writing the terminal: those stay ignored.
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, ctx._on_sigterm)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # pragma: no cover - not the main thread
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGED_SIGNALS)


#: prctl(2), resolved once at import in the manager (containment.py), so that
#: fork children and the fork server share ctypes' pages.
_prctl = containment.PRCTL


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel kills us when our parent exits.

    The pidfd watch is a Python thread, and a target inside a long C call
    that holds the GIL would keep it from ever running; the kernel needs no
    GIL. The parent is the manager under fork and spawn, and the fork server
    under forkserver, which exits as soon as the manager is gone.
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _release_fork_server() -> None:
    """Let go of our copy of the manager's end of the fork server's alive pipe.

    multiprocessing hands every forkserver child a copy of it; while any
    worker holds one, the fork server never sees the manager go, never exits,
    and our parent-death signal never fires. multiprocessing keeps its number
    in private state, so it is found by what the kernel says: the pipe we
    hold open for writing whose read end our parent, the fork server, holds.
    Its number is pointed at /dev/null rather than closed, so that nothing
    that still knows the number can reach another file that reuses it.
    """
    parent = os.getppid()
    theirs = _pipe_ends(parent)
    mine = _pipe_ends(os.getpid())
    devnull = -1
    for fd, (pipe, writes) in mine.items():
        if fd > 2 and writes and any(p == pipe and not w for p, w in theirs.values()):
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(devnull, fd, inheritable=False)
    if devnull >= 0:
        os.close(devnull)


def _pipe_ends(pid: int) -> dict[int, tuple[str, bool]]:
    """A process's pipe descriptors: fd -> (pipe, opened for writing)."""
    ends: dict[int, tuple[str, bool]] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ends
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if not target.startswith("pipe:"):
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        ends[int(name)] = (target, flags & os.O_ACCMODE == os.O_WRONLY)
    return ends


def _watch_manager(manager_pid: int) -> int | None:
    """Return an fd that becomes readable when the manager exits.

    A pidfd works whoever our parent is (under forkserver it is not the
    manager). The caller's watcher thread blocks on it.
    """
    try:
        fd = os.pidfd_open(manager_pid)
    except ProcessLookupError:
        os._exit(EXIT_ORPHANED)
    except (AttributeError, OSError):  # pragma: no cover - no pidfd here
        import multiprocessing

        parent = multiprocessing.parent_process()
        return parent.sentinel if parent is not None else None
    return fd


def _orphan_watch(fd: int, finished: threading.Event) -> None:
    watch = select.poll()
    watch.register(fd, select.POLLIN)
    watch.poll()
    # The manager is gone: nobody will ever stop or reap us. Give the target
    # a moment to notice (checkpoint() now returns False), then leave.
    finished.wait(ORPHAN_GRACE)
    containment.end_descendants()
    os._exit(EXIT_ORPHANED)


def _run_target(ctx: WorkerContext, payload: Payload,
                cgroup: str | None) -> tuple[Outcome, Any, str | None, int]:
    """The target's outcome, result and error, and the exit status the worker
    ends with: a failed target's, as a multiprocessing.Process would (the code
    its sys.exit() was given, or 1 after an exception; the report says failed)."""
    target, args, kwargs = payload.load()
    try:
        ctx._apply()  # acknowledge the initial command: we are ready
        if cgroup is not None:
            containment.join_cgroup(cgroup)
        if not ctx.checkpoint():  # workers start paused: wait for the first run
            return Outcome.STOPPED, None, None, 0
        try:
            result = target(ctx, *args, **kwargs)
        finally:
            ctx._owe_no_beats()  # what follows (the result's pickling, the exit) owes no checkpoint
    except SystemExit as exc:
        text = format_exc()
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return Outcome.FAILED, None, f"{text}{SYS_EXIT_NOTE}{exc.code!r})\n", code
    except BaseException:  # noqa: BLE001 - whatever the target raises is its report
        return Outcome.FAILED, None, format_exc(), 1
    outcome = Outcome.STOPPED if ctx._stop_was_broadcast() else Outcome.FINISHED
    return outcome, result, None, 0


def _send_result(end: ControlEnd, outcome: Outcome, result: Any, error: str | None) -> None:
    try:
        payload = pickle.dumps((outcome.value, result, error), pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - pickling runs the result's own code (even a
        # SystemExit from a __reduce__ is the result's fault, not a reason to die unreported)
        note = f"the result of type {type(result).__name__} could not be pickled: {exc!r}"
        payload = pickle.dumps((Outcome.FAILED.value, None, note))
    try:
        end.send(RESULT, payload)
    except OSError:
        pass  # the manager is gone; the orphan watch ends us


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of every worker process."""
    # First: whatever the target starts must be in our tree (containment.py);
    # the cgroup, before the target runs (_run_target).
    containment.contain_worker()
    if spec.collect and not gc.isenabled():
        gc.enable()
    end = spec.end
    if end is None:
        board = Board(spec.workers, fd=spec.board.detach())
        end = ControlEnd(spec.worker_id, board, spec.doorbell.detach(), spec.report.detach())
    if spec.forkserver:
        _release_fork_server()
    if spec.die_with_parent:
        _die_with_parent()
    # Opened after the prctl: a manager that died before it is caught here.
    manager_fd = _watch_manager(spec.manager_pid)
    work = None
    if spec.work is not None:
        work = WorkEnd(socket.socket(fileno=spec.work.detach()), spec.channels)
    ctx = WorkerContext(spec.id_base + spec.worker_id, end, manager_fd, spec.total or spec.workers, work,
                        spec.restarts, resizable=not spec.total)
    global _current
    _current = ctx
    _reset_signals(ctx)
    finished = None
    # With the kernel's parent-death signal set, the watch thread would add
    # nothing but its cost: a paused worker still sees the manager go through
    # the pidfd in its own wait, and the signal covers every other case.
    if manager_fd is not None and not spec.die_with_parent:
        finished = threading.Event()
        threading.Thread(
            target=_orphan_watch, args=(manager_fd, finished), name="procctl-orphan-watch", daemon=True
        ).start()
    try:
        outcome, result, error, exit_code = _run_target(ctx, spec.payload, spec.cgroup)
    except BaseException:  # noqa: BLE001 - reported to the controller, then we exit
        # The payload could not be loaded here (not importable under spawn).
        try:
            end.send(START_FAILED, format_exc().encode())
        except OSError:
            pass
        end.let_go()
        sys.exit(EXIT_START_FAILED)
    # Everything the target started ends with it, before we report.
    containment.end_descendants()
    if not ctx._manager_gone:
        if ctx._info_pending:
            ctx._send_info()
        _send_result(end, outcome, result, error)
    end.let_go()
    if finished is not None:
        finished.set()
    _end_despite_threads(exit_code)
    if (spec.end is None and not spec.forkserver) or EXIT_HANDLERS_AFTER_FORK:
        _bound_the_exit(exit_code)
    if work is not None:
        # Its unread items stay with the manager's copy of this end. Closed
        # here, not left to the interpreter's exit ("unclosed socket" under -X dev);
        # a task that closed every descriptor closed it already (EBADF).
        try:
            work.sock.close()
        except OSError:
            pass
    if exit_code:
        sys.exit(exit_code)  # (multiprocessing's bootstrap makes it the exit status)


#: How long a worker's exit (the exit handlers its target registered) may
#: take once it has reported.
EXIT_GRACE = 1.0
#: From Python 3.13, multiprocessing runs the exit handlers (atexit) in fork and
#: forkserver children too; before, only a spawn worker's interpreter ran them.
EXIT_HANDLERS_AFTER_FORK = sys.version_info >= (3, 13)


def _bound_the_exit(code: int) -> None:
    """A worker that runs the exit handlers the target registered (a spawn
    worker, as an interpreter does; any worker from Python 3.13) must not be
    kept alive by one that blocks when its result was reported long ago:
    after EXIT_GRACE it ends."""
    def end() -> None:
        threading.Event().wait(EXIT_GRACE)  # (a deadline: the exit normally ends this thread first)
        threads.exit_now(code)

    try:
        threads.start(threading.Thread(target=end, name="procctl-exit-bound", daemon=True))
    except OSError:  # no room for a thread: the exit goes its own way
        pass


def _end_despite_threads(code: int) -> None:
    """Exit now if the target left non-daemon threads running.

    The result is reported; the interpreter's shutdown would otherwise wait
    for those threads forever, and the worker would never end by itself.
    Without them, the usual exit runs (atexit, multiprocessing finalizers).
    """
    me = threading.current_thread()
    if any(t is not me and t.is_alive() and not t.daemon for t in threading.enumerate()):
        threads.exit_now(code)
