"""The child side of the work plane: channel get/put/iter, and the executor's task loop.

A worker asks for items (GET, PREFETCH at a time) and the manager sends
them only then; they wait in the worker's socket until a get() reads one,
and the manager takes back the unread ones at PAUSED or when the worker
ends.  A timed-out get withdraws its request (CANCEL) and gives back an
item that crossed it (UNGET); items read past (waiting for another reply)
are given back at PAUSED and STOPPED.  Puts to a bounded channel spend credits the manager grants while
the channel has room; credits not spent go back (RETURN) when a put times
out (after UNWANT), when the worker sleeps or pauses, and when the manager
asks (RECLAIM: another sender waits).  Every wait here also wakes on a
command: STOPPED ends a get (`Closed`) or a put (False) at once.
"""

from __future__ import annotations

import itertools
import pickle
import queue
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import workwire
from .errors import Closed, format_exc
from .statecodes import State
from .workwire import Kind, Message

if TYPE_CHECKING:
    from .worker import WorkerContext

#: A task's result: ok (value), err (exception, traceback text), stopped (the
#: task saw STOPPED at a checkpoint: it did not complete), err_at (an item of
#: a map chunk raised: the exception and the results of the items before it).
OK, ERR, STOPPED, ERR_AT = "ok", "err", "stopped", "err_at"


_REPLIES = (Kind.ITEM, Kind.CLOSED)

#: A consumer keeps up to PREFETCH items of a channel coming (it asks for
#: more when half have come), so items flow without a round trip per item;
#: but no more than about PREFETCH_SECONDS of its work, by the time it has
#: been taking per item, so that a slow consumer leaves the items to others.
PREFETCH = 128
PREFETCH_SECONDS = 0.002
#: The signal the executor sends a worker's returner thread (that thread
#: alone: tgkill) when it asks for the worker's unstarted tasks while the
#: worker runs one that is slow (board.ask_back): the thread waits for it
#: (sigwait, blocked in that thread only) and gives the tasks back then, not
#: once the slow one ends. No other thread ever gets it, and the worker's
#: own mask (which what its tasks start inherits) stays as it was.
RETURN_SIGNAL = signal.SIGRTMIN + 3


class WorkEnd:
    """The worker's end of its work link."""

    def __init__(self, sock: socket.socket, channels: dict[str, tuple[int, int]]) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.channels = channels  # name -> (channel id, maxsize)
        self.credits: dict[int, int] = {}
        self.wanting: set[int] = set()
        self.putting = -1  # the channel a put waits for a credit on (it keeps one at a RECLAIM)
        self.tasks: deque[tuple[int, bytes, bytes]] = deque()
        #: The executor's requests for our unstarted tasks, as many as we answered.
        self.asks_answered = 0
        #: Held to take tasks and to send: the returner thread does both too.
        self.mutex = threading.RLock()
        self.returner: threading.Thread | None = None
        #: channel id -> items asked for (GET) and not yet come; they wait in
        #: the socket, where the manager can take them back.
        self.asked: dict[int, int] = {}
        self.per_item = 1.0  # a running mean of the caller's seconds between two gets
        self.last_get = 0.0
        self.windows: dict[int, int] = {}  # channel id -> the window of its last request

    # -- channels -----------------------------------------------------------

    def channel(self, name: str) -> tuple[int, int]:
        if not isinstance(name, str):
            raise TypeError(f"name must be a channel's name (str), not {type(name).__name__}")
        try:
            return self.channels[name]
        except KeyError:
            known = ", ".join(sorted(self.channels)) or "none"
            raise ValueError(f"no channel named {name!r} (channels: {known})") from None

    def get(self, ctx: WorkerContext, name: str, timeout: float | None) -> Any:
        spec = self.channels.get(name) if isinstance(name, str) else None
        cid = spec[0] if spec is not None else self.channel(name)[0]
        end = None if timeout is None else workwire.deadline(timeout)
        while True:
            if not ctx.checkpoint():  # a paused worker waits here, holding nothing
                raise Closed(name)
            now = time.perf_counter()
            if self.last_get:
                self.per_item += (now - self.last_get - self.per_item) * 0.25
            asked = self.asked.get(cid, 0)
            if asked <= self.windows.get(cid, 0) // 2:  # (the channel's window as last asked: worked out
                self.windows[cid] = window = self._window()  # again only when a request may be due)
                if asked <= window // 2:
                    self._send(ctx, Kind.GET, cid, window - asked)
                    self.asked[cid] = window
            try:  # as a rule the item is there already
                reply = workwire.recv_item(self.sock, cid)
            except OSError:  # none there (BlockingIOError), or the link is gone
                reply = None
            if type(reply) is memoryview:
                self.asked[cid] -= 1
                try:
                    value = pickle.loads(reply)
                finally:
                    workwire.item_read()
                self.last_get = time.perf_counter()
                return value
            if reply is not None and (reply.channel != cid or reply.kind not in _REPLIES):
                self._absorb(ctx, reply)
                reply = None
            if reply is None:
                reply = self._await_reply(ctx, cid, end)
            if reply is not None:
                if reply.kind is Kind.ITEM:
                    self.asked[cid] -= 1
                    value = pickle.loads(reply.payload)
                    self.last_get = time.perf_counter()
                    return value
                self.asked.pop(cid, None)
                raise Closed(name)
            if ctx.state is State.STOPPED:
                raise Closed(name)
            if ctx.state is State.PAUSED:
                continue  # the manager takes back what we have not read
            # The timeout: withdraw the request; an item that crossed it goes back.
            self._withdraw(ctx, cid)
            raise queue.Empty(f"nothing arrived on channel {name!r} within {timeout}s")

    def _window(self) -> int:
        """How many items to keep coming, by the caller's time per item."""
        return max(1, min(PREFETCH, int(PREFETCH_SECONDS / max(self.per_item, 1e-7))))

    def _withdraw(self, ctx: WorkerContext, cid: int) -> None:
        self._send(ctx, Kind.CANCEL, cid)
        self.asked.pop(cid, None)
        while True:
            reply = self._await_reply(ctx, cid, None, until=(Kind.ITEM, Kind.CLOSED, Kind.CANCELLED))
            if reply is None or reply.kind is not Kind.ITEM:
                return  # STOPPED (the manager takes back the rest), CLOSED or CANCELLED
            self._send(ctx, Kind.UNGET, cid, payload=reply.payload)

    def put(self, ctx: WorkerContext, name: str, item: Any, timeout: float | None) -> bool:
        cid, maxsize = self.channel(name)
        if not ctx.checkpoint():
            return False
        payload = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        end = workwire.deadline(timeout)
        if maxsize and not self.credits.get(cid):
            self.putting = cid
            try:
                while not self.credits.get(cid):
                    if cid not in self.wanting:
                        self._send(ctx, Kind.WANT, cid)
                        self.wanting.add(cid)
                    remaining = workwire.remaining(end)
                    if remaining is not None and remaining <= 0:
                        self._unwant(ctx, cid)
                        raise queue.Full(f"channel {name!r} stayed full for {timeout}s")
                    if ctx.wait_readable(self.sock, remaining):
                        self._absorb_all(ctx)
                    elif ctx.state is not State.RUNNING and not ctx.checkpoint():
                        return False  # STOPPED: the item was not sent
            finally:
                self.putting = -1
        if maxsize:
            self.credits[cid] -= 1
        return self._send(ctx, Kind.PUT, cid, payload=payload, stoppable=True)

    def _unwant(self, ctx: WorkerContext, cid: int) -> None:
        """A put that timed out withdraws its request for room, and gives back
        a credit that crossed the withdrawal: it holds no room it will not use
        (a room held could keep every other sender waiting on an empty channel)."""
        if cid in self.wanting:
            self._send(ctx, Kind.UNWANT, cid)
            self._await_reply(ctx, cid, None, until=(Kind.UNWANTED,))  # a crossing CREDIT is absorbed
            self.wanting.discard(cid)
        self.give_back(ctx, cid)

    def give_back(self, ctx: WorkerContext, cid: int | None = None) -> None:
        """Give back the put credits held on channel `cid`, or on every channel
        (the worker is about to sleep or pause: a sender waiting for that room
        must not wait for us)."""
        for held in [cid] if cid is not None else list(self.credits):
            n = self.credits.pop(held, 0)
            if n:
                self._send(ctx, Kind.RETURN, held, n)

    def iter(self, ctx: WorkerContext, name: str) -> Iterator[Any]:
        self.channel(name)
        while True:
            try:
                yield self.get(ctx, name, None)
            except Closed:
                return

    # -- tasks --------------------------------------------------------------

    def next_task(self, ctx: WorkerContext) -> tuple[int, bytes, bytes] | None:
        """The next task (id, pickled function, pickled call), or None if a command came first."""
        # One message at a time: tasks we have not read stay in the socket,
        # where the manager takes them back if we die.  Those of a message
        # we have read run in order, each result sent before the next
        # starts, so the manager can tell which one a death interrupted.
        # The manager may ask for those back (its window shrank: they were
        # sent while tasks were quick, and a slow one runs ahead of them).
        self.answer_ask(ctx)
        while True:
            with self.mutex:  # (popped here: started; the returner gives back only what is left)
                if self.tasks:
                    return self.tasks.popleft()
            try:
                msg = workwire.recv(self.sock)
            except BlockingIOError:
                if not ctx.wait_readable(self.sock):
                    return None
                continue
            if msg is None:
                return None
            self._absorb(ctx, msg)

    def answer_ask(self, ctx: WorkerContext) -> None:
        """Give back our unstarted tasks if the executor asked since we last did."""
        with self.mutex:
            asks = ctx._end.board.asked_back(ctx._end.worker)
            if asks != self.asks_answered:
                self.asks_answered = asks
                self.return_tasks(ctx)

    def return_tasks(self, ctx: WorkerContext) -> None:
        """Give back the tasks read but not started (we are leaving, or asked)."""
        with self.mutex:
            if self.tasks:
                ids = b"".join(workwire.TASK_IDS.pack(tid) for tid, _, _ in self.tasks)
                self.tasks.clear()
                if threading.current_thread() is self.returner:
                    self._send_from_returner(Kind.RETURNED, ids)
                else:
                    self._send(ctx, Kind.RETURNED, payload=ids)

    def start_returner(self, ctx: WorkerContext) -> int:
        """A thread that answers the executor's asks while a task runs (see
        RETURN_SIGNAL); its thread id, for the manager to signal it."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {RETURN_SIGNAL})  # (the thread inherits the mask)
        try:
            returner = threading.Thread(target=self._return_on_signal, args=(ctx,), name="procctl-returner",
                                        daemon=True)
            try:
                returner.start()
            except RuntimeError:  # a process or memory limit: no returner (0), tasks come back between tasks
                return 0
            self.returner = returner
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return returner.native_id or 0

    def _return_on_signal(self, ctx: WorkerContext) -> None:
        while True:
            signal.sigwait({RETURN_SIGNAL})
            try:
                self.answer_ask(ctx)
            except OSError:
                return  # the manager is gone: so are we, soon

    # -- the wire -----------------------------------------------------------

    def _await_reply(
        self, ctx: WorkerContext, cid: int, end: float | None,
        until: tuple[Kind, ...] = (Kind.ITEM, Kind.CLOSED),
    ) -> Message | None:
        """Wait for a reply on `cid`; None if a command (any, or with `until`
        including CANCELLED, only STOPPED) or the deadline came first. Reads
        one message at a time: what we do not read stays the manager's."""
        cancelling = Kind.CANCELLED in until or Kind.UNWANTED in until
        while True:
            try:
                msg = workwire.recv(self.sock)
            except BlockingIOError:
                msg = None
            except OSError:
                return None
            if msg is not None:
                if msg.kind in until and msg.channel == cid:
                    return msg
                self._absorb(ctx, msg)
                continue
            remaining = workwire.remaining(end)
            if remaining is not None and remaining <= 0:
                return None
            if not ctx.wait_readable(self.sock, remaining):
                if ctx.state is State.STOPPED:
                    return None
                if not cancelling and ctx.state is State.PAUSED:
                    return None

    def _absorb_all(self, ctx: WorkerContext) -> None:
        # One message at a time, each dealt with before the next is read: an
        # item read past goes back (UNGET) before another leaves the socket,
        # so a worker killed here loses at most the one in hand (items still
        # in the socket are the manager's to take back).
        while True:
            try:
                msg = workwire.recv(self.sock)
            except OSError:  # nothing more waiting (BlockingIOError), or the link is gone
                return
            if msg is None:
                return
            self._absorb(ctx, msg)

    def _absorb(self, ctx: WorkerContext, msg: Message) -> None:
        kind = msg.kind
        if kind is Kind.CREDIT:
            self.credits[msg.channel] = self.credits.get(msg.channel, 0) + msg.tag
            self.wanting.discard(msg.channel)
        elif kind is Kind.TASK:
            tasks = workwire.unpack_tasks(msg.payload)
            with self.mutex:
                self.tasks.extend(tasks)
        elif kind is Kind.ITEM:
            # An item we asked for earlier, read past while we wait for
            # something else: we hold nothing we are not handing to the
            # caller, so it goes back now, and so does the rest of that request.
            if self.asked.pop(msg.channel, 0):
                self._send(ctx, Kind.CANCEL, msg.channel)
            self._send(ctx, Kind.UNGET, msg.channel, payload=msg.payload)
        elif kind is Kind.CLOSED:
            self.asked.pop(msg.channel, None)  # the next get asks again, and hears it again
        elif kind is Kind.RECLAIM:
            # Another producer waits for room we hold: give back what we do not need now.
            have = self.credits.get(msg.channel, 0)
            keep = min(have, 1) if self.putting == msg.channel else 0
            self.credits[msg.channel] = keep
            self._send(ctx, Kind.RETURN, msg.channel, have - keep)
        # CANCELLED: the end of a request withdrawn above; nothing to do.

    def _send(
        self, ctx: WorkerContext, kind: Kind, cid: int = 0, tag: int = 0, payload: bytes = b"",
        stoppable: bool = False,
    ) -> bool:
        """Send one message, waiting for room in the socket; with `stoppable`,
        give up (False, nothing sent) at STOPPED."""
        with self.mutex:  # (whole messages: the returner thread sends too)
            while True:
                try:
                    workwire.send(self.sock, kind, cid, tag, payload)
                    return True
                except BlockingIOError:
                    pass
                if not ctx._wait_io(self.sock.fileno(), select.POLLOUT, None):
                    if stoppable and ctx.state is State.STOPPED:
                        return False

    def _send_from_returner(self, kind: Kind, payload: bytes) -> None:
        """As _send, from the returner thread (holding the mutex): the context's
        waits are the main thread's, so it waits for room here alone."""
        room = select.poll()
        room.register(self.sock.fileno(), select.POLLOUT)
        while True:
            try:
                workwire.send(self.sock, kind, 0, 0, payload)
                return
            except BlockingIOError:
                room.poll()



# -- the executor's task loop --------------------------------------------------


def run_tasks(
    ctx: WorkerContext,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    max_tasks: int | None,
    timed: bool = False,
) -> int:
    """The target of every executor worker: run tasks until STOPPED, or
    until `max_tasks` are done (the executor then starts a fresh worker).
    With `timed` (the executor has a task_timeout), a map chunk says on the
    board when each of its items starts: the timeout is per item."""
    end = ctx._work
    assert end is not None
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:  # noqa: BLE001 - reported; the executor is then broken
            end._send(ctx, Kind.INIT_FAILED, payload=format_exc().encode())
            return 0
    # Task timeouts count from UP, not from our start; it names the returner thread.
    end._send(ctx, Kind.UP, tag=end.start_returner(ctx))
    done = 0
    send, result = end._send, Kind.RESULT
    functions: dict[bytes, Any] = {}
    while ctx.checkpoint():
        task = end.next_task(ctx)
        if task is None:
            continue  # a command: checkpoint() applies it
        send(ctx, result, tag=task[0], payload=_run_task(ctx, functions, task, timed))
        done += 1
        if max_tasks is not None and done >= max_tasks:
            break
    end.return_tasks(ctx)
    return done


#: What a pickled call is: one call (fn, args, kwargs), or a chunk of a map
#: (fn, items, star): fn(item) or fn(*item) for each item. A chunk says on
#: the board which block of its items it runs, so that a crash costs an item,
#: not the chunk; a PRECISE one (what a crash in a block of several left, run
#: again) says each item, as a chunk does when the executor has a task_timeout.
CALL, CHUNK, PRECISE = 0, 1, 2
#: A chunk checks for commands between blocks of items; a block grows while
#: it takes less than this, so pause and stop stay prompt with tiny items.
BLOCK_SECONDS = 0.001


def _run_task(ctx: WorkerContext, functions: dict[bytes, Any], task: tuple[int, bytes, bytes], timed: bool) -> bytes:
    tid, fn_blob, blob = task
    board, slot = ctx._end.board, ctx._end.worker
    # The executor's task_timeout: the task's clock runs from here until its function returns.
    board.set_item_started(slot, time.monotonic())
    board.set_task_running(slot, tid)
    done: list[Any] = []  # a chunk's results so far, in whole blocks
    block: list[Any] = []  # ... and those of the block it runs
    kind = CALL
    try:
        fn = functions.get(fn_blob)
        if fn is None:
            if len(functions) >= 64:
                functions.clear()
            fn = functions[fn_blob] = pickle.loads(fn_blob)
        kind, a, b = pickle.loads(blob)
        if kind != CALL:
            value: Any = _run_chunk(ctx, fn, a, b, done, block, tid, timed or kind == PRECISE)
        else:
            ctx._end.board.set_items_running(ctx._end.worker, tid, 0, 1)  # started (counts(): running)
            value = fn(*a, **b)
    except BaseException as exc:  # noqa: BLE001 - the task's exception is its result
        board.set_task_running(slot, None)
        if saw_stop(ctx):
            return _dump_stopped(done, True)
        if kind != CALL:  # an item raised: the ones before it have their results
            return _dump_item_error(exc, format_exc(), done + block)
        return _dump_error(exc, format_exc())
    # Its clock stops here: a large result takes its time to pickle and to send,
    # which is not the task's.
    board.set_task_running(slot, None)
    if saw_stop(ctx):
        # It saw STOPPED: cut short. A chunk says how far it got.
        return _dump_stopped(done, value is not _BETWEEN)
    try:
        return pickle.dumps((OK, value, None), pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - pickling runs the result's own code, even sys.exit()
        # The task's error, as ProcessPoolExecutor sends it (the exception
        # itself, even a SystemExit): the worker goes on.
        note = f"(the result of type {type(value).__name__} could not be pickled)"
        if sys.version_info >= (3, 11):  # whose tracebacks print the notes
            exc.add_note(note)
            text = format_exc()
        else:  # 3.10: the same attribute (3.10's typing does not know it), and the note in the text
            setattr(exc, "__notes__", [*getattr(exc, "__notes__", ()), note])  # noqa: B010
            text = format_exc() + note + "\n"
        return _dump_error(exc, text)


_BETWEEN = object()  # a chunk stopped between two blocks: no item was interrupted


def _run_chunk(ctx: WorkerContext, fn: Callable[..., Any], items: list[Any], star: bool,
               done: list[Any], out: list[Any], tid: int, one_by_one: bool) -> Any:
    """fn over the items, in blocks with a checkpoint between them (a paused
    chunk waits there). At STOPPED, `done` holds the blocks that ran before it;
    a block that saw STOPPED counts as interrupted (its first item as running).
    When an item raises, `out` holds the results of its block's items before it
    (list.extend keeps what an iterator gave before it raised).
    The board says which block runs (with `one_by_one`, which item, and when
    it started: the executor's task_timeout is per item)."""
    clock = time.perf_counter
    step, i, n = 1, 0, len(items)
    say, slot = ctx._end.board.set_items_running, ctx._end.worker
    call = _marking_call(ctx, fn, star, tid) if one_by_one else None
    while i < n:
        if not ctx.checkpoint():
            return _BETWEEN
        t0 = clock()
        block = items[i:i + step]
        if call is not None:
            out.extend(call(k, item) for k, item in enumerate(block, i))
        else:
            say(slot, tid, i, len(block))
            out.extend(itertools.starmap(fn, block) if star else map(fn, block))
        say(slot, tid, i + len(block), 0)  # between items: a crash now is no item's
        if saw_stop(ctx):
            return None  # an item was told to stop
        done.extend(out)
        out.clear()
        i += len(block)
        took = clock() - t0
        if took < BLOCK_SECONDS:
            step *= 2
        elif took > 2 * BLOCK_SECONDS and step > 1:
            step //= 2
    return done


def _marking_call(ctx: WorkerContext, fn: Callable[..., Any], star: bool, tid: int) -> Callable[[int, Any], Any]:
    """fn for item k, that first says on the board which item starts, and
    when: the executor's task_timeout is per item, whatever the items around
    it take, and a crash is that item's."""
    board, slot, now = ctx._end.board, ctx._end.worker, time.monotonic
    say, mark = board.set_items_running, board.set_item_started

    def call(k: int, item: Any) -> Any:
        say(slot, tid, k, 1)
        mark(slot, now())
        return fn(*item) if star else fn(item)

    return call


def saw_stop(ctx: WorkerContext) -> bool:
    """Whether the running task was told to stop (a checkpoint() returned False).

    Only then is it interrupted: a task that returned or raised without being
    told has its outcome, even if STOPPED came meanwhile (a SIGTERM to the
    whole process group stops the worker after the task). STOPPED is final
    and the task loop ends at the first False checkpoint, so the flag belongs
    to the task that was running when it was set.
    """
    return ctx._saw_stop


def _dump_stopped(done: list[Any], interrupted: bool) -> bytes:
    """A task cut short by STOPPED: the results of a chunk's first items, and
    whether the next one had started."""
    try:
        return pickle.dumps((STOPPED, done, interrupted), pickle.HIGHEST_PROTOCOL)
    except BaseException:  # noqa: BLE001 - then none of them counts as done
        return pickle.dumps((STOPPED, [], True))


def _dump_item_error(exc: BaseException, tb: str, before: list[Any]) -> bytes:
    """An item of a map chunk raised: its exception, and the results of the items before it."""
    try:
        return pickle.dumps((ERR_AT, (exc, before), tb), pickle.HIGHEST_PROTOCOL)
    except BaseException:  # noqa: BLE001 - then the chunk fails as a whole
        return _dump_error(exc, tb)


def _dump_error(exc: BaseException, tb: str) -> bytes:
    try:
        return pickle.dumps((ERR, exc, tb), pickle.HIGHEST_PROTOCOL)
    except BaseException:  # noqa: BLE001 - an exception that cannot travel (even one whose pickling
        # calls sys.exit()) travels as text
        return pickle.dumps((ERR, RuntimeError(f"{type(exc).__name__}: {exc}"), tb))
