"""ProcessController: start N workers, broadcast states, reap, close.

Data flow (see channel.py for the wire):

    ProcessController                             worker processes
    -----------------                             ----------------
    broadcast(state) -- Board slot + doorbell --> ctx.checkpoint()
    _pump()  <------ report pipe: ACK / RESULT -- ack on every applied command
    _pump()  <------ Process.sentinel ----------- process exit
    _reap_worker(): drain pipe, join, decode exit, close the worker's fds

One selector (epoll) holds every report pipe, every sentinel and a wakeup
pipe, registered once; every blocking call of the controller is `_pump()`
with a deadline, so a dead worker wakes the controller at once and nothing
sleeps.  Only the controller closes channels, and it closes a worker's as
soon as it reaps it.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401 - registers its atexit hook before ours (see _close_at_exit)
import os
import pickle
import selectors
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from . import shutdown
from .channel import (
    ACK,
    ACK_BODY,
    PROGRESS,
    RESULT,
    START_FAILED,
    Board,
    InheritedFd,
    WorkerLink,
    pack_command,
)
from .channels import Channel, ChannelPlane
from .states import CLEAN_OUTCOMES, Event, Outcome, State, WorkerReport, WorkerStatus
from .worker import MANAGED_SIGNALS, Payload, WorkerSpec, worker_main

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

    def release(self) -> None: ...


class WorkerStartError(RuntimeError):
    """A worker could not be started, or died before it was ready."""


class _Worker:
    """The controller's record of one worker process."""

    __slots__ = (
        "id", "process", "pid", "link", "started", "state", "acked_seq",
        "result", "start_error", "signalled", "report", "progress_first", "info",
        "final_progress",
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
        self.progress_first: tuple[float, float] | None = None  # (monotonic, done)
        self.info: dict[str, Any] = {}
        self.final_progress: tuple[float | None, float | None] = (None, None)

    @property
    def alive(self) -> bool:
        return self.report is None


class _Deadline:
    """The time left of a timeout (None: no limit, also for float('inf'))."""

    def __init__(self, timeout: float | None) -> None:
        no_limit = timeout is None or timeout == float("inf")
        self.at = None if no_limit else time.monotonic() + timeout  # type: ignore[operator]

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


@contextmanager
def _signals_blocked() -> Iterator[None]:
    # Blocked while the child is created, so that no handler of ours runs in
    # it; the child resets its handlers, then unblocks (see worker.py).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ProcessController:
    """Run `target(ctx, *args, **kwargs)` in `workers` processes under control.

    Workers start PAUSED (see `initial_state`); `run()`, `pause()` and
    `stop()` broadcast to all of them.  Use it as a context manager: leaving
    the block stops what still runs and releases everything.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        workers: int,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        start_method: str | None = None,
        grace: float = 5.0,
        initial_state: State = State.PAUSED,
        on_event: Callable[[Event], None] | None = None,
        ack_timeout: float | None = ACK_TIMEOUT,
        channels: dict[str, int] | None = None,
    ) -> None:
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, not {workers!r}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0, not {grace!r}")
        initial_state = State(initial_state)
        if initial_state is State.STOPPED:
            raise ValueError("initial_state must be PAUSED or RUNNING")
        self._mp: Any = multiprocessing.get_context(start_method)  # typeshed's BaseContext lacks Process
        self.start_method: str = self._mp.get_start_method()
        self.target = target
        self.workers = workers
        self.grace = grace
        self.initial_state: State = initial_state
        self.ack_timeout = ack_timeout
        #: Escalation timeouts after the grace period; tests may shrink them.
        self.term_timeout = shutdown.TERM_TIMEOUT
        self.kill_timeout = shutdown.KILL_TIMEOUT
        self.start_timeout = START_TIMEOUT
        self._payload = Payload(target, tuple(args), dict(kwargs or {}))
        if self.start_method == "forkserver":
            _preload_in_fork_server()
        self._on_event = on_event
        self._phase = _NEW
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
        self._plane: WorkPlane | None = None
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
        if self._phase is _STARTED:
            return self
        if self._phase is _CLOSED:
            raise RuntimeError("this controller is closed; create a new one")
        self._phase = _STARTED
        self._t0 = time.monotonic()
        # The kernel's parent-death signal fires when the *thread* that forked
        # exits; only the main thread (or the fork server) lives as long as
        # the process. From other threads the pidfd watch alone guards.
        self._die_with_parent = (
            self.start_method == "forkserver" or threading.current_thread() is threading.main_thread()
        )
        self._board = Board(self.workers)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, (_WAKE, None))
        _open_controllers.add(self)
        word = pack_command(0, self.initial_state)
        try:
            for wid in range(self.workers):
                self._board.post(wid, word)
                self._spawn(wid)
            self._await_ready()
        except BaseException:
            self._abort()
            raise
        return self

    def _spawn(self, wid: int) -> None:
        assert self._board is not None and self._selector is not None
        link = WorkerLink()
        doorbell, report = link.child_fds()
        work, work_fd = self._attach_work_link(wid)
        spec = WorkerSpec(
            wid, self.workers, self._payload, InheritedFd(self._board.fd), doorbell, report, os.getpid(),
            die_with_parent=self._die_with_parent and (
                self.start_method == "forkserver" or threading.current_thread() is threading.main_thread()
            ),
            forkserver=self.start_method == "forkserver",
            work=work, channels=self._plane.wire_spec() if self._plane is not None else {},
        )
        process = self._mp.Process(target=worker_main, args=(spec,), name=f"procctl-worker-{wid}")
        try:
            with _signals_blocked():
                process.start()
        except Exception as exc:
            link.close()
            raise WorkerStartError(
                f"cannot start worker {wid} with start method {self.start_method!r}: "
                f"the target or its arguments cannot be sent to the child ({exc!r})"
            ) from exc
        finally:
            link.release_child_fds()
        worker = _Worker(wid, process, link)
        if wid < len(self._workers):
            self._workers[wid] = worker  # a new incarnation (see _respawn)
        else:
            self._workers.append(worker)
        self._live += 1
        self._selector.register(link.report_fd, selectors.EVENT_READ, (_REPORT, worker))
        self._selector.register(process.sentinel, selectors.EVENT_READ, (_SENTINEL, worker))
        if work_fd is not None:
            self._selector.register(work_fd, selectors.EVENT_READ, (_LINK, worker))

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
        if self._state is State.STOPPED:
            raise RuntimeError("the workers were stopped; STOPPED is final")
        self._board.reset(wid, pack_command(self._seq, self._state))
        self._spawn(wid)

    def _kill_worker(self, wid: int) -> None:
        """SIGKILL one live worker now; it is reported as killed."""
        w = self._workers[wid]
        if w.alive and w.pid is not None:
            w.signalled = signal.SIGKILL
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _await_ready(self) -> None:
        self._awaiting = {w.id for w in self._workers if w.acked_seq < 0 and w.alive}
        self._awaiting_seq = 0
        deadline = _Deadline(self.start_timeout)
        while self._awaiting:
            if deadline.expired:
                raise WorkerStartError(
                    f"workers {sorted(self._awaiting)} did not come up within {self.start_timeout:.0f}s"
                )
            self._pump(deadline.remaining())
        failed = [w for w in self._workers if w.report is not None and w.acked_seq < 0]
        if failed:
            w = failed[0]
            why = (w.start_error or "").strip().splitlines()
            detail = why[-1] if why else shutdown.describe_exit(w.report.exitcode if w.report else None)
            hint = ""
            if self.start_method != "fork":
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
        if self._phase is _NEW:
            self._phase = _CLOSED
            return
        try:
            self.stop()
        except KeyboardInterrupt:
            # A second Ctrl-C while stopping: do not wait any longer.
            self._abort()
            raise

    def _abort(self) -> None:
        """Kill every live worker now, reap and release."""
        self.kill()
        self._wait_ended(self.kill_timeout)
        self._release()

    def _release(self) -> None:
        for w in self._workers:
            if w.alive:
                # Survived SIGKILL (uninterruptible sleep): report and let go.
                self._finish(w, w.process.exitcode)
        if self._plane is not None:
            self._plane.release()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._board is not None:
            self._board.close()
            self._board = None
        self._phase = _CLOSED
        _open_controllers.discard(self)

    # -- commands -----------------------------------------------------------

    def broadcast(self, state: State, *, timeout: float | None = None) -> None:
        """Send `state` to every live worker; return once each acknowledged it or ended.

        Ended workers are reaped first and never waited for.  `timeout`
        (default: the controller's `ack_timeout`; pass float('inf') to wait as
        long as it takes) bounds the wait: TimeoutError names the workers that
        have not acknowledged.
        """
        state = State(state)
        self._require_started()
        if self._state is State.STOPPED and state is not State.STOPPED:
            raise RuntimeError("the workers were stopped; STOPPED is final")
        self._pump(0)
        self._post(state)
        limit = self.ack_timeout if timeout is None else timeout
        deadline = _Deadline(limit)
        while self._awaiting:
            if deadline.expired:
                raise TimeoutError(
                    f"workers {sorted(self._awaiting)} did not acknowledge {state.name} within {limit}s"
                )
            self._pump(deadline.remaining())

    def run(self, *, timeout: float | None = None) -> None:
        """Broadcast RUNNING."""
        self.broadcast(State.RUNNING, timeout=timeout)

    def pause(self, *, timeout: float | None = None) -> None:
        """Broadcast PAUSED: workers block in checkpoint() until the next command."""
        self.broadcast(State.PAUSED, timeout=timeout)

    def stop(self, grace: float | None = None) -> dict[int, WorkerReport]:
        """Broadcast STOPPED, wait up to `grace`, escalate, reap all, close all.

        Returns every worker's report, by worker id.
        """
        if self._phase is _STARTED and os.getpid() == self._owner_pid:
            grace = self.grace if grace is None else grace
            if grace < 0:
                raise ValueError(f"grace must be >= 0, not {grace!r}")
            self._pump(0)
            if self._state is not State.STOPPED:
                self._post(State.STOPPED)
            shutdown.escalate(self, grace, self.term_timeout, self.kill_timeout)
            self._release()
        elif self._phase is _NEW:
            self._phase = _CLOSED
        return dict(sorted(self._reports.items()))

    def kill(self) -> None:
        """SIGKILL every live worker now. Safe to call from a signal handler;
        the workers are reaped (as killed) by the next call that waits."""
        self.signal_live(signal.SIGKILL)

    def wakeup(self) -> None:
        """Make a blocked wait() return early. Safe from a signal handler."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _post(self, state: State) -> None:
        assert self._board is not None
        self._seq += 1
        self._state = state
        if self._plane is not None:
            self._plane.posted(state)
        word = pack_command(self._seq, state)
        self._awaiting_seq = self._seq
        self._awaiting = set()
        for w in self._workers:
            if w.alive:
                self._board.post(w.id, word)
                w.link.ring()
                self._awaiting.add(w.id)
        self._emit(Event(self._elapsed(), "broadcast", state=state.name.lower()))

    # -- waiting and reaping ------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """True once every worker has ended; False on timeout or wakeup()."""
        if self._phase is not _STARTED:
            return self._phase is _CLOSED or not self._workers
        return self._wait_ended(timeout, until_wakeup=True)

    def wait_ended(self, timeout: float | None) -> bool:
        """As wait(), but wakeup() does not cut it short."""
        return self._wait_ended(timeout)

    def _wait_ended(self, timeout: float | None, until_wakeup: bool = False) -> bool:
        if self._selector is None:
            return True
        deadline = _Deadline(timeout)
        while self._live and not deadline.expired:
            if self._pump(deadline.remaining()) and until_wakeup:
                break
        return self._live == 0

    def reap(self, timeout: float | None = 0.0) -> list[WorkerReport]:
        """Reports of workers that ended since the last reap().

        With a timeout (None: no limit), block until at least one is there.
        """
        if self._phase is _STARTED:
            self._pump(0)
            deadline = _Deadline(timeout)
            while not self._new_reports and self._live and not deadline.expired:
                if self._pump(deadline.remaining()):
                    break
        reports, self._new_reports = self._new_reports, []
        return reports

    def status(self) -> list[WorkerStatus]:
        """A snapshot of every worker, live or ended."""
        if self._phase is _STARTED:
            self._pump(0)
        return [self._status_of(w) for w in self._workers]

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

    def signal_live(self, sig: int) -> list[int]:
        """Send `sig` to every live worker; they will be reported as killed."""
        hit = []
        for w in self._workers:
            if w.alive and w.pid is not None:
                w.signalled = sig
                if sig == signal.SIGTERM and self._board is not None:
                    self._board.mark_terminate(w.id)  # read by the worker's handler
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass
                hit.append(w.id)
        return hit

    # -- the event pump -----------------------------------------------------

    def _pump(self, timeout: float | None) -> bool:
        """Wait up to `timeout` for I/O, deal with it; True if wakeup() was called."""
        assert self._selector is not None
        woken = False
        for key, _ in self._selector.select(timeout):
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
            else:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                woken = True
        return woken

    def _read_reports(self, w: _Worker) -> None:
        frames, eof = w.link.read_frames()
        for kind, payload in frames:
            if kind == ACK:
                seq, state = ACK_BODY.unpack(payload)
                self._on_ack(w, seq, State(state))
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
        w.acked_seq = seq
        if seq >= self._awaiting_seq:
            self._awaiting.discard(w.id)
        if state is not w.state or seq == 0:
            w.state = state
            if state is not State.STOPPED:
                self._worker_event(w, state.name.lower())

    def _reap_worker(self, w: _Worker) -> None:
        if not w.link.closed:
            self._read_reports(w)
        w.process.join(self.kill_timeout)
        self._finish(w, w.process.exitcode)

    def _finish(self, w: _Worker, exitcode: int | None) -> None:
        w.final_progress = self._progress_of(w)
        report = self._decode(w, exitcode)
        w.report = report
        self._live -= 1
        self._awaiting.discard(w.id)
        if not w.link.eof:
            self._unregister(w.link.report_fd)
        self._unregister(w.process.sentinel)
        w.link.close()
        if exitcode is not None:
            w.process.close()
        self._reports[w.id] = report
        self._new_reports.append(report)
        if self._plane is not None:
            self._plane.ended(w.id, report)
        log.debug("worker %d (pid %s) ended: %s, %s", w.id, w.pid, report.outcome.value,
                  shutdown.describe_exit(exitcode))
        self._worker_event(w, report.outcome.value, exitcode=exitcode,
                           error=None if report.outcome in CLEAN_OUTCOMES else report.error)

    def _decode(self, w: _Worker, exitcode: int | None) -> WorkerReport:
        """Turn what we know of an ended worker into its report."""
        now = time.time()
        if w.result is not None:
            outcome, result, error = w.result
            return WorkerReport(w.id, w.pid, Outcome(outcome), result, error, exitcode, w.started, now)
        if w.start_error is not None:
            return WorkerReport(w.id, w.pid, Outcome.FAILED, None, w.start_error, exitcode, w.started, now)
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
            now = time.monotonic()
            if w.progress_first is None:
                w.progress_first = (now, done)
            t0, d0 = w.progress_first
            if now > t0 and done > d0:
                rate = (done - d0) / (now - t0)
                if total is not None:
                    eta = max(0.0, (total - done) / rate)
        return WorkerStatus(
            w.id, w.pid, w.state if w.alive else State.STOPPED, w.alive,
            w.report.outcome if w.report else None, done, total, rate, eta, dict(w.info),
        )

    def _worker_event(self, w: _Worker, name: str, **fields: Any) -> None:
        done, total = self._progress_of(w)
        self._emit(Event(self._elapsed(), name, worker=w.id, pid=w.pid, done=done, total=total, **fields))

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event callback failed for %s", event)

    def _require_started(self) -> None:
        if self._phase is _NEW:
            raise RuntimeError("the controller is not started; call start() or use a with block")
        if self._phase is _CLOSED:
            raise RuntimeError("the controller is closed")

    def __repr__(self) -> str:
        return (f"<ProcessController {self.workers} workers, {self.start_method}, "
                f"{self._phase}, {self._live} live, state {self._state.name}>")


def _preload_in_fork_server() -> None:
    """Have the fork server import the worker side once, before it starts.

    Else, when the script only did `import procctl` (names load lazily),
    every forkserver worker would import procctl.worker after its fork: time
    at each start and private memory in each worker. Takes effect only if the
    fork server has not started yet; keeps what the user asked to preload.
    """
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver  # private, but set_forkserver_preload() only replaces the list
    modules = list(getattr(server, "_preload_modules", None) or ["__main__"])
    if "procctl.worker" not in modules:
        forkserver.set_forkserver_preload(modules + ["procctl.worker"])


_open_controllers: weakref.WeakSet[ProcessController] = weakref.WeakSet()


def _close_at_exit() -> None:
    # atexit runs hooks last-registered first: multiprocessing.util is imported
    # above, so this runs before it joins its children, and a script that
    # forgot close() does not hang on paused workers.
    for controller in list(_open_controllers):
        try:
            controller.close()
        except Exception:
            log.exception("closing %r at exit failed", controller)


atexit.register(_close_at_exit)
