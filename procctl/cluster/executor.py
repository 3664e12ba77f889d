"""ClusterExecutor: ProcessExecutor's API over every node of a Dask cluster.

    caller threads              client (this module)                  node agents (agent.py)
    submit()/map() -> pending   dispatch(): each task to the least     local ProcessExecutor
                                loaded node (at most WINDOW_PER_WORKER (crash costs one task,
                                per worker), one TASKS put a node ---> retries, task_timeout)
    Future <- settle() -------  inbox: RESULT (tid, ok, value)  <----
                                node lost: its tasks go back in line (counted as retries)

The client knows which tasks each node holds. A task's future completes once,
from the one RESULT that names it; `stop()` collects from every node the
tasks it did not complete and hands back each submitted item that did not
complete exactly once, in submission order.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures import wait as wait_futures
from dataclasses import replace
from typing import Any

import cloudpickle

from .. import shutdown, threads
from ..controller import check_start_method
from ..errors import RemoteTraceback, TaskTimeout, WorkerCrashed
from ..executor import (
    MAX_AUTO_CHUNK,
    PoolFront,
    TaskCounts,
    Unfinished,
    _item_of,
    _TaskFuture,
    check_initializer,
    check_task_timeout,
    map_deadline,
)
from ..states import Event, Outcome, State, WorkerStatus
from ..workwire import MAX_WAIT, check_count, check_timeout
from .agent import run_executor_agent
from .session import CONNECT_TIMEOUT, SLACK, Node, Session, check_answer, check_workers_per_node
from .wire import AgentSpec, Message, Op, Up

log = logging.getLogger("procctl")

#: Tasks a node holds per local worker while tasks are quick: enough that its
#: workers never wait for a round trip through the scheduler, few enough to
#: keep pause and stop fine.
WINDOW_PER_WORKER = 8
#: A task a node has held this long (seconds) unanswered says tasks are slow
#: there: the node keeps what it runs and one more (ProcessPoolExecutor's
#: call queue holds as many), and gives back the rest, which were waiting
#: there: pending again here, and cancellable, as in ProcessPoolExecutor.
SLOW_AT_NODE = 0.1
#: A task answered this soon after it was sent says tasks are quick (again):
#: the node's window doubles, up to WINDOW_PER_WORKER per worker.
QUICK_AT_NODE = 0.05


class _Task:
    __slots__ = ("tid", "future", "blob", "items", "node", "retries", "answered", "sent")

    def __init__(self, tid: int, future: _TaskFuture, blob: bytes, items: list[Any]) -> None:
        self.tid = tid
        self.future = future
        self.blob = blob
        self.items = items
        self.node: int | None = None
        self.retries = 0
        self.answered = False
        self.sent = 0.0  # monotonic time it was sent to its node


class _ClusterPool(Session):
    """What a ClusterExecutor does; its threads hold this, never the ClusterExecutor,
    so that a ClusterExecutor dropped without shutdown() is collected (and shuts down)."""

    def __init__(
        self,
        address: str | None = None,
        workers_per_node: int = 4,
        *,
        cluster: Any = None,
        lease: float = 10.0,
        retries: int = 0,
        task_timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        grace: float = 5.0,
        start_method: str | None = "fork",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        check_count("workers_per_node", workers_per_node, 1, "a positive integer")  # (a TypeError, as max_workers')
        check_workers_per_node(workers_per_node)
        check_count("retries", retries, 0, "an integer >= 0")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, not {type(on_event).__name__}")
        grace_s = check_timeout("grace", grace, allow_none=False)
        assert grace_s is not None
        # The nodes' ProcessExecutors check them all the same, but only once connected.
        task_timeout = check_task_timeout(task_timeout)
        initargs = check_initializer(initializer, initargs)
        check_start_method(start_method)
        super().__init__(address, cluster, lease, connect_timeout)
        self.workers_per_node = workers_per_node
        self.grace = grace_s
        self.retries = retries
        self.task_timeout = task_timeout
        self._ex_args: dict[str, Any] = {
            "max_workers": workers_per_node, "start_method": start_method, "retries": retries,
            "task_timeout": task_timeout, "grace": grace_s, "initializer": initializer,
            "initargs": tuple(initargs),
        }
        self._on_event = on_event
        self._pending: deque[_Task] = deque()
        self._held: dict[int, dict[int, _Task]] = {}
        #: How many tasks each node may hold (by node index); the give-back each was asked for.
        self._window: dict[int, int] = {}
        self._giving_back: dict[int, int] = {}
        self._tids = itertools.count()
        #: (task, ok, outcome, traceback, node, worker that ran it)
        self._settle: list[tuple[_Task, bool, Any, str | None, str, int | None]] = []
        self._submitted = self._completed = self._failed = self._cancelled = self._retried = 0
        self._shutdown = False
        self._cancel_all = False  # shutdown(cancel_futures=True)
        self._stopped = False
        self._paused = False
        self._paused_since = 0.0  # (monotonic: since when paused; a task sent after that has not started)
        self._broken: str | None = None
        self._dispatching = threading.Lock()
        self._turn = 0  # the node that gets the next task when loads are equal
        self._stop_when_idle = False  # shutdown(wait=False): stop once the last task is done
        self._ops = threading.Lock()
        #: Each node's workers as status() last saw them; items completed on each node (by address).
        self._last_seen: dict[int, list[WorkerStatus]] = {}
        #: Tasks that were running on a node lost while stop() ran (stop() counts them running).
        self._lost_running: set[int] = set()
        self._done_at: dict[str, int] = {}
        try:
            self.open(grace_s)
            error = self.agent_error()
            if error is not None:
                raise BrokenExecutor(error)
        except BaseException:
            self._stopped = True
            try:
                if self.nodes:
                    self.ask_all(Op.STOP, 0.0, SLACK)
            finally:
                self.release()
            raise
        self._held = {node.index: {} for node in self.nodes}
        # Slow until measured (as ProcessExecutor): a burst of submits stays here, cancellable.
        self._window = {node.index: self._slow_window for node in self.nodes}

    @property
    def _quick_window(self) -> int:
        return WINDOW_PER_WORKER * self.workers_per_node

    @property
    def _slow_window(self) -> int:
        return self.workers_per_node + 1

    @property
    def workers(self) -> int:
        """Local worker processes in all."""
        return self.workers_per_node * len(self.nodes)

    # -- the Executor API ------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule `fn(*args, **kwargs)` on some node; return its Future."""
        task = self._new_task(fn, [(args, kwargs)], [_item_of(args, kwargs)], chunk=False)
        self._enqueue([task])
        return task.future

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any],
        timeout: float | None = None, chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Results of `fn` over the items, in order, as ProcessExecutor.map."""
        if chunksize is not None:
            check_count("chunksize", chunksize, 1, "a positive integer or None")
        end_time = map_deadline(timeout)
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(args, {}) for args in zip(*iterables)]  # noqa: B905 - the shortest ends it, as the stdlib's
        items = [args[0] if len(iterables) == 1 else args for args, _ in calls]
        if chunksize is None:
            chunksize = max(1, min(MAX_AUTO_CHUNK, math.ceil(len(calls) / (4 * max(1, self.workers)))))
        tasks = [self._new_task(fn, calls[i:i + chunksize], items[i:i + chunksize], chunk=chunksize > 1)
                 for i in range(0, len(calls), chunksize)]
        self._enqueue(tasks)
        futures = [t.future for t in tasks]
        chunked = chunksize > 1

        def results() -> Iterator[Any]:
            # As the stdlib's: nothing here holds a result once it is yielded
            # (bpo-14406); a chunk's items are popped off its list as they go.
            try:
                futures.reverse()
                while futures:
                    if not chunked:
                        yield _take(futures, end_time)
                        continue
                    chunk = _take(futures, end_time)
                    chunk.reverse()
                    while chunk:
                        yield chunk.pop()
            finally:
                for fut in futures:
                    fut.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the stdlib's: no new tasks; with `cancel_futures`, cancel those not
        yet started (waiting here, or on a node); the rest run (a paused pool is
        resumed). Without `wait`, the nodes' agents and workers stop once the
        last task is done, as ProcessExecutor's workers do."""
        with self.cond:
            self._shutdown = True
            if cancel_futures:
                self._cancel_all = True
                while self._pending:
                    task = self._pending.popleft()
                    if task.future.revoke():
                        self._cancelled += len(task.items)
        if cancel_futures and not self._stopped:
            with self._ops:
                answers = self.ask_all(Op.CANCEL, None, self.lease + SLACK)
            with self.cond:
                for index, tids in answers.items():
                    held = self._held.get(index, {})
                    for tid in tids if isinstance(tids, list) else ():
                        was_held = held.pop(tid, None)
                        if was_held is not None and not was_held.answered and was_held.future.revoke():
                            self._cancelled += len(was_held.items)
        if self._paused and not self._stopped:
            self.resume()
        if wait and self.in_deliverer():
            # As the stdlib's: its callbacks run in its manager thread, which cannot join itself.
            with self.cond:
                self._stop_when_idle = True
            self._stop_if_idle()
            raise RuntimeError("shutdown(wait=True) cannot wait from a done callback or on_event: they run "
                               "in the thread that completes the futures (the shutdown goes on; use wait=False)")
        if wait:
            with self.cond:
                outstanding = [t.future for t in self._pending]
                outstanding += [t.future for held in self._held.values() for t in held.values()]
            wait_futures(outstanding)
            self.stop(self.grace)
        else:
            with self.cond:
                self._stop_when_idle = True
            self._stop_if_idle()

    def _stop_if_idle(self) -> None:
        """After shutdown(wait=False): stop (in a thread of its own) once no task is left."""
        with self.cond:
            if (not self._stop_when_idle or self._stopped or self._pending
                    or any(self._held.values()) or self._settle):
                return
            self._stop_when_idle = False
        threads.start(threading.Thread(target=self.stop, args=(self.grace,), name="procctl-cluster-shutdown",
                                       daemon=True))

    # -- pause, resume, stop ----------------------------------------------------------------------

    def pause(self, timeout: float | None = None) -> None:
        """Send no new task, and return once every node's workers acknowledged."""
        self._check_open()
        if not self._paused:
            self._paused_since = time.monotonic()
        self._paused = True
        self._command(Op.PAUSE, timeout)

    def resume(self, timeout: float | None = None) -> None:
        """Let every node run again; return once each acknowledged."""
        self._check_open()
        self._command(Op.RESUME, timeout)
        with self.cond:
            now = time.monotonic()
            for held in self._held.values():  # a task's wait at its node counts from now
                for task in held.values():
                    task.sent = now
            self._paused = False
        self._dispatch()

    def _command(self, op: Op, timeout: float | None) -> None:
        timeout = check_timeout("timeout", timeout)
        with self._ops:
            # Each node waits as long for its workers (a pause, for their checkpoints).
            wait = None if timeout is None or math.isinf(timeout) else timeout + SLACK
            answers = self.ask_all(op, timeout, wait)
        late = []
        with self.cond:
            for n in self.nodes:
                answer = check_answer(n, answers.get(n.index, ("timeout", None)))
                if isinstance(answer, tuple) and answer[0] == "timeout" and not n.ended and n.lost is None:
                    late.append(n.address)
        if late:
            raise TimeoutError(f"nodes {late} did not acknowledge {op.value} within {timeout}s")

    def stop(self, grace: float | None = None) -> Unfinished:
        """Send no new task, stop the running ones, escalate after `grace` on each
        node, and hand back every item that did not complete, once each, in
        submission order. Their futures are cancelled."""
        grace_s = self.grace if grace is None else check_timeout("grace", grace, allow_none=False)
        assert grace_s is not None
        with self._ops:
            if self._stopped:
                return Unfinished()
            with self.cond:
                self._shutdown = True
                self._stopped = True
            bound = grace_s + shutdown.TERM_TIMEOUT + shutdown.KILL_TIMEOUT + SLACK
            try:
                answers = self.ask_all(Op.STOP, grace_s, bound)
            finally:
                self.release()
            self._apply_settlements()
            running_tids = set(self._lost_running)
            for answer in answers.values():
                if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[1], list):
                    running_tids.update(answer[1])
            with self.cond:
                left = list(self._pending)
                self._pending.clear()
                for held in self._held.values():
                    left.extend(t for t in held.values() if not t.answered)
                    held.clear()
            left.sort(key=lambda t: t.tid)
            items: list[Any] = []
            running: list[Any] = []
            futures: list[Future[Any]] = []
            for task in left:
                if task.future.revoke():
                    self._cancelled += len(task.items)
                items.extend(task.items)
                if task.tid in running_tids:
                    running.extend(task.items)
                futures.append(task.future)
            self._emit_events(block=False)  # (holding the lock: what is left is told below)
            unfinished = Unfinished(items, running, futures)
        self._emit_events()
        return unfinished

    def kill(self) -> None:
        """SIGKILL every worker on every node now (sent within a tick); their tasks
        fail or are retried as crashes. Safe from a signal handler."""
        self.request_kill()

    @property
    def paused(self) -> bool:
        return self._paused

    def counts(self) -> TaskCounts:
        """Submitted tasks, by where they are now; a map counts each of its
        items as a task, whatever its chunks."""
        with self.cond:
            held = sum(len(t.items) for h in self._held.values() for t in h.values())
            queued = sum(len(t.items) for t in self._pending)
            # A future its caller cancelled in the queue: counted at once, as locally.
            late = sum(len(t.items) for t in self._pending if t.future.cancelled())
            # As ProcessExecutor's: one item at a time per worker runs; the rest held waits.
            running = min(held, self.workers)
            return TaskCounts(self._submitted, self._completed, self._failed, self._cancelled + late, running,
                              queued - late + held - running)

    @property
    def retried(self) -> int:
        """Tasks sent again: after their node was lost, or on their node after
        a crash or a timeout (`retries`)."""
        return self._retried

    def status(self) -> list[WorkerStatus]:
        """Every node's workers, with global ids (node order, then local id) and the node."""
        if self._stopped:
            return []
        with self._ops:
            answers = self.ask_all(Op.STATUS, None, self.lease + SLACK)
        out: list[WorkerStatus] = []
        with self.cond:
            for node in self.nodes:
                got = answers.get(node.index)
                if isinstance(got, list) and got:
                    seen = [replace(status, worker_id=node.index * self.workers_per_node + status.worker_id,
                                    node=node.address) for status in got]
                    self._last_seen[node.index] = seen
                    out += seen
                elif node.ended or node.lost is not None:
                    out += self._lost_workers(node)
        return out

    def _lost_workers(self, node: Node) -> list[WorkerStatus]:
        """The workers of a lost node, as ClusterController reports them: crashed,
        with the node; their `done` and `total` are the tasks they completed (those
        they held run elsewhere), as last seen, so that the totals still add up."""
        n, first = self.workers_per_node, node.index * self.workers_per_node
        seen = {s.worker_id - first: s for s in self._last_seen.get(node.index, [])}
        pids = node.hello if isinstance(node.hello, list) else []
        done = [int(seen[i].done or 0) if i in seen else 0 for i in range(n)]
        # What completed there since the last look, spread over its workers.
        extra = max(0, self._done_at.get(node.address, 0) - sum(done))
        out = []
        for i in range(n):
            d = float(done[i] + extra // n + (i < extra % n))
            pid = seen[i].pid if i in seen else (pids[i] if i < len(pids) else None)
            out.append(WorkerStatus(first + i, pid, State.STOPPED, False, Outcome.CRASHED, done=d, total=d,
                                    node=node.address))
        return out

    # -- tasks --------------------------------------------------------------------------------------

    def _new_task(self, fn: Callable[..., Any], calls: list[Any], items: list[Any], chunk: bool) -> _Task:
        future = _TaskFuture()
        try:
            blob = cloudpickle.dumps((fn, calls, chunk))
        except Exception as exc:  # noqa: BLE001 - the future carries it, as ProcessPoolExecutor's does
            future.set_exception(exc)
            blob = b""
        return _Task(next(self._tids), future, blob, items)

    def _enqueue(self, tasks: list[_Task]) -> None:
        with self.cond:
            if self._broken is not None:
                raise BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitted += sum(len(t.items) for t in tasks)
            self._pending.extend(t for t in tasks if t.blob)
            self._failed += sum(len(t.items) for t in tasks if not t.blob)
        self._dispatch()

    def _dispatch(self) -> None:
        """Deal waiting tasks to the live nodes with room, one at a time to the
        least loaded (ties taken in turn), then send each node its batch in one put."""
        with self._dispatching:
            sends: list[tuple[Node, list[tuple[int, bytes, int]]]] = []
            with self.cond:
                if self._paused or self._stopped or not self._pending:
                    return
                live = [n for n in self.nodes if not n.ended and n.lost is None]
                batches: dict[int, list[tuple[int, bytes, int]]] = {n.index: [] for n in live}
                turn = self._turn
                now = time.monotonic()
                while self._pending:
                    roomy = [n for n in live if len(self._held[n.index]) < self._window[n.index]]
                    if not roomy:
                        break
                    node = min(roomy, key=lambda n: (len(self._held[n.index]), (n.index - turn) % len(self.nodes)))
                    held = self._held[node.index]
                    task = self._pending.popleft()
                    if not task.future.claim():  # cancelled meanwhile
                        self._cancelled += len(task.items)
                        continue
                    task.node = node.index
                    task.sent = now
                    held[task.tid] = task
                    batches[node.index].append((task.tid, task.blob, len(task.items)))  # (the node counts items)
                    turn = node.index + 1
                self._turn = turn
                sends = [(n, batches[n.index]) for n in live if batches[n.index]]
            for node, batch in sends:
                self.send(node, Op.TASKS, batch, keep_answer=False)

    # -- the session's hooks (holding cond) ------------------------------------------------------

    def agent_call(self, spec: AgentSpec) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return run_executor_agent, (self._ex_args,)

    def on_message(self, node: Node, msg: Message) -> None:
        if msg.kind is Up.EVENT:  # a worker's, or a retry on the node: with the global id and the node
            wall, event = msg.body
            if event.event == "task-retry":
                self._retried += 1
                done, total = self._tally()
                event = replace(event, done=done, total=total)
            if self._on_event is not None:
                wid = None if event.worker is None else node.index * self.workers_per_node + event.worker
                self._events.append(replace(event, t=self.t_of(wall), worker=wid, node=node.address))
            return
        if msg.kind is not Up.RESULT:
            return
        tid, ok, value, tb, wid = msg.body
        task = self._held.get(node.index, {}).pop(tid, None)
        if task is None or task.answered:
            log.debug("node %s answered task %s it does not hold", node.address, tid)
            return
        task.answered = True
        if time.monotonic() - task.sent < QUICK_AT_NODE:
            self._window[node.index] = min(self._quick_window, 2 * self._window[node.index])
        self._settle.append((task, ok, value, tb, node.address, wid))

    def _take_back(self, node: Node, tids: Any) -> None:
        """The tasks `node` gave back (they never ran there): first in line
        here again, in submission order, and pending (cancellable) again."""
        held = self._held.get(node.index, {})
        back = []
        for tid in tids if isinstance(tids, list) else ():
            task = held.pop(tid, None)
            if task is None or task.answered:
                continue
            task.node = None
            if self._cancel_all:  # shutdown(cancel_futures=True) came meanwhile
                if task.future.revoke():
                    self._cancelled += len(task.items)
                continue
            task.future.unclaim()
            back.append(task)
        back.sort(key=lambda t: t.tid)
        self._pending.extendleft(reversed(back))

    def _give_back_slow(self) -> None:
        """Take what nodes gave back; ask each node that has held a task
        SLOW_AT_NODE unanswered, and holds more than a slow window, for the
        tasks it holds beyond that window."""
        asks = []
        with self.cond:
            for index, seq in list(self._giving_back.items()):
                node = self.nodes[index]
                if seq in node.answers:  # (the inbox put it there)
                    del self._giving_back[index]
                    self._take_back(node, node.answers.pop(seq))
            if self._paused or self._stopped:
                return
            now = time.monotonic()
            for node in self.nodes:
                held = self._held.get(node.index)
                if (not held or node.ended or node.lost is not None or node.index in self._giving_back
                        or len(held) <= self._slow_window):
                    continue
                oldest = next(iter(held.values()))  # (held in the order sent)
                if now - oldest.sent >= SLOW_AT_NODE:
                    self._window[node.index] = self._slow_window
                    asks.append(node)
        # (Only this thread asks, and its answer waits in node.answers under its seq.)
        for node in asks:
            seq = self.send(node, Op.GIVE_BACK, self._slow_window)
            with self.cond:
                if node.lost is None:
                    self._giving_back[node.index] = seq

    def on_lost(self, node: Node, why: str) -> None:
        seq = self._giving_back.pop(node.index, None)
        if seq is not None:
            node.answers.pop(seq, None)
        held = self._held.get(node.index, {})
        back = sorted((t for t in held.values() if not t.answered), key=lambda t: t.tid)
        held.clear()
        if self._closing:
            # The end of the session (its agents cancelled once they answered the
            # stop): no loss, and nothing it held is left to hand back but as it is.
            self._pending.extend(back)
            return
        if self._on_event is not None:  # its workers went with it, as ClusterController reports them
            pids = node.hello if isinstance(node.hello, list) else []
            seen = {s.worker_id: s.pid for s in self._last_seen.get(node.index, [])}
            for i in range(self.workers_per_node):
                gid = node.index * self.workers_per_node + i
                pid = seen.get(gid, pids[i] if i < len(pids) else None)
                self._events.append(Event(self.elapsed(), "crashed", worker=gid, pid=pid,
                                          error=f"node {node.address} was lost: {why}", node=node.address))
        if self._stopped:
            # stop() hands them back as unfinished. Those the node's workers had
            # taken were interrupted: the node cannot say which any more, and its
            # pool runs them in the order they came, one a worker (paused: only
            # those it had before the pause may have begun).
            taken = [t for t in back if not self._paused or t.sent < self._paused_since]
            self._lost_running.update(t.tid for t in taken[:self.workers_per_node])
            self._pending.extend(back)
            return
        for task in reversed(back):
            task.retries += 1
            task.node = None
            self._pending.appendleft(task)
            self._retried += 1
            self._event("task-retry", task.tid, node.address, error=f"node {node.address} was lost: {why}")
        if all(n.ended or n.lost is not None for n in self.nodes):
            self._break(f"every node of the cluster was lost (the last: {node.address}: {why})")

    def _break(self, why: str) -> None:
        self._broken = why
        self._shutdown = True
        while self._pending:
            task = self._pending.popleft()
            if not task.future.done():
                self._settle.append((task, False, BrokenExecutor(why), None, "", None))

    def after_pass(self) -> None:
        self._apply_settlements()
        self._emit_events()
        self._give_back_slow()
        if self._pending and not self._paused and not self._stopped:
            self._dispatch()
        self._stop_if_idle()

    def _apply_settlements(self) -> None:
        with self.cond:
            settle, self._settle = self._settle, []
        settle.reverse()
        while settle:
            # Popped, and let go of once set: the caller who takes a result
            # may be its only holder (as the stdlib's manager, bpo-14406).
            task, ok, value, tb, node, wid = settle.pop()
            fut, tid, n = task.future, task.tid, len(task.items)
            del task
            if node:
                self._done_at[node] = self._done_at.get(node, 0) + n
            if fut.cancelled():
                self._cancelled += n
                continue
            if ok:
                fut.set_result(value)
                del fut, value
                for _ in range(n):  # one event an item, also in a map chunk
                    self._completed += 1
                    self._event("task-done", tid, node, worker=wid)
            else:
                if not isinstance(value, BaseException):
                    value = RuntimeError(str(value))
                if tb:
                    value.__cause__ = RemoteTraceback(tb)
                fut.set_exception(value)
                self._failed += n
                # Named as ProcessExecutor names them.
                name = ("task-crashed" if isinstance(value, WorkerCrashed)
                        else "task-timeout" if isinstance(value, TaskTimeout) else "task-failed")
                self._event(name, tid, node, error=f"{type(value).__name__}: {value}", worker=wid)

    def _event(self, name: str, tid: int, node: str, error: str | None = None, worker: int | None = None) -> None:
        if self._on_event is not None:
            with self.cond:
                done, total = self._tally()
                self._events.append(Event(self.elapsed(), name, worker=worker, task=tid, node=node or None,
                                          error=error, done=done, total=total))

    def _tally(self) -> tuple[float, float]:
        """A task event's `done` and `total`, as ProcessExecutor's: items ended, items submitted."""
        return float(self._completed + self._failed), float(self._submitted)

    def _check_open(self) -> None:
        if self._stopped:
            raise RuntimeError("the executor is shut down")

    def __repr__(self) -> str:
        return f"<ClusterExecutor {len(self.nodes)} nodes x {self.workers_per_node}>"


class ClusterExecutor(PoolFront):
    """A process pool over every node of a Dask cluster with the ProcessExecutor API:
    submit, map, pause, resume, stop (the unfinished items, once each), counts, status.

    Each node runs `workers_per_node` local worker processes under a local
    ProcessExecutor (a crash there costs one task; `retries` and
    `task_timeout` apply per node). A node that is lost (its Dask worker died,
    or it went silent for `lease` seconds) gives its tasks back to the others:
    they run again elsewhere, counted as retries.

    Dropped without shutdown(), it shuts down when it is collected (the tasks
    submitted still run; then the nodes' workers stop), as ProcessExecutor does.
    """

    _pool: _ClusterPool

    def __init__(
        self,
        address: str | None = None,
        workers_per_node: int = 4,
        *,
        cluster: Any = None,
        lease: float = 10.0,
        retries: int = 0,
        task_timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        grace: float = 5.0,
        start_method: str | None = "fork",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._pool = _ClusterPool(
            address, workers_per_node, cluster=cluster, lease=lease, retries=retries, task_timeout=task_timeout,
            on_event=on_event, grace=grace, start_method=start_method, initializer=initializer,
            initargs=initargs, connect_timeout=connect_timeout)
        weakref.finalize(self, _dropped, self._pool).atexit = False

    @property
    def retried(self) -> int:
        """Tasks sent again: after their node was lost, or on their node after
        a crash or a timeout (`retries`)."""
        return self._pool.retried

    def __getattr__(self, name: str) -> Any:
        # The rest of what the pool shows (nodes, lease, workers_per_node, grace, retries, client).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._pool, name)


def _dropped(pool: _ClusterPool) -> None:
    """A ClusterExecutor was collected: shutdown(wait=False), from a thread of its own
    (a collection may run in any thread, the pool's own included)."""
    if not pool._stopped:
        threads.start(threading.Thread(target=pool.shutdown, args=(False,), name="procctl-cluster-dropped",
                                       daemon=True))


def _take(futures: list[_TaskFuture], end_time: float | None) -> Any:
    """The result of the last future in `futures` (before `end_time`), which it drops."""
    fut = futures[-1]
    value = fut.result() if end_time is None else fut.result(max(0.0, min(end_time - time.monotonic(), MAX_WAIT)))
    futures.pop()
    return value


__all__ = ["ClusterExecutor", "State"]
