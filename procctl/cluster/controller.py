"""ClusterController: ProcessController's API over every node of a Dask cluster.

Each node (Dask worker) runs one agent (agent.py) with a local
ProcessController of `workers_per_node` workers; this side only talks to
the agents (session.py).  Worker ids are global: node order (as the
scheduler lists its workers), then local id: node i's local worker j is
``i * workers_per_node + j``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from .. import shutdown
from ..controller import (
    ACK_TIMEOUT,
    Shortcuts,
    WorkerStartError,
    check_signal,
    check_start_method,
    check_state,
    check_worker_id,
    check_worker_ids,
)
from ..states import CLEAN_OUTCOMES, Event, Outcome, State, WorkerReport, WorkerStatus
from ..workwire import check_timeout
from .agent import run_controller_agent
from .session import (
    CONNECT_TIMEOUT,
    SLACK,
    START_TIMEOUT,
    Node,
    Session,
    check_answer,
    check_workers_per_node,
    connect,
    wait_for,
)
from .wire import AgentSpec, Message, Op, Up

__all__ = ["ClusterController", "connect"]

log = logging.getLogger("procctl")

_NEW, _STARTED, _CLOSED = "new", "started", "closed"


class _Remote:
    """The client's record of one worker on a node."""

    __slots__ = ("id", "node", "local", "pid", "report", "state")

    def __init__(self, gid: int, node: Node, local: int, pid: int | None, state: State) -> None:
        self.id = gid
        self.node = node
        self.local = local
        self.pid = pid
        self.report: WorkerReport | None = None
        self.state = state


class ClusterController(Shortcuts, Session):
    """Run `target(ctx, *args, **kwargs)` in `workers_per_node` processes on every
    node of a Dask cluster, under one controller with ProcessController's API.

    `address` is the scheduler's (``tcp://HOST:PORT``); or give `cluster`, a
    ``distributed.LocalCluster`` or any object with ``scheduler_address``.
    Each node's agent holds a lease of `lease` seconds: a client that dies or
    is cut off that long leaves no worker running on any node.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        workers_per_node: int = 4,
        *,
        address: str | None = None,
        cluster: Any = None,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        lease: float = 10.0,
        grace: float = 5.0,
        initial_state: State = State.PAUSED,
        on_event: Callable[[Event], None] | None = None,
        ack_timeout: float | None = ACK_TIMEOUT,
        start_method: str | None = "fork",
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        check_workers_per_node(workers_per_node)
        check_start_method(start_method)  # (the nodes check it too, but only once connected)
        if isinstance(args, (str, bytes)) or not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple or list of arguments, not {type(args).__name__}")
        if kwargs is not None and not (isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)):
            raise TypeError(f"kwargs must be a mapping of str to values, not {kwargs!r:.80}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, not {type(on_event).__name__}")
        grace_s = check_timeout("grace", grace, allow_none=False)
        assert grace_s is not None
        self.ack_timeout = check_timeout("ack_timeout", ack_timeout, positive=True)
        initial_state = check_state("initial_state", initial_state)
        if initial_state is State.STOPPED:
            raise ValueError("initial_state must be PAUSED or RUNNING")
        super().__init__(address, cluster, lease, connect_timeout)
        self.target = target
        self.workers_per_node = workers_per_node
        self.grace = grace_s
        self.initial_state = initial_state
        self.start_timeout = START_TIMEOUT
        self._pc_args: dict[str, Any] = {
            "target": target, "workers": workers_per_node, "args": tuple(args), "kwargs": dict(kwargs or {}),
            "start_method": start_method, "grace": grace_s, "initial_state": initial_state,
            "ack_timeout": self.ack_timeout,
        }
        self._on_event = on_event
        self._phase = _NEW
        self._state: State = initial_state
        self._workers: dict[int, _Remote] = {}
        self._reports: dict[int, WorkerReport] = {}
        self._new_reports: list[WorkerReport] = []
        self._woken = False
        self._ops = threading.RLock()  # one command at a time

    # -- the session's hooks -------------------------------------------------------------

    def agent_call(self, spec: AgentSpec) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return run_controller_agent, (self._pc_args,)

    def on_message(self, node: Node, msg: Message) -> None:
        if msg.kind is Up.HELLO:
            for local, pid in enumerate(msg.body):
                gid = self._gid(node, local)
                self._workers[gid] = _Remote(gid, node, local, pid, self.initial_state)
        elif msg.kind is Up.EVENT:
            wall, event = msg.body
            wid: int | None = None if event.worker is None else self._gid(node, event.worker)
            if wid is not None and wid in self._workers and event.event in ("running", "paused"):
                self._workers[wid].state = State.RUNNING if event.event == "running" else State.PAUSED
            self._events.append(replace(event, t=self.t_of(wall), worker=wid, node=node.address))
        elif msg.kind is Up.REPORT:
            self._take_report(node, msg.body)
        elif msg.kind is Up.ACK and isinstance(msg.body, dict):  # a stop's reports
            for report in msg.body.values():
                self._take_report(node, report)

    def on_lost(self, node: Node, why: str) -> None:
        now = time.time()
        for w in self._workers.values():
            if w.node is node and w.report is None:
                report = WorkerReport(w.id, w.pid, Outcome.CRASHED, None, f"node {node.address} was lost: {why}",
                                      None, self._wall0, now, node=node.address)
                self._record(w, report)
                self._events.append(Event(self.elapsed(), "crashed", worker=w.id, pid=w.pid,
                                          error=report.error, node=node.address))

    def after_pass(self) -> None:
        self._emit_events()

    def _gid(self, node: Node, local: int) -> int:
        return node.index * self.workers_per_node + local

    def _take_report(self, node: Node, report: WorkerReport) -> None:
        w = self._workers.get(self._gid(node, report.worker_id))
        if w is not None and w.report is None:
            self._record(w, replace(report, worker_id=w.id, node=node.address))

    def _record(self, w: _Remote, report: WorkerReport) -> None:
        w.report = report
        self._reports[w.id] = report
        self._new_reports.append(report)

    # -- context manager and lifecycle ------------------------------------------------

    def __enter__(self) -> ClusterController:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def workers(self) -> int:
        """How many workers in all (known once started)."""
        return len(self._workers) if self._workers else self.workers_per_node * max(1, len(self.nodes))

    def start(self) -> ClusterController:
        """Connect, start every node's workers, return once each is up.

        ConnectionError when the scheduler cannot be reached within
        `connect_timeout`; WorkerStartError when a node cannot start its workers.
        """
        with self._ops:
            if self._phase is _STARTED:
                return self
            if self._phase is _CLOSED:
                raise RuntimeError("this controller is closed; create a new one")
            self._phase = _STARTED
            try:
                self.open(self.grace, self.start_timeout)
                with self.cond:
                    failed = self.agent_error()
                    if failed is not None:
                        raise WorkerStartError(failed)
            except BaseException:
                self._abort()
                raise
            return self

    def _abort(self) -> None:
        try:
            if self.nodes:
                self.ask_all(Op.STOP, 0.0, SLACK)
        finally:
            self.release()
            self._phase = _CLOSED

    def close(self) -> None:
        """Stop what still runs on every node, release everything. Idempotent."""
        if self._phase is _CLOSED:
            return
        if self._phase is _NEW:
            self._phase = _CLOSED
            return
        self.stop()

    # -- commands ---------------------------------------------------------------------------

    def broadcast(self, state: State, *, timeout: float | None = None,
                  workers: Iterable[int] | None = None) -> None:
        """Send `state` to every live worker on every node; return once each
        acknowledged it or ended. TimeoutError names the workers that did not.
        `workers` (global ids) sends it to those only; STOPPED to some
        workers is `stop(workers=...)`."""
        state = check_state("state", state)
        timeout = check_timeout("timeout", timeout)
        try:
            with self._ops:
                late, limit = self._broadcast(state, timeout, workers)
        finally:
            # Told once the lock is let go: an on_event callback may call any method.
            self._emit_events()
        if late:
            raise TimeoutError(f"workers {sorted(late)} did not acknowledge {state.name} within {limit}s")

    def _broadcast(self, state: State, timeout: float | None,
                   workers: Iterable[int] | None) -> tuple[list[int], float | None]:
        """broadcast(), holding the lock: the workers that did not acknowledge, and the limit."""
        self._require_started()
        ids = None if workers is None else self._check_ids(workers)
        if ids is not None and state is State.STOPPED:
            self._stop_some(ids, self.grace)
            return [], None
        if self._state is State.STOPPED and state is not State.STOPPED:
            raise RuntimeError("the workers were stopped; STOPPED is final")
        limit = self.ack_timeout if timeout is None else timeout
        only = None if ids is None else {
            node: (state.value, limit, local) for node, local in self._by_node(ids).items()}
        if ids is None:
            self._state = state
            with self.cond:
                self._events.append(Event(self.elapsed(), "broadcast", state=state.name.lower()))
            self._emit_events(block=False)
        wait = None if limit is None or math.isinf(limit) else limit + SLACK
        answers = self.ask_all(Op.BROADCAST, (state.value, limit, None), wait, only)
        late: list[int] = []
        with self.cond:
            for node in self.nodes:
                if only is not None and node.index not in only:
                    continue
                if node.index in answers:
                    answer = check_answer(node, answers[node.index])
                    if isinstance(answer, tuple) and answer[0] == "timeout":
                        late.extend(self._gid(node, local) for local in answer[1])
                elif not node.ended and node.lost is None:
                    late.extend(w.id for w in self._workers.values() if w.node is node and w.report is None
                                and (ids is None or w.id in ids))
        return late, limit

    def stop(self, grace: float | None = None, *,
             workers: Iterable[int] | None = None) -> dict[int, WorkerReport]:
        """Broadcast STOPPED, wait up to `grace`, escalate (on each node), reap all,
        close all; every worker's report by global worker id. With `workers`
        (global ids), stop only those and return their reports; the run goes on."""
        grace_s = self.grace if grace is None else check_timeout("grace", grace, allow_none=False)
        assert grace_s is not None
        if workers is not None:
            try:
                with self._ops:
                    self._require_started()
                    return self._stop_some(self._check_ids(workers), grace_s)
            finally:
                self._emit_events()
        mine = False  # this call ends the run (another one, at the same time, only waits for it)
        try:
            with self._ops:
                if self._phase is _NEW:
                    self._phase = _CLOSED
                if self._phase is _CLOSED:
                    return self.reports
                mine = True
                try:
                    if self._state is not State.STOPPED:
                        self._state = State.STOPPED
                        with self.cond:
                            self._events.append(Event(self.elapsed(), "broadcast", state="stopped"))
                        self._emit_events(block=False)
                    bound = grace_s + shutdown.TERM_TIMEOUT + shutdown.KILL_TIMEOUT + SLACK
                    self.ask_all(Op.STOP, grace_s, bound)
                    with self.cond:
                        for node in self.nodes:
                            if not any(w.node is node and w.report is None for w in self._workers.values()):
                                continue
                            self._lose(node, f"it did not answer the stop within {bound:.0f}s")
                            node.ended = True
                finally:
                    self._phase = _CLOSED  # no other command reaches the nodes now
        finally:
            if mine:
                # With the lock let go: a callback (in the thread release() waits for) may call any method.
                self.release()
            self._emit_events()
        return self.reports

    def _stop_some(self, ids: list[int], grace: float) -> dict[int, WorkerReport]:
        """stop(workers=ids): each node stops its own, each worker escalated on its own."""
        only = {node: (grace, local) for node, local in self._by_node(ids).items()}
        bound = grace + shutdown.TERM_TIMEOUT + shutdown.KILL_TIMEOUT + SLACK
        answers = self.ask_all(Op.STOP_SOME, None, bound, only)
        with self.cond:
            for index, answer in answers.items():
                for report in check_answer(self.nodes[index], answer).values():
                    self._take_report(self.nodes[index], report)
            out = {wid: self._reports[wid] for wid in ids if wid in self._reports}
        self._emit_events(block=False)  # (the caller holds the lock: it tells the rest once it has let go)
        return out

    def _by_node(self, ids: list[int]) -> dict[int, list[int]]:
        """Global ids -> {node index: local ids}, for the live nodes."""
        out: dict[int, list[int]] = {}
        with self.cond:
            for wid in ids:
                w = self._workers[wid]
                if not w.node.ended and w.node.lost is None:
                    out.setdefault(w.node.index, []).append(w.local)
        return out

    def _check_ids(self, workers: Iterable[int]) -> list[int]:
        return check_worker_ids(workers, len(self._workers))

    def signal_live(self, sig: int) -> list[int]:
        """Send `sig` to every live worker on every node (they will be reported
        as killed); the ids of the workers signalled."""
        check_signal(sig)
        with self._ops:
            self._require_started()
            answers = self.ask_all(Op.SIGNAL, sig, self.lease + SLACK)
        return sorted(self._gid(self.nodes[index], local)
                      for index, answer in answers.items() if isinstance(answer, list) for local in answer)

    def kill(self) -> None:
        """SIGKILL every live worker on every node (sent by the inbox thread within
        a tick). Safe from a signal handler."""
        self.request_kill()
        self.wakeup()

    def wakeup(self) -> None:
        """Make a blocked wait() or reap() return early. Safe from a signal handler."""
        self._woken = True
        self.notify_soon()

    # -- waiting and reaping --------------------------------------------------------------

    def _live(self) -> int:
        return sum(1 for w in self._workers.values() if w.report is None)

    def wait(self, timeout: float | None = None) -> bool:
        """True once every worker on every node has ended; False on timeout or wakeup()."""
        timeout = check_timeout("timeout", timeout)
        if self._phase is _NEW:
            raise RuntimeError("the controller is not started; call start() or use a with block")
        self._woken = False
        return self._wait_ended(timeout, lambda: self._woken)

    def wait_ended(self, timeout: float | None) -> bool:
        """As wait(), but wakeup() does not cut it short."""
        timeout = check_timeout("timeout", timeout)
        if self._phase is _NEW:
            raise RuntimeError("the controller is not started; call start() or use a with block")
        return self._wait_ended(timeout, lambda: False)

    def _wait_ended(self, timeout: float | None, woken: Callable[[], bool]) -> bool:
        if self._phase is _CLOSED:
            return True
        with self.cond:
            wait_for(self.cond, lambda: self._live() == 0 or woken(), timeout)
            done = self._live() == 0
        self._emit_events()
        return done

    @property
    def gave_up(self) -> bool:
        """Always False: a cluster run restarts no worker (a lost node's are reported crashed)."""
        return False

    def history(self, worker_id: int) -> list[WorkerReport]:
        """The report of every ended incarnation of worker `worker_id`: on a
        cluster, which restarts none, its report once it ended."""
        with self.cond:
            check_worker_id(worker_id, len(self._workers))
            report = self._reports.get(worker_id)
        return [] if report is None else [report]

    def reap(self, timeout: float | None = 0.0) -> list[WorkerReport]:
        """Reports of workers that ended since the last reap(); with a timeout
        (None: no limit), block until at least one is there."""
        timeout = check_timeout("timeout", timeout)
        self._woken = False
        with self.cond:
            if self._phase is _STARTED:
                wait_for(self.cond, lambda: bool(self._new_reports) or self._live() == 0 or self._woken, timeout)
            reports, self._new_reports = self._new_reports, []
        self._emit_events()
        return reports

    def status(self) -> list[WorkerStatus]:
        """A snapshot of every worker, live or ended, with its node."""
        with self._ops:
            answers: dict[int, Any] = {}
            if self._phase is _STARTED:
                answers = self.ask_all(Op.STATUS, None, self.lease + SLACK)
            out = []
            with self.cond:
                for w in sorted(self._workers.values(), key=lambda w: w.id):
                    got = answers.get(w.node.index)
                    live = None
                    if isinstance(got, list) and w.local < len(got):
                        live = got[w.local]
                    if w.report is None and live is not None:
                        out.append(replace(live, worker_id=w.id, node=w.node.address))
                    else:
                        out.append(WorkerStatus(
                            w.id, w.pid, State.STOPPED if w.report else w.state, w.report is None,
                            w.report.outcome if w.report else None, node=w.node.address))
            return out

    @property
    def reports(self) -> dict[int, WorkerReport]:
        """Reports of the workers that have ended, by global worker id."""
        with self.cond:
            return dict(sorted(self._reports.items()))

    @property
    def state(self) -> State:
        """The state last broadcast."""
        return self._state

    def pids(self) -> list[int]:
        """Process ids of the live workers, in worker id order (each on its
        node's machine: `status()` says which)."""
        with self.cond:
            return [w.pid for w in sorted(self._workers.values(), key=lambda w: w.id)
                    if w.report is None and w.pid is not None]

    def _require_started(self) -> None:
        if self._phase is _NEW:
            raise RuntimeError("the controller is not started; call start() or use a with block")
        if self._phase is _CLOSED:
            raise RuntimeError("the controller is closed")

    def __repr__(self) -> str:
        return (f"<ClusterController {len(self.nodes)} nodes x {self.workers_per_node} "
                f"{self._phase} {self._state.name}>")


def clean(report: WorkerReport) -> bool:
    return report.outcome in CLEAN_OUTCOMES

