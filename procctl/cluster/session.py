"""The client's side of one run's node agents: connection, queues, leases, the inbox.

    client (this module)                      Dask scheduler          node agents (agent.py)
    send(node, op) -- Command(seq) -------->  queue procctl-RUN-cmd-i --> Agent.serve()
    inbox thread   <-- [Message, ...] ------  queue procctl-RUN-up   <--- Outbox thread
    agent futures' done callbacks: a node lost

Everything crosses through Dask's own queues: procctl opens no socket of its
own between machines.  One inbox thread blocks on the up queue with a
timeout (the tick): each pass it hands the messages to the run, renews the
leases, re-sends the commands whose answer is missing, and declares lost a
node that has said nothing for longer than its lease.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import dask
from distributed import Client, Future, Queue, WorkerPlugin
from distributed import Event as DaskEvent
from distributed.comm.addressing import parse_address
from distributed.comm.core import connect as comm_connect
from distributed.comm.registry import get_backend

from .. import threads
from ..limits import capacity_problem
from ..states import Event
from ..workwire import MAX_WAIT, MIN_BEAT, MIN_LEASE, check_timeout, deadline, remaining
from .wire import AgentSpec, Command, Message, Op, Up, decode, encode, queue_names

log = logging.getLogger("procctl")

#: How long the client waits for the scheduler, and for the agents to come up.
CONNECT_TIMEOUT = 10.0
START_TIMEOUT = 60.0
#: A command whose answer has not come within this many seconds is sent again.
RESEND_AFTER = 1.0
#: Slack for the round trips through the scheduler, added to the agents' own bounds.
SLACK = 5.0


def scheduler_address(address: str | None, cluster: Any) -> str:
    """The scheduler address to connect to, from `address` or `cluster`."""
    if cluster is not None:
        if address is not None:
            raise ValueError("give address or cluster, not both")
        address = getattr(cluster, "scheduler_address", None)
        if not isinstance(address, str):
            raise TypeError(
                f"cluster must be a distributed.LocalCluster or have a scheduler_address, "
                f"not {type(cluster).__name__}"
            )
    if address is None:
        raise ValueError("address is required: the Dask scheduler's address (tcp://HOST:PORT), or give cluster=")
    if not isinstance(address, str):
        raise TypeError(f"address must be a str such as 'tcp://HOST:PORT', not {type(address).__name__}")
    if not address.strip():
        raise ValueError("address must not be empty")
    check_address(address)
    return address


def wait_for(cond: threading.Condition, predicate: Callable[[], Any], timeout: float | None) -> Any:
    """cond.wait_for(predicate, timeout), with inf as no limit and a huge
    timeout waited out in turns of MAX_WAIT (a Condition's wait overflows
    past about 9e9 s); the caller holds `cond`."""
    end = deadline(timeout)
    while True:
        result = cond.wait_for(predicate, remaining(end))
        if result or (end is not None and time.monotonic() >= end):
            return result


def check_address(address: str) -> None:
    """ValueError naming `address` if Dask could not connect to it whatever listens
    there: a scheme Dask does not know (http://), a tcp port out of range, the
    command line's local:N (a host named "local" to Dask)."""
    if re.fullmatch(r"\s*local:\s*\d*\s*", address):
        raise ValueError(f"address {address!r} is the command line's form (--cluster local:N); in a script,"
                         " pass cluster=distributed.LocalCluster(n_workers=N)")
    scheme, loc = parse_address(address)
    try:
        get_backend(scheme)
    except ValueError:
        raise ValueError(f"address {address!r} is not a Dask scheduler address: unknown scheme {scheme!r}"
                         f" (use tcp://HOST:PORT)") from None
    if scheme in ("tcp", "tls"):
        host, colon, port = loc.rpartition(":")
        if not colon or loc.endswith("]"):
            raise ValueError(f"address {address!r} is not a Dask scheduler address: it has no port"
                             f" (use tcp://HOST:PORT)")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {address!r} is not a Dask scheduler address: "
                             f"the port must be a number from 1 to 65535")


def connect(address: str | None = None, cluster: Any = None, *, timeout: float = CONNECT_TIMEOUT) -> Client:
    """A Dask client for the scheduler at `address`, or ConnectionError within about `timeout` seconds
    (also from an address that accepts the connection but does not answer as a Dask scheduler)."""
    address = scheduler_address(address, cluster)
    seconds = check_timeout("timeout", timeout, allow_none=False)
    assert seconds is not None
    attempt = Connecting(address, seconds)
    try:
        return attempt.wait()
    finally:
        attempt.close()


class Connecting:
    """One connect to a scheduler, in a helper thread: the caller's wait ends
    after the timeout, or at once on `cancel()`, whatever the other side does.

    Dask's own client waits without a bound for the scheduler's handshake, so
    a socket that listens but never speaks Dask would hang it, and one that
    answers in another protocol can make it allocate exabytes: the thread
    first shakes hands with Dask's own `comm.connect`, under a deadline, then
    opens the client. A client that comes after the caller gave up is closed.
    """

    def __init__(self, address: str, seconds: float) -> None:
        self.address = address
        self.seconds = 86400.0 if math.isinf(seconds) else seconds
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._abandoned = False
        self._done = False
        self._closed = False
        self._client: Client | None = None
        self._error: BaseException | None = None
        threads.start(threading.Thread(target=self._attempt, name="procctl-cluster-connect", daemon=True))

    def _attempt(self) -> None:
        client: Client | None = None
        error: BaseException | None = None
        deadline = time.monotonic() + self.seconds
        try:
            _refused_at_once(self.address, self.seconds)
            asyncio.run(_shake_hands(self.address, self.seconds))
            client = _open_client(self.address, deadline)
        except (OSError, asyncio.TimeoutError) as exc:
            why = str(exc) or f"no answer as a Dask scheduler within {self.seconds:g}s"
            error = ConnectionError(f"cannot reach the Dask scheduler at {self.address}: {why}")
        except (MemoryError, ValueError, OverflowError):  # garbage on the wire: a bogus length or
            # shape in what Dask's decoder read (the address itself was checked before)
            log.debug("connecting to %s", self.address, exc_info=True)
            error = ConnectionError(f"{self.address} does not answer as a Dask scheduler"
                                    " (its reply is not Dask's protocol)")
        except BaseException as exc:  # noqa: BLE001 - anything else: said as it is
            error = ConnectionError(f"{self.address} does not answer as a Dask scheduler "
                                    f"({type(exc).__name__}: {exc!s:.80})")
        with self._lock:
            if not self._abandoned:
                self._client, self._error, self._done = client, error, True
                self._wake(b"d")
                return
        if client is not None:  # the caller gave up on it
            _close_quietly(client)

    def _wake(self, byte: bytes) -> None:
        try:
            os.write(self._w, byte)
        except OSError:  # the pipe is full: the caller is woken all the same
            pass

    def cancel(self) -> None:
        """Make wait() give up at once (InterruptedError). Safe from a signal handler."""
        if not self._closed:
            self._wake(b"c")

    def wait(self) -> Client:
        """The client; ConnectionError after the timeout, InterruptedError on cancel()."""
        deadline = time.monotonic() + self.seconds + 1.0  # the thread's own bounds come first
        cancelled = False
        while not cancelled:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                break
            cancelled = b"c" in os.read(self._r, 64)
            with self._lock:
                if self._done:
                    break
        with self._lock:
            if self._done:
                if self._error is not None:
                    raise self._error
                assert self._client is not None
                return self._client
            self._abandoned = True
        if cancelled:
            raise InterruptedError(f"the connection to the Dask scheduler at {self.address} was cancelled")
        raise ConnectionError(f"the Dask scheduler at {self.address} did not answer within {self.seconds:g}s")

    def close(self) -> None:
        with self._lock:
            self._abandoned = True  # no write to the pipe from here on
        self._closed = True
        os.close(self._r)
        os.close(self._w)


#: getaddrinfo's answers that a name does not exist (not that the resolver failed for now).
_NO_SUCH_NAME = frozenset(getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name))


def _refused_at_once(address: str, seconds: float) -> None:
    """ConnectionRefusedError at once when nothing listens at the host and port
    of a TCP-based address, tcp:// tls:// ws:// wss:// (Dask's connect would
    try again until its timeout)."""
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp", "tls", "ws", "wss"):
        return
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            return
    except ConnectionRefusedError:
        raise
    except socket.gaierror as exc:
        if exc.errno not in _NO_SUCH_NAME:
            return  # (a resolver that failed for now, EAI_AGAIN: Dask's connect tries again)
        # A name that does not resolve: said at once, with why.
        raise OSError(f"cannot resolve {host.strip('[]')!r}: {exc.strerror or exc}") from None
    except (OSError, ValueError):
        return  # a timeout, say: Dask's connect says what


def _open_client(address: str, deadline: float) -> Client:
    """Dask's client, once the scheduler has shaken hands: asked again while
    time is left if the client trips on its own first message (it asserts that
    the scheduler's first batch holds exactly one message, which a loaded
    scheduler may break by batching another with it)."""
    for attempt in (1, 2, 3):  # (a batch of two is a moment's coincidence: a third trip is not)
        try:
            return Client(address, timeout=max(0.1, deadline - time.monotonic()), set_as_default=False)
        except AssertionError:
            if attempt == 3 or time.monotonic() >= deadline:
                raise
    raise AssertionError("not reached")  # pragma: no cover - the third try returns or raises


async def _shake_hands(address: str, seconds: float) -> None:
    comm = await asyncio.wait_for(comm_connect(address, timeout=seconds), seconds)
    await comm.close()


def _close_quietly(client: Client) -> None:
    try:
        client.close(timeout=SLACK)
    except Exception:  # noqa: BLE001 - closing a client of a dead scheduler
        log.debug("closing the Dask client failed", exc_info=True)


@dataclass
class Node:
    """The client's record of one node (Dask worker) and its agent."""

    index: int
    address: str
    queue: Any = None  # distributed.Queue of its commands
    future: Future[Any] | None = None
    seq: int = 0
    pending: dict[int, list[Any]] = field(default_factory=dict)  # seq -> [Command, last sent]
    answers: dict[int, Any] = field(default_factory=dict)
    heard: float = 0.0  # monotonic time of its last message
    hello: Any = None
    ended: bool = False  # its agent has ended (GONE, or its future is done)
    returned: float = 0.0  # monotonic time its agent's future finished (GONE follows it up)
    lost: str | None = None  # why it was declared lost


class Session:
    """One run's agents on every node of a Dask cluster, as the client sees them.

    Subclasses say what the agents run (`agent_call`) and what their
    messages mean (`on_message`, `on_lost`, both called holding `cond`).
    """

    def __init__(self, address: str | None, cluster: Any, lease: float, connect_timeout: float) -> None:
        self._address = address
        self._cluster = cluster
        try:
            lease_s = check_timeout("lease", lease, allow_none=False)
        except ValueError:  # NaN, negative: one message for every lease that is not > 0
            lease_s = math.nan
        assert lease_s is not None
        if not 0 < lease_s < math.inf:
            raise ValueError(f"lease must be a finite number of seconds > 0, not {lease!r}")
        if lease_s < MIN_LEASE:
            raise ValueError(f"lease must be at least {MIN_LEASE:g} seconds (a node beats every lease/4,"
                             f" through Dask), not {lease!r}")
        # (> 0: at 0, every connect would fail before a scheduler could answer)
        connect_s = check_timeout("connect_timeout", connect_timeout, allow_none=False, positive=True)
        assert connect_s is not None
        scheduler_address(address, cluster)  # checks the arguments before anything starts
        # Huge but finite: "that long", as far as a timer can wait (a day).
        self.lease = min(lease_s, MAX_WAIT)
        self.connect_timeout = min(connect_s, MAX_WAIT)
        self.tick = min(0.25, self.lease / 4)
        self.run_id = uuid.uuid4().hex[:12]
        self.cond = threading.Condition()
        self.nodes: list[Node] = []
        self.client: Client | None = None
        self._up: Any = None
        self._inbox: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        #: Runs after_pass (done callbacks, on_event) after each pass of the
        #: inbox or the keeper: a callback may then call a method that waits
        #: for the nodes' answers, which the inbox reads meanwhile.
        self._deliverer: threading.Thread | None = None
        self._pass_due = False
        self._keeper_stop = threading.Event()  # the keeper's stop
        self._closing = False
        self._kill_requested = False
        self._open_cancelled = False
        self._connecting: Connecting | None = None
        self._lease_sent = 0.0
        self._wall0 = time.time()
        self._t0 = time.monotonic()
        #: Events waiting for on_event (appended holding `cond`), told by `_emit_events`.
        self._events: list[Event] = []
        self._emitting = threading.RLock()
        self._on_event: Callable[[Event], None] | None = None

    # -- what subclasses give --------------------------------------------------------

    def agent_call(self, spec: AgentSpec) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        raise NotImplementedError

    def on_message(self, node: Node, msg: Message) -> None:
        raise NotImplementedError

    def on_lost(self, node: Node, why: str) -> None:
        raise NotImplementedError

    def _emit_events(self, block: bool = True) -> None:
        """Tell on_event the events so far: one thread at a time, so that it
        sees them in order.

        `block=False` is for a thread that holds a lock an on_event callback
        may take (a command's): while another thread tells events (the
        deliverer, maybe inside a callback that waits for that very lock),
        it leaves them to that thread, which looks again before it lets go,
        instead of waiting for it.
        """
        while True:
            if not self._emitting.acquire(blocking=block):
                return
            try:
                while True:
                    with self.cond:
                        events, self._events = self._events, []
                    if not events or self._on_event is None:
                        break
                    for event in events:
                        try:
                            self._on_event(event)
                        except Exception:
                            log.exception("on_event callback failed for %s", event)
            finally:
                self._emitting.release()
            with self.cond:  # (what a thread that gave way added meanwhile)
                if not self._events:
                    return

    def after_pass(self) -> None:
        """Called by the deliverer thread after each pass of the inbox or the
        keeper, without the lock."""

    def in_deliverer(self) -> bool:
        """Called from the thread that runs after_pass (a done callback, on_event)."""
        return threading.current_thread() is self._deliverer

    # -- start and close ---------------------------------------------------------------

    def open(self, grace: float, start_timeout: float = START_TIMEOUT) -> None:
        """Connect, start one agent per node, and return once each said hello.

        InterruptedError when `cancel_open()` (or `cancel_opening()`) came meanwhile."""
        _OPENING.add(self)
        try:
            self._open(grace, start_timeout)
        finally:
            _OPENING.discard(self)

    def cancel_open(self) -> None:
        """Make an open() under way give up at once (InterruptedError). Safe from a signal handler."""
        self._open_cancelled = True
        attempt = self._connecting
        if attempt is not None:
            attempt.cancel()
        self.notify_soon()

    def notify_soon(self) -> None:
        """Wake every wait on `cond` without blocking (safe from a signal handler).

        When another thread holds the lock for a moment (the keeper, a send),
        a thread of ours notifies once it lets go; else the wait would last
        until the next message from a node, up to a quarter of the lease.
        """
        if self.cond.acquire(blocking=False):
            try:
                self.cond.notify_all()
            finally:
                self.cond.release()
        else:
            threads.start(threading.Thread(target=self._notify_all, name="procctl-cluster-notify", daemon=True))

    def _notify_all(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _open(self, grace: float, start_timeout: float) -> None:
        address = scheduler_address(self._address, self._cluster)
        seconds = check_timeout("connect_timeout", self.connect_timeout, allow_none=False)
        assert seconds is not None
        attempt = self._connecting = Connecting(address, seconds)
        try:
            if self._open_cancelled:
                attempt.cancel()
            self.client = attempt.wait()
        finally:
            self._connecting = None
            attempt.close()
        try:
            self.client.wait_for_workers(1, timeout=self.connect_timeout)
        except TimeoutError:
            raise ConnectionError(
                f"the Dask cluster at {scheduler_address(self._address, self._cluster)} has no workers"
            ) from None
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"])
        names, up = queue_names(self.run_id, len(workers))
        self._up = Queue(up, client=self.client)
        beat = max(MIN_BEAT, self.lease / 4)
        for i, addr in enumerate(workers):
            node = Node(i, addr, Queue(names[i], client=self.client), heard=time.monotonic())
            self.nodes.append(node)
            # The scheduler says at once when a Dask worker dies or leaves. With
            # allowed-failures above 0 (Dask's default; local_cluster() sets 0), its
            # pinned agent is only queued again, and we would hear of it only once
            # the lease ran out.
            self.client.subscribe_topic(addr, partial(self._on_node_event, node))
        for node in self.nodes:
            spec = AgentSpec(self.run_id, node.index, names[node.index], up, self.lease, beat, grace,
                             f"procctl-{self.run_id}-claim-{node.index}", len(self.nodes))
            fn, args = self.agent_call(spec)
            # A node agent runs once, on its node: never on another worker, never
            # again after its worker died (the claim Event guards the scheduler's
            # re-runs where allowed-failures is not 0).
            node.future = self.client.submit(
                fn, spec, *args, key=f"procctl-agent-{self.run_id}-{node.index}", workers=[node.address],
                allow_other_workers=False, pure=False, retries=0,
            )
            node.future.add_done_callback(lambda fut, n=node: self._agent_done(n, fut))
        self._inbox = threading.Thread(target=self._serve_inbox, name="procctl-cluster-inbox", daemon=True)
        threads.start(self._inbox)
        self._keeper = threading.Thread(target=self._keep, name="procctl-cluster-lease", daemon=True)
        threads.start(self._keeper)
        self._deliverer = threading.Thread(target=self._deliver, name="procctl-cluster-deliver", daemon=True)
        threads.start(self._deliverer)
        with self.cond:
            ok = self.cond.wait_for(lambda: self._open_cancelled
                                    or all(n.hello is not None or n.ended for n in self.nodes), start_timeout)
        if self._open_cancelled:
            raise InterruptedError("the start of the node agents was cancelled")
        if not ok:
            slow = [n.address for n in self.nodes if n.hello is None]
            raise TimeoutError(f"the node agents on {slow} did not start within {start_timeout:.0f}s")

    def agent_error(self) -> str | None:
        """Why the first agent that ended before its hello failed, if one did."""
        for node in self.nodes:
            if node.hello is None and node.ended:
                return f"node {node.address}: {node.lost or 'the agent ended'}"
        return None

    def release(self) -> None:
        """Stop the inbox, forget the queues, close the client (and the cluster we made)."""
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        self._keeper_stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(SLACK)
        if self._up is not None:
            try:
                self._up.put([])  # wakes the inbox
            except Exception:  # noqa: BLE001 - the scheduler may be gone: the tick ends it
                pass
        if self._inbox is not None and self._inbox is not threading.current_thread():
            self._inbox.join(self.tick + SLACK)
        if self._deliverer is not None and self._deliverer is not threading.current_thread():
            self._deliverer.join(self.tick + SLACK)
        if self.client is not None:
            for node in self.nodes:
                if node.future is not None and not node.future.done():
                    node.future.cancel()
            for q in [self._up] + [node.queue for node in self.nodes]:
                close_queue(q)
            for node in self.nodes:  # (the scheduler keeps a closed client's subscriptions)
                try:
                    self.client.unsubscribe_topic(node.address)
                except Exception:  # noqa: BLE001 - a dead scheduler: nothing is kept there
                    log.debug("unsubscribing from %s failed", node.address, exc_info=True)
            try:
                self.client.close(timeout=SLACK)
            except Exception:  # noqa: BLE001 - closing a client of a dead scheduler
                log.debug("closing the Dask client failed", exc_info=True)

    # -- commands ------------------------------------------------------------------------

    def send(self, node: Node, op: Op, arg: Any = None, *, keep_answer: bool = True) -> int:
        """Send one command to `node`; its answer lands in node.answers[seq]
        (unless `keep_answer` is False). Sent again until answered."""
        with self.cond:
            node.seq += 1
            seq = node.seq
            cmd = Command(seq, op, arg)
            node.pending[seq] = [cmd, time.monotonic(), keep_answer]
        self._put(node, cmd)
        return seq

    def ask_all(self, op: Op, arg: Any, timeout: float | None,
                only: Mapping[int, Any] | None = None) -> dict[int, Any]:
        """Send `op` to every live node (with `only`, to the nodes it names, each
        with its own arg); {node index: answer} of those that answered within
        `timeout` (None: no limit), lost nodes left out."""
        live = [n for n in self.nodes if not n.ended and n.lost is None and (only is None or n.index in only)]
        seqs = {n.index: self.send(n, op, arg if only is None else only[n.index]) for n in live}
        with self.cond:
            wait_for(self.cond, lambda: all(s in self.nodes[i].answers or self.nodes[i].ended or self.nodes[i].lost
                                            for i, s in seqs.items()), timeout)
            out = {}
            for i, s in seqs.items():
                node = self.nodes[i]
                if s in node.answers:
                    out[i] = node.answers.pop(s)
                node.pending.pop(s, None)
            return out

    def _put(self, node: Node, cmd: Command) -> None:
        try:
            node.queue.put(encode(cmd), timeout=SLACK)
        except Exception as exc:  # noqa: BLE001 - a lost put is sent again, or the node lost
            log.debug("command %s to %s not sent: %r", cmd, node.address, exc)

    def request_kill(self) -> None:
        """Have the inbox thread send KILL to every node. Safe from a signal handler."""
        self._kill_requested = True

    # -- the inbox thread ---------------------------------------------------------------------

    def _serve_inbox(self) -> None:
        # No timeout on the get (a timed-out get is an error in the
        # scheduler's log): the keeper thread keeps the time, release() wakes us.
        while True:
            try:
                batch = self._up.get()
            except Exception as exc:  # noqa: BLE001 - the scheduler went away
                if self._closing:
                    return
                log.debug("the up queue failed: %r", exc)
                self._lose_all(f"the Dask scheduler is unreachable ({exc!r:.80})")
                return
            now = time.monotonic()
            with self.cond:
                if self._closing:
                    return
                for data in batch or ():
                    try:
                        msg = decode(data)
                    except BaseException:  # noqa: BLE001 - one that cannot be read here (a class we
                        # cannot import, one whose unpickling calls sys.exit): never the end of the inbox
                        log.exception("procctl: cannot read a message from a node")
                        continue
                    if isinstance(msg, Message) and 0 <= msg.node < len(self.nodes):
                        node = self.nodes[msg.node]
                        node.heard = now
                        try:
                            self._take(node, msg)
                        except Exception:  # one bad message must not end the inbox
                            log.exception("procctl: cannot take %r", msg)
                self._pass_due = True
                self.cond.notify_all()
            # Hold no result while we wait for the next batch: the caller who
            # took it may be its only holder (as ProcessPoolExecutor's manager
            # drops its result_item, bpo-14406).
            batch = data = msg = None

    def _keep(self) -> None:
        """Each tick: renew the leases, send again what was not answered, send
        a requested kill, declare lost a node silent for longer than its lease."""
        while not self._keeper_stop.wait(self.tick):
            resend: list[tuple[Node, Command]] = []
            now = time.monotonic()
            with self.cond:
                for node in self.nodes:
                    if node.ended or node.lost is not None:
                        continue
                    if node.returned and now - node.returned > RESEND_AFTER + self.tick:
                        node.ended = True
                        self._lose(node, "its agent ended without a word")
                        continue
                    if now - node.heard > self.lease + self.tick:
                        self._lose(node, f"its agent has not answered for {now - node.heard:.1f}s")
                        continue
                    for entry in node.pending.values():
                        if now - entry[1] >= RESEND_AFTER:  # (math.inf: under way)
                            entry[1] = now
                            resend.append((node, entry[0]))
                live = [n for n in self.nodes if not n.ended and n.lost is None]
            for node, cmd in resend:
                self._put(node, cmd)
            if self._kill_requested:
                self._kill_requested = False
                for node in live:
                    self.send(node, Op.KILL, keep_answer=False)
            if now - self._lease_sent >= self.lease / 4:
                self._lease_sent = now
                for node in live:
                    self._put(node, Command(0, Op.LEASE))
            with self.cond:
                self._pass_due = True
                self.cond.notify_all()

    def _deliver(self) -> None:
        """after_pass after each pass, until release()."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self._pass_due or self._closing)
                if self._closing:
                    return
                self._pass_due = False
            self.after_pass()

    def _take(self, node: Node, msg: Message) -> None:
        if msg.kind is Up.HELLO:
            node.hello = msg.body
        elif msg.kind is Up.ACK:
            if isinstance(msg.body, tuple) and msg.body[:1] == ("accepted",):
                if msg.seq in node.pending:
                    node.pending[msg.seq][1] = math.inf  # under way: the agent answers when done
                return
            entry = node.pending.pop(msg.seq, None)
            if entry is not None and entry[2]:
                node.answers[msg.seq] = msg.body
        elif msg.kind is Up.GONE:
            if msg.body and not node.ended and node.hello is not None and not self._closing:
                self._lose(node, str(msg.body))  # an agent that ended by itself: what it held goes elsewhere
            node.ended = True
            if node.lost is None and msg.body:
                node.lost = str(msg.body)
        if msg.kind is not Up.BEAT:
            self.on_message(node, msg)

    def _agent_done(self, node: Node, fut: Future[Any]) -> None:
        # In the client's event loop thread: only bookkeeping here. A failed
        # agent's exception is fetched by a thread of ours: fetching it here
        # would wait on this very loop (a "timed out after 0 s" instead of the error).
        if fut.status == "error":
            threads.start(threading.Thread(target=self._agent_failed, args=(node, fut),
                                           name="procctl-cluster-agent-error", daemon=True))
            return
        why = "its agent was cancelled" if fut.status == "cancelled" else None
        with self.cond:
            if not node.ended:
                if why is None:
                    # Returned: its last messages (GONE) are in the up queue,
                    # flushed before it returned; the inbox takes them.
                    node.returned = time.monotonic()
                else:
                    node.ended = True
                    self._lose(node, why)
            self.cond.notify_all()

    def _on_node_event(self, node: Node, event: Any) -> None:
        """The scheduler's events about `node`'s Dask worker (in the client's event
        loop thread: only bookkeeping here, as in _agent_done)."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else None
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        with self.cond:
            if not node.ended and not self._closing:
                node.ended = True
                self._lose(node, "its Dask worker left the cluster (it died, or was retired)")
            self.cond.notify_all()

    def _agent_failed(self, node: Node, fut: Future[Any]) -> None:
        try:
            exc = fut.exception(timeout=SLACK)
        except Exception as err:  # noqa: BLE001 - the scheduler is gone meanwhile
            exc = err
        with self.cond:
            if not node.ended:
                node.ended = True
                self._lose(node, f"{type(exc).__name__}: {exc}")
            self.cond.notify_all()

    def _lose(self, node: Node, why: str) -> None:
        if node.lost is not None:
            return
        node.lost = why
        log.info("node %s lost: %s", node.address, why)
        if node.future is not None and not node.future.done() and not self._closing:
            # Never re-run: a lost agent is stopped by its lease, not replaced.
            threading.Thread(target=node.future.cancel, daemon=True).start()
        self.on_lost(node, why)
        self.cond.notify_all()

    def _lose_all(self, why: str) -> None:
        with self.cond:
            for node in self.nodes:
                if not node.ended:
                    self._lose(node, why)
                    node.ended = True
            self.cond.notify_all()

    def elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def t_of(self, wall: float) -> float:
        """An agent's wall-clock time as seconds since this run started."""
        return round(max(0.0, wall - self._wall0), 6)


def check_answer(node: Node, answer: Any) -> Any:
    """A node's answer to a command; RuntimeError if applying it raised there."""
    if isinstance(answer, tuple) and answer[:1] == ("error",):
        raise RuntimeError(f"node {node.address}: {answer[1]}")
    return answer


def check_workers_per_node(workers_per_node: Any) -> None:
    """ValueError naming `workers_per_node` unless it is a count this machine can start
    (each node is a machine like it, as a rule; the nodes check again)."""
    if isinstance(workers_per_node, bool) or not isinstance(workers_per_node, int) or workers_per_node < 1:
        raise ValueError(f"workers_per_node must be a positive integer, not {workers_per_node!r}")
    too_many = capacity_problem(workers_per_node)
    if too_many is not None:
        raise ValueError(f"workers_per_node={workers_per_node} is more than this system lets us start: {too_many}")


#: The sessions whose open() is under way, for cancel_opening().
_OPENING: set[Session] = set()


def cancel_opening() -> None:
    """Make every ClusterController start and ClusterExecutor construction under
    way in this process give up at once (InterruptedError): the command line's
    answer to SIGINT or SIGTERM while it connects. Safe from a signal handler."""
    for session in list(_OPENING):
        session.cancel_open()


def close_queue(q: Any) -> None:
    """Drop our reference to a Dask queue: the scheduler frees it with the last one."""
    if q is not None:
        try:
            q.close()
        except Exception:  # noqa: BLE001 - the client or the scheduler is already gone
            log.debug("closing a Dask queue failed", exc_info=True)


def claim(name: str) -> bool:
    """True the first time an agent with this claim starts; a re-run by the
    scheduler (allowed-failures) finds it taken and does nothing."""
    event = DaskEvent(name)
    if event.is_set():
        return False
    event.set()
    return True


#: The sampling profiler (every 10 ms) and the event-loop tick check (every 20 ms)
#: feed a dashboard a local cluster does not have: off, an idle cluster of 2 nodes
#: costs 0.06 CPU-seconds a second instead of 0.21 (measured).
NO_DIAGNOSTICS = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s"}


def local_cluster(n_workers: int, threads_per_worker: int = 2) -> Any:
    """A LocalCluster of `n_workers` worker processes, set up as procctl needs it:
    no re-run of a task whose worker died, worker processes that may start children."""
    from distributed import LocalCluster

    with dask.config.set({**NO_DIAGNOSTICS, "distributed.scheduler.allowed-failures": 0,
                          "distributed.worker.daemon": False}):
        # No dashboard, and the scheduler's HTTP server (which it starts all the same)
        # on a free port: its default, 8787, taken by another cluster is a warning on stderr.
        # Dask's warnings as a cluster closes (a node agent's task cancelled) are not the run's:
        # errors only, as for --quiet a terminal wants nothing else.
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                               silence_logs=logging.ERROR)
    try:
        with Client(cluster, set_as_default=False) as client:
            client.register_plugin(IgnoreGroupSignals(), name="procctl-ignore-group-signals")
    except BaseException:
        cluster.close()
        raise
    return cluster


class IgnoreGroupSignals(WorkerPlugin):
    """A Ctrl-C at a terminal, or a SIGTERM to the whole process group, reaches
    a local cluster's worker processes too: they leave it to whoever owns the
    cluster (`procctl run/map --cluster local:N` stops its run gracefully, then
    closes them), instead of dying under the run and taking its workers with
    them. Closing the cluster does not need either signal: the nanny asks its
    worker process to stop, then kills it."""

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
