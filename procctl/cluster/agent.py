"""The node agent: a long-running Dask task that runs procctl on its machine.

    Dask worker process (one node)
    ------------------------------
    Agent.serve(): commands.get(timeout) -> apply; lease and BEAT on each timeout
    local ProcessController / ProcessExecutor: worker processes, escalation,
        parent-death watch (every per-machine guarantee of procctl)
    Outbox thread: [Message, ...] -> the run's up queue

The agent holds a lease from the client: every command renews it, and when
none came for `lease` seconds (the client died or was cut off) it stops its
workers (grace, then escalation) and returns; the Dask worker stays up.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from concurrent.futures import Future as LocalFuture
from dataclasses import replace
from functools import partial
from typing import Any

from distributed import Queue, get_client, get_worker, secede

from .. import guardian
from ..controller import ProcessController
from ..executor import _Pool
from ..states import Event, State
from ..worker import context
from .session import claim, close_queue
from .wire import AgentSpec, Command, Message, Op, Up, decode, encode

log = logging.getLogger("procctl")

#: Answers kept for commands the client may send again.
KEPT_ANSWERS = 64
#: How long the agent waits for its last messages to reach the scheduler.
FLUSH_TIMEOUT = 5.0
#: The commands applied in the agent's applier thread (see Agent.slow).
SLOW = frozenset({Op.BROADCAST, Op.PAUSE, Op.RESUME, Op.STOP_SOME})
#: The grace of the stop when the lease runs out, whatever the run's: the
#: client is gone, and its workers must be gone within lease + 2 s (a local
#: worker whose manager died has as long: worker.ORPHAN_GRACE).
LEASE_GRACE = 0.5


class Outbox:
    """One thread that puts what the agent says into the up queue, in batches."""

    def __init__(self, up: Any, node: int) -> None:
        self._up = up
        self._node = node
        self._pending: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_loop, name="procctl-agent-outbox", daemon=True)
        self._thread.start()

    def say(self, kind: Up, seq: int = 0, body: Any = None) -> None:
        self._pending.put(Message(self._node, kind, seq, body))

    def close(self) -> None:
        """Send what is waiting, then end the thread."""
        self._pending.put(None)
        self._thread.join(FLUSH_TIMEOUT)

    def _send_loop(self) -> None:
        while True:
            first = self._pending.get()
            batch = [] if first is None else [first]
            last = first is None
            while not last:
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                else:
                    batch.append(more)
            if batch:
                try:
                    self._up.put([encode(msg) for msg in batch], timeout=FLUSH_TIMEOUT)  # each on its own
                except Exception as exc:  # noqa: BLE001 - the client side is gone: the lease ends us
                    log.debug("agent %d: up queue put failed: %r", self._node, exc)
            if last:
                return


class Agent:
    """What every agent does: listen, answer once per sequence number, keep the lease."""

    def __init__(self, spec: AgentSpec) -> None:
        client = get_client()
        self.up = Queue(spec.up, client=client)
        self._setup(spec, Queue(spec.commands, client=client), Outbox(self.up, spec.node))

    def _setup(self, spec: Any, commands: Any, outbox: Any) -> None:
        """Everything but the Dask objects (a test's agent has none)."""
        self.spec = spec
        self.commands = commands
        self.outbox = outbox
        self.answers: OrderedDict[int, Any] = OrderedDict()
        #: The sequence numbers applied: a command is applied once, whatever
        #: order the client's threads' puts reach the queue in.
        self.seen: set[int] = set()
        self.done = False
        self.gone_why: str | None = None
        self.heard = time.monotonic()
        self.stopping = threading.Event()
        self.expired = threading.Event()
        self.expire_lock = threading.Lock()
        self.answer_lock = threading.Lock()
        self.stopper: threading.Thread | None = None
        # Commands that wait on the workers (a pause waits for each to reach a
        # checkpoint) are applied by this thread, in order, so that the loop
        # in serve() goes on reading: its reads renew the lease, and a KILL
        # or STOP must get through a pause that is still waiting.
        self.slow: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self.applier = threading.Thread(target=self._apply_slow, name="procctl-agent-apply", daemon=True)

    def serve(self) -> None:
        """Apply commands until STOP, or until the lease runs out.

        The wait for a command has no timeout of its own (a timed-out get is an
        error in the scheduler's log): the watchdog thread keeps the time.
        """
        self.heard = time.monotonic()
        watchdog = threading.Thread(target=self._watch_lease, name="procctl-agent-lease", daemon=True)
        watchdog.start()
        self.applier.start()
        try:
            while not self.done and not self.expired.is_set():
                try:
                    cmd = decode(self.commands.get())
                except Exception as exc:  # noqa: BLE001 - our worker's link to the scheduler is gone
                    self.gone_why = f"command queue failed: {exc!r:.120}"
                    self._expire()
                    return
                self.heard = time.monotonic()
                if not isinstance(cmd, Command) or cmd.op in (Op.LEASE, Op.EXPIRED):
                    continue
                if cmd.seq in self.seen:
                    with self.answer_lock:
                        if cmd.seq in self.answers:  # its answer was lost: say it again
                            self.outbox.say(Up.ACK, cmd.seq, self.answers[cmd.seq])
                    continue
                # (Not a high-water mark: a command put by one thread of the client can
                # overtake one with a lower number put by another, and must not drop it.)
                self.seen.add(cmd.seq)
                if cmd.op is Op.STOP and self.stopper is None:
                    # A stop lasts up to its grace and the escalation: in its own thread,
                    # so that a KILL (a second Ctrl-C) and the lease renewals still come through.
                    self.stopper = threading.Thread(target=self._stop, args=(cmd,), name="procctl-agent-stop",
                                                    daemon=True)
                    self.stopper.start()
                    continue
                if cmd.op in SLOW:
                    self.slow.put(cmd)
                else:
                    self._answer(cmd)
        finally:
            self.stopping.set()
            self.slow.put(None)
            if self.stopper is not None:
                self.stopper.join()  # its answer goes out before the agent's GONE
            # Stopped workers acknowledge nothing: a pause still waiting returns.
            self.applier.join(FLUSH_TIMEOUT)
            watchdog.join(FLUSH_TIMEOUT)

    def _apply_slow(self) -> None:
        while (cmd := self.slow.get()) is not None:
            self._answer(cmd)

    def _answer(self, cmd: Command) -> None:
        try:
            answer = self.apply(cmd)
        except Exception as exc:  # noqa: BLE001 - the client raises it
            answer = ("error", f"{type(exc).__name__}: {exc}")
        with self.answer_lock:
            self.answers[cmd.seq] = answer
            while len(self.answers) > KEPT_ANSWERS:
                self.answers.popitem(last=False)
        self.outbox.say(Up.ACK, cmd.seq, answer)

    def _stop(self, cmd: Command) -> None:
        try:
            self._answer(cmd)
        finally:
            self.done = True
            self.wake_serve()

    def _watch_lease(self) -> None:
        while not self.stopping.wait(self.spec.beat):
            self.outbox.say(Up.BEAT)
            if time.monotonic() - self.heard > self.spec.lease:
                self.gone_why = f"lease of {self.spec.lease}s expired: the client is gone"
                log.warning("procctl agent on node %d: %s; stopping its workers", self.spec.node, self.gone_why)
                self._expire()
                self.wake_serve()
                return

    def wake_serve(self) -> None:
        """Wake serve()'s get, so that it sees the agent is done (if the scheduler
        still answers: cut off, the get fails all the same, and the workers are stopped)."""
        try:
            self.commands.put(encode(Command(0, Op.EXPIRED)), timeout=FLUSH_TIMEOUT)
        except Exception:  # noqa: BLE001 - see above
            pass

    def _expire(self) -> None:
        with self.expire_lock:
            if not self.expired.is_set():
                self.expired.set()
                self.lease_lost()

    def finish(self) -> None:
        self.outbox.say(Up.GONE, body=self.gone_why)
        self.outbox.close()
        for q in (self.commands, self.up):
            close_queue(q)

    def apply(self, cmd: Command) -> Any:
        raise NotImplementedError

    def lease_lost(self) -> None:
        """The client is gone: end the workers within LEASE_GRACE (at once if a
        stop with the client's own grace is under way)."""
        local = self.local()
        if local is None:
            return
        if self.stopper is not None:
            local.kill()
        else:
            local.stop(grace=LEASE_GRACE)

    def local(self) -> ProcessController | _Pool | None:
        """The node's own controller or pool, once started."""
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _allow_children() -> None:
    # A Dask worker process is daemonic by default, and multiprocessing
    # refuses children to a daemon; procctl's own guarantees (parent-death
    # watch, escalation) take the daemon flag's place for our workers.
    me = multiprocessing.current_process()
    if me.daemon:
        me.daemon = False


class ControllerAgent(Agent):
    def __init__(self, spec: AgentSpec, pc_args: dict[str, Any]) -> None:
        super().__init__(spec)
        self.pc_args = pc_args
        self.pc: ProcessController | None = None
        self.watcher: threading.Thread | None = None
        # What happens during start() (a worker that ends at once) is held
        # until HELLO has told the client which workers there are: a report
        # of a worker it does not know yet would be dropped.
        self._early: list[tuple[Up, Any]] | None = []
        self._early_lock = threading.Lock()

    def start(self) -> None:
        # Made here, not in __init__: its errors (a bad argument) go to the client in GONE.
        self.pc = ProcessController(on_event=self._on_event, **self.pc_args)
        workers = self.pc.workers
        self.pc._context_ids = (self.spec.node * workers, self.spec.nodes * workers)  # the global ids
        self.pc.start()
        pids = [s.pid for s in self.pc.status()]  # (may pump: events land in _early)
        with self._early_lock:
            self.outbox.say(Up.HELLO, body=pids)
            early, self._early = self._early or [], None
            for kind, body in early:
                self.outbox.say(kind, body=body)
        # One thread pumps the controller, so that ends are seen as they happen.
        self.watcher = threading.Thread(target=self.pc.wait_ended, args=(None,),
                                        name="procctl-agent-watch", daemon=True)
        self.watcher.start()

    def _on_event(self, event: Event) -> None:
        if event.event == "broadcast":
            return  # the client says its own
        said = [(Up.EVENT, (time.time(), event))]
        if self.pc is not None and event.worker is not None and event.event in (
                "finished", "stopped", "failed", "crashed", "killed"):
            report = self.pc.reports.get(event.worker)
            if report is not None:
                said.append((Up.REPORT, _picklable_report(report)))
        with self._early_lock:
            if self._early is not None:
                self._early.extend(said)
                return
        for kind, body in said:
            self.outbox.say(kind, body=body)

    def apply(self, cmd: Command) -> Any:
        assert self.pc is not None
        if cmd.op is Op.BROADCAST:
            state, timeout, ids = cmd.arg
            try:
                self.pc.broadcast(State(state), timeout=timeout, workers=ids)
            except TimeoutError:
                return ("timeout", [s.worker_id for s in self.pc.status()
                                    if s.alive and (ids is None or s.worker_id in ids)])
            return None
        if cmd.op is Op.STOP_SOME:
            grace, ids = cmd.arg
            reports = self.pc.stop(grace, workers=ids)
            return {wid: _picklable_report(r) for wid, r in reports.items()}
        if cmd.op is Op.SIGNAL:
            return self.pc.signal_live(cmd.arg)
        if cmd.op is Op.STATUS:
            return self.pc.status()
        if cmd.op is Op.KILL:
            self.pc.kill()
            self.pc.wakeup()
            return None
        if cmd.op is Op.STOP:
            self.outbox.say(Up.ACK, cmd.seq, ("accepted", None))
            reports = self.pc.stop(grace=cmd.arg)
            self.done = True
            return {wid: _picklable_report(r) for wid, r in reports.items()}
        raise ValueError(f"unknown command {cmd.op}")

    def local(self) -> ProcessController | None:
        return self.pc

    def close(self) -> None:
        if self.pc is not None:
            self.pc.close()
        if self.watcher is not None:
            self.watcher.join(FLUSH_TIMEOUT)


def _picklable_report(report: Any) -> Any:
    try:
        pickle.dumps(report.result)
    except Exception as exc:  # noqa: BLE001 - a result that cannot cross to the client

        return replace(report, result=None, error=(report.error or "") + f"result not sent: {exc!r:.200}")
    return report


def run_controller_agent(spec: AgentSpec, pc_args: dict[str, Any]) -> str:
    """The Dask task of one node of a ClusterController."""
    return _run_agent(spec, lambda: ControllerAgent(spec, pc_args))


def _run_agent(spec: AgentSpec, make: Callable[[], Agent]) -> str:
    """What every agent's Dask task does: claim, start, serve until the end, clean up."""
    secede()  # a long-running task: it does not hold one of the worker's task slots
    if not claim(spec.claim):
        return "already ran"
    _allow_children()
    agent = make()
    try:
        try:
            agent.start()
        except Exception as exc:  # noqa: BLE001 - told to the client (GONE), which raises it
            agent.gone_why = f"{type(exc).__name__}: {exc}"
            return agent.gone_why
        agent.serve()
    finally:
        agent.close()
        # The Dask worker lives on after the run: nothing procctl started may (the
        # guardian of its controllers), unless another run's agent still uses it.
        guardian.release_if_unused()
        agent.finish()
    return agent.gone_why or "stopped"


# -- the executor's agent --------------------------------------------------------------


def run_task(tid: int, blob: bytes) -> Any:
    """Run in a local worker: one task (or a map chunk) of the ClusterExecutor.
    Returns (the worker's global id, the outcome); an exception carries the id
    as `worker_id` (the client's task events name the worker, as locally)."""
    wid = context().worker_id
    fn, calls, chunk = pickle.loads(blob)
    try:
        if chunk:
            return wid, [fn(*args, **kwargs) for args, kwargs in calls]
        args, kwargs = calls[0]
        return wid, fn(*args, **kwargs)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            exc.worker_id = wid  # type: ignore[attr-defined]
        raise


class ExecutorAgent(Agent):
    def __init__(self, spec: AgentSpec, ex_args: dict[str, Any]) -> None:
        super().__init__(spec)
        self.ex_args = ex_args
        self.ex: _Pool | None = None
        self.futures: dict[int, LocalFuture[Any]] = {}  # by tid, until done
        self._breaking = threading.Lock()

    def start(self) -> None:
        # The pool itself (ProcessExecutor's inside): its workers' ids and
        # its errors name the run's global worker ids and this node.
        per_node = self.ex_args["max_workers"]
        place = (self.spec.node * per_node, self.spec.nodes * per_node, get_worker().address)
        self.ex = _Pool(**self.ex_args, place=place, on_event=self._on_pool_event)
        self.outbox.say(Up.HELLO, body=[s.pid for s in self.ex.status()])

    def _on_pool_event(self, event: Event) -> None:
        """Tell the client what its own results cannot: the workers' events, and a
        retry here (after a crash or a timeout); it tells a task's end itself."""
        if event.event == "broadcast" or (event.event.startswith("task-") and event.event != "task-retry"):
            return
        self.outbox.say(Up.EVENT, body=(time.time(), replace(event, task=None)))  # (its task id is the pool's)

    def apply(self, cmd: Command) -> Any:
        assert self.ex is not None
        if cmd.op is Op.TASKS:
            for tid, blob, items in cmd.arg:
                # Counted as the items it carries (a map chunk): status() counts items, as locally.
                try:
                    fut = self.ex.submit_counted(items, run_task, tid, blob)
                except BrokenExecutor as exc:
                    self._pool_broken(exc)  # this task and the rest never ran: the client deals them again
                    return None
                self.futures[tid] = fut
                fut.add_done_callback(partial(self._done, tid))
            return None
        if cmd.op is Op.CANCEL:  # those not sent to a worker yet, as shutdown(cancel_futures=True) does
            return [tid for tid, fut in list(self.futures.items()) if fut.cancel()]
        if cmd.op is Op.GIVE_BACK:  # tasks are slow: the client deals them again, from its own queue
            keep = cmd.arg
            unfinished = [(tid, fut) for tid, fut in list(self.futures.items()) if not fut.done()]
            back: list[int] = []
            for tid, fut in reversed(unfinished):
                if len(unfinished) - len(back) <= keep:
                    break
                if fut.cancel():
                    back.append(tid)
            return sorted(back)
        if cmd.op in (Op.PAUSE, Op.RESUME):
            try:
                (self.ex.pause if cmd.op is Op.PAUSE else self.ex.resume)(cmd.arg)
            except TimeoutError:
                return ("timeout", None)
            return None
        if cmd.op is Op.STATUS:
            return self.ex.status()
        if cmd.op is Op.KILL:
            self.ex.kill()
            return None
        if cmd.op is Op.STOP:
            self.outbox.say(Up.ACK, cmd.seq, ("accepted", None))
            left = self.ex.stop(grace=cmd.arg)
            self.done = True
            # (a chunk's tid once, however many items it was counted as)
            return (list(dict.fromkeys(item[0] for item in left.items)),
                    list(dict.fromkeys(item[0] for item in left.running)))
        raise ValueError(f"unknown command {cmd.op}")

    def _done(self, tid: int, fut: LocalFuture[Any]) -> None:
        self.futures.pop(tid, None)
        if fut.cancelled():
            return  # stop() hands it back as unfinished
        exc = fut.exception()
        if isinstance(exc, BrokenExecutor):
            self._pool_broken(exc)  # the task did not run here: the client deals it to another node
            return
        if exc is None:
            wid, value = fut.result()
            try:
                pickle.dumps(value)
            except Exception as err:  # noqa: BLE001 - the future fails with it instead
                self.outbox.say(Up.RESULT, body=(tid, False, _portable(err), None, wid))
                return
            self.outbox.say(Up.RESULT, body=(tid, True, value, None, wid))
        else:
            cause = exc.__cause__
            tb = getattr(cause, "tb", None) or "".join(traceback.format_exception(exc))
            wid = getattr(exc, "worker_id", None)
            self.outbox.say(Up.RESULT, body=(tid, False, _portable(exc), tb, wid if isinstance(wid, int) else None))

    def _pool_broken(self, exc: BaseException) -> None:
        """The node's pool is broken (its initializer fails, its workers die as
        they start): the agent ends, saying why, and the client deals what it
        held here to the other nodes; with none left, the executor is broken
        (its futures fail, a submit raises), as a local one is."""
        with self._breaking:
            if self.done or self.gone_why is not None:
                return
            self.gone_why = f"its pool is broken: {exc}"
            self.done = True
        self.wake_serve()

    def local(self) -> _Pool | None:
        return self.ex

    def close(self) -> None:
        if self.ex is not None:
            self.ex.stop()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles, else a RuntimeError that tells it."""
    try:
        pickle.loads(pickle.dumps(exc))
        exc.__cause__ = None
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_executor_agent(spec: AgentSpec, ex_args: dict[str, Any]) -> str:
    """The Dask task of one node of a ClusterExecutor."""
    return _run_agent(spec, lambda: ExecutorAgent(spec, ex_args))
