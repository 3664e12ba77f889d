"""Controller-owned channels: the manager side (the broker).

    producer worker --PUT--> +--------------------+ --ITEM--> consumer worker
                    <-CREDIT-|  broker thread     | <--GET---
    pc.channels[n].put() --> |  one deque a chan  | --> pc.channels[n].get()
                             +--------------------+

The manager is the single owner of every channel: items live in its deques,
and it sends a worker items only as far as that worker asked (GET carries a
count: a consumer keeps a small window of items coming, so it never waits
for a round trip per item), so it knows at every moment which items each
worker may hold.  Items sent and not yet read wait in the worker's socket,
where the broker can take them back: when the workers are PAUSED (a paused
worker holds nothing; the requests stay, dormant, until RUNNING) and when a
worker ends, for whatever reason, the broker reads back from its copy of the
worker's socket whatever the worker never read (see workwire.py) and puts
those items back at the head of their channel.  An item a worker had to
read past (waiting for a put credit behind it) it gives back (UNGET) at
PAUSED or STOPPED.  So, per channel, once the controller has stopped:
``put == got + drained``, exactly.

A bounded channel grants put credits to producers while it has room
(``queued + credits <= maxsize``); a producer without credit waits for them,
and a STOPPED broadcast wakes it.  The broker runs in its own thread, as
multiprocessing.Queue's feeder does, so channels flow while the caller's
thread is busy elsewhere.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import threads, workwire
from .channel import InheritedFd
from .errors import Closed
from .states import State
from .workwire import Kind, Message

log = logging.getLogger("procctl")

#: Credits a producer gets at a time on an unbounded channel (on a bounded one,
#: an eighth of its room, up to this many).
UNBOUNDED_GRANT = 1 << 20


@dataclass(frozen=True)
class ChannelStats:
    """The accounting of one channel.

    ``put`` items were accepted, ``got`` taken by a consumer (counting an item
    in flight to a worker until it is read back), ``drained`` removed by
    `drain()`, `stop()` or `close()` of the controller, ``queued`` wait.
    Once the workers have ended, ``put == got + drained + queued``.
    """

    put: int
    got: int
    drained: int
    queued: int


class _Chan:
    __slots__ = ("name", "cid", "maxsize", "items", "consumers", "wanting", "credits", "reclaiming",
                 "put", "got", "drained", "closed", "leftovers", "ungot")

    def __init__(self, name: str, cid: int, maxsize: int) -> None:
        self.name, self.cid, self.maxsize = name, cid, maxsize
        self.items: deque[bytes] = deque()
        self.consumers: deque[_Link] = deque()  # workers with an open GET, served in turn
        self.wanting: deque[_Link] = deque()  # producers waiting for credits
        self.credits: dict[int, int] = {}  # worker id -> credits granted, unspent
        self.reclaiming: set[int] = set()  # workers asked to give back their credits, not yet answered
        self.put = self.got = self.drained = 0
        self.closed = False
        self.leftovers: list[bytes] = []  # drained by stop(), for drain()
        #: The worker whose items read past (UNGET) are the first in line, and
        #: how many: its next one goes behind them, so they stay in order.
        self.ungot: tuple[_Link, int] | None = None

    def room(self) -> int:
        if not self.maxsize:
            return 1 << 30
        return self.maxsize - len(self.items) - sum(self.credits.values())

    def hoarded(self) -> bool:
        """Full only by the credits workers hold: there is room for items."""
        return bool(self.maxsize) and len(self.items) < self.maxsize and self.room() <= 0


class _Link:
    """The broker's record of one worker's link."""

    __slots__ = ("wid", "sock", "child", "asked", "stalled", "closed", "sending", "unsent", "refused")

    def __init__(self, wid: int) -> None:
        self.wid = wid
        self.sock, self.child = workwire.pair()
        self.sock.setblocking(False)
        self.child.setblocking(False)
        self.asked: dict[int, int] = {}  # channel id -> items the worker asked for, not yet sent
        self.stalled = False  # its socket is full: wait until it is writable
        # Held from the moment a message for this worker is decided (under the
        # plane's lock) until it is sent (after it): messages go out in the
        # order they were decided, and a take-back waits for those in flight.
        self.sending = threading.Lock()
        self.unsent: list[tuple[Kind, int, int, bytes]] = []  # replies a full socket refused
        #: Messages its full socket refused, in order, not yet put back (by the
        #: flush that was refused, or first by a take-back that follows it):
        #: written only by whoever holds `sending`, taken under the plane's lock.
        self.refused: list[tuple[_Link, Kind, int, int, bytes]] = []
        self.closed = False


class _Locked:
    """`with plane._locked():` (a class, not contextlib's: one per put)."""

    __slots__ = ("plane",)

    def __init__(self, plane: ChannelPlane) -> None:
        self.plane = plane

    def __enter__(self) -> None:
        self.plane._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.plane._unlock()


class ChannelPlane:
    """Every channel of one controller, and the thread that brokers them."""

    def __init__(self, spec: dict[str, int]) -> None:
        self._chans: dict[str, _Chan] = {}
        for name, maxsize in spec.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"channel names must be non-empty strings, not {name!r}")
            if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
                raise ValueError(f"channels[{name!r}] must be a maxsize >= 0 (0: unbounded), not {maxsize!r}")
            self._chans[name] = _Chan(name, len(self._chans), maxsize)
        self._by_id = list(self._chans.values())
        self.channels = {name: Channel(self, c) for name, c in self._chans.items()}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiters = 0  # manager threads waiting on _changed (none: no notify per item)
        # Messages decided under the lock, sent after it is released, so that
        # the broker's sends never hold up the caller's put() (and back).
        self._outbox: list[tuple[_Link, Kind, int, int, bytes]] = []
        self._claimed: list[_Link] = []
        self._locked_cm = _Locked(self)
        self._links: dict[int, _Link] = {}
        self._stopping = False
        self._paused = False
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    def _locked(self) -> _Locked:
        """The plane's lock; what was decided under it is sent once it is released."""
        return self._locked_cm

    def _unlock(self) -> None:
        outbox, claimed = self._outbox, self._claimed
        # Decided under the lock: once it is released, lists left in place (this
        # session posted nothing) are another thread's to fill and to flush.
        posted = bool(outbox or claimed)
        if posted:
            self._outbox, self._claimed = [], []
        self._lock.release()
        if posted:
            self._flush(outbox, claimed)

    def _notify(self) -> None:
        if self._waiters:
            self._changed.notify_all()

    def _wait(self, end: float | None) -> bool:
        self._waiters += 1
        try:
            return self._changed.wait(workwire.remaining(end))
        finally:
            self._waiters -= 1

    def _claim(self, link: _Link) -> None:
        # Called under the lock: the lock orders the claims, the sends follow it.
        if link not in self._claimed:
            link.sending.acquire()
            self._claimed.append(link)

    def _post(self, link: _Link, kind: Kind, cid: int, tag: int = 0, payload: bytes = b"") -> None:
        self._claim(link)
        self._outbox.append((link, kind, cid, tag, payload))

    def _flush(self, outbox: list[tuple[_Link, Kind, int, int, bytes]], claimed: list[_Link]) -> None:
        full: set[_Link] = set()
        pack, inline = workwire.HEADER.pack, workwire.MAX_INLINE
        try:
            for entry in outbox:
                link, kind, cid, tag, payload = entry
                if link in full or link.refused:
                    # Keep the order: nothing after a refusal, this flush's or
                    # an earlier one's whose messages are not back in line yet.
                    link.refused.append(entry)
                    full.add(link)
                    continue
                try:
                    if len(payload) <= inline:
                        link.sock.send(pack(kind, cid, tag) + payload)  # (workwire.send, inline)
                    else:
                        workwire.send(link.sock, kind, cid, tag, payload)
                except OSError as exc:  # full (BlockingIOError), or the worker is gone
                    log.debug("cannot send %s to worker %d (%r)", kind.name, link.wid, exc)
                    full.add(link)
                    link.refused.append(entry)
        finally:
            for link in claimed:
                link.sending.release()
        if full:
            with self._locked():
                # (A take-back may have put them back first: then there is nothing left here.)
                refused = [entry for link in full for entry in self._take_refused(link)]
                if refused:
                    self._refused(refused)

    def _take_refused(self, link: _Link) -> list[tuple[_Link, Kind, int, int, bytes]]:
        """What `link`'s socket refused, taken once no flush to it is under way
        (one may be adding to it); called under the lock."""
        self._claim(link)
        refused, link.refused = link.refused, []
        return refused

    def _refused(self, refused: list[tuple[_Link, Kind, int, int, bytes]]) -> None:
        """Messages a worker's socket did not take: items go back first in line
        (asked for again), replies wait; the link is served again once writable,
        and the items back in line go to the other workers that asked meanwhile."""
        returned: set[int] = set()
        for link, kind, cid, tag, payload in reversed(refused):
            if kind is Kind.ITEM:
                self._unsend(link, cid, payload)
                returned.add(cid)
            elif kind is Kind.CLOSED:
                # Said again once the items put back have gone out.
                self._unsend(link, cid, None)
            elif not link.closed:
                link.unsent.insert(0, (kind, cid, tag, payload))
        for link in {entry[0] for entry in refused}:
            if not link.closed and not link.stalled:
                link.stalled = True
                if self._selector is not None:
                    self._selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        # Nothing else may come to serve them: the refused worker may have ended
        # meanwhile (its take-back ran before these were back in line), and the
        # others wait for the items they asked for, the channel full with them.
        for cid in returned:
            self._serve_waiting(self._by_id[cid])

    # -- the controller's hooks --------------------------------------------------

    def wire_spec(self) -> dict[str, tuple[int, int]]:
        """What a worker needs to know: name -> (channel id, maxsize)."""
        return {c.name: (c.cid, c.maxsize) for c in self._by_id}

    def attach(self, wid: int) -> tuple[InheritedFd, int | None]:
        """A new link for worker `wid` (at each spawn): the end to pass to the
        child, and the fd for the controller's selector (None: ours)."""
        self._start()
        link = _Link(wid)
        with self._locked():
            old = self._links.get(wid)
            if old is not None and not old.closed:
                self._end_link(old)
            self._links[wid] = link
            assert self._selector is not None
            self._selector.register(link.sock, selectors.EVENT_READ, link)
        self._wake()
        return InheritedFd(link.child.fileno()), None

    def readable(self, wid: int) -> None:  # pragma: no cover - the broker has its own selector
        pass

    def ended(self, wid: int, report: Any = None) -> None:
        """Worker `wid` has ended: take back what it never read."""
        with self._locked():
            link = self._links.get(wid)
            if link is not None and not link.closed:
                self._end_link(link)

    def posted(self, state: State) -> None:
        """A command was broadcast. PAUSED: serve no worker's get until RUNNING
        (the workers withdraw them); STOPPED: wake the manager's blocked puts and gets."""
        with self._locked():
            if state is State.PAUSED:
                # Nothing more goes out; what each worker has not read comes
                # back once it has paused (acknowledged).
                self._paused = True
            elif state is State.RUNNING:
                self._paused = False
                for chan in self._by_id:
                    self._serve_waiting(chan)
            else:
                self._stopping = True
            self._notify()

    def acknowledged(self, wid: int, state: State) -> None:
        """Worker `wid` has paused: what it has not read comes back, first in
        line. Not before: a worker that has not seen PAUSED yet still reads its
        link, and two readers of one socket would split the items between
        them, out of order."""
        if state is not State.PAUSED:
            return
        with self._locked():
            link = self._links.get(wid)
            if self._paused and link is not None and not link.closed:
                self._take_back(link)
                for chan in self._by_id:
                    if chan.items:
                        self._notify()

    def settle(self) -> None:
        """Every worker acknowledged a broadcast. What each sent before its
        acknowledgement (puts, items given back) is in its socket by now:
        read it here, so that when pause() returns the channels count it."""
        with self._locked():
            for link in self._links.values():
                if not link.closed:
                    self._read(link)

    def release(self) -> None:
        """Every worker has ended: drain what is left, stop the broker."""
        with self._locked():
            self._stopping = True
            for link in list(self._links.values()):
                if not link.closed:
                    self._end_link(link)
        # (Then: what was on its way to an ended worker is back in line.)
        with self._locked():
            for chan in self._by_id:
                self._drain_into_leftovers(chan)
            self._notify()
        thread = self._thread
        if thread is not None:
            self._wake(stop=True)
            thread.join()
            self._thread = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the broker thread ---------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._quit = False
        self._thread = threading.Thread(target=self._serve, name="procctl-channels", daemon=True)
        threads.start(self._thread)

    def _wake(self, stop: bool = False) -> None:
        if stop:
            self._quit = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def _serve(self) -> None:
        selector = self._selector
        assert selector is not None
        while not self._quit:
            for key, events in selector.select():
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                with self._locked():
                    link = key.data
                    if link.closed:
                        continue
                    if events & selectors.EVENT_READ:
                        self._read(link)
                    if events & selectors.EVENT_WRITE and link.stalled and not link.closed:
                        self._unstall(link)

    # -- messages (called with the lock held) -------------------------------------

    def _read(self, link: _Link) -> None:
        for msg in workwire.recv_all(link.sock):
            self._handle(link, msg)

    def _handle(self, link: _Link, msg: Message) -> None:
        chan = self._by_id[msg.channel]
        kind = msg.kind
        if kind is Kind.PUT:
            credits = chan.credits.get(link.wid, 0)
            if chan.maxsize and credits:
                chan.credits[link.wid] = credits - 1
            self._accept(chan, msg.payload)
        elif kind is Kind.GET:
            link.asked[chan.cid] = link.asked.get(chan.cid, 0) + max(1, msg.tag)
            if link not in chan.consumers:
                chan.consumers.append(link)
            self._serve_waiting(chan)
        elif kind is Kind.CANCEL:
            # Withdraw the whole request; items already sent arrive before the reply.
            link.asked.pop(chan.cid, None)
            if link in chan.consumers:
                chan.consumers.remove(link)
            self._reply(link, Kind.CANCELLED, chan.cid)
        elif kind is Kind.UNGET:
            chan.got -= 1
            ungot = chan.ungot
            if ungot is not None and ungot[0] is link:
                chan.items.insert(ungot[1], msg.payload)
                chan.ungot = (link, ungot[1] + 1)
            else:
                chan.items.appendleft(msg.payload)
                chan.ungot = (link, 1)
            self._serve_waiting(chan)
        elif kind is Kind.WANT:
            if link not in chan.wanting:
                chan.wanting.append(link)
            self._grant(chan)
        elif kind is Kind.UNWANT:
            if link in chan.wanting:
                chan.wanting.remove(link)
            self._reply(link, Kind.UNWANTED, chan.cid)
        elif kind is Kind.RETURN:
            left = chan.credits.get(link.wid, 0) - msg.tag
            if left > 0:
                chan.credits[link.wid] = left
            else:
                chan.credits.pop(link.wid, None)
            chan.reclaiming.discard(link.wid)
            self._grant(chan)

    def _accept(self, chan: _Chan, payload: bytes) -> None:
        chan.put += 1
        if chan.closed:
            # Only the controller closes; an item that arrives after is drained.
            chan.drained += 1
            chan.leftovers.append(payload)
            return
        chan.items.append(payload)
        if chan.consumers and not self._paused:
            self._serve_waiting(chan)
        else:
            self._notify()

    def _serve_waiting(self, chan: _Chan) -> None:
        """Send queued items to the workers that asked, in turn; then tell those
        still asking on a closed, empty channel that it is closed."""
        if self._paused:
            return
        consumers, items, cid = chan.consumers, chan.items, chan.cid
        outbox, claimed, item = self._outbox, self._claimed, Kind.ITEM
        sent = 0
        while items and consumers:
            link = consumers.popleft()
            if link.stalled or link.closed:
                # Its socket is full of items it has not read: served again
                # once it is writable (the broker's selector says when).
                continue
            if link not in claimed:  # (_claim, inline: this is the path of every item)
                link.sending.acquire()
                claimed.append(link)
            outbox.append((link, item, cid, 0, items.popleft()))
            sent += 1
            left = link.asked[cid] - 1
            if left:
                link.asked[cid] = left
                consumers.append(link)
            else:
                del link.asked[cid]
        if items:
            self._notify()
        elif chan.closed or self._stopping:
            while consumers:
                link = consumers.popleft()
                link.asked.pop(cid, None)
                self._reply(link, Kind.CLOSED, cid)
        if sent:
            chan.got += sent
            chan.ungot = None  # (the first in line went out)
            self._grant(chan)

    def _unstall(self, link: _Link) -> None:
        link.stalled = False
        if self._selector is not None:
            self._selector.modify(link.sock, selectors.EVENT_READ, link)
        unsent, link.unsent = link.unsent, []
        for kind, cid, tag, payload in unsent:
            self._post(link, kind, cid, tag, payload)
        for cid in list(link.asked):
            chan = self._by_id[cid]
            if link not in chan.consumers:
                chan.consumers.append(link)
            self._serve_waiting(chan)

    def _grant(self, chan: _Chan) -> None:
        """Give credits to waiting producers while the channel has room (a closed
        one has room for all: what is put there is drained, and no sender may stay
        blocked on a channel nobody will read)."""
        if not chan.maxsize or chan.closed:
            while chan.wanting:
                link = chan.wanting.popleft()
                self._reply(link, Kind.CREDIT, chan.cid, UNBOUNDED_GRANT)
            return
        while chan.wanting:
            room = chan.room()
            if room <= 0:
                break
            link = chan.wanting.popleft()
            # An eighth of the room at a time, at most as much as an unbounded
            # channel's grant (a frame's tag holds it, whatever the maxsize).
            n = min(room, max(1, chan.maxsize // 8), UNBOUNDED_GRANT)
            chan.credits[link.wid] = chan.credits.get(link.wid, 0) + n
            self._reply(link, Kind.CREDIT, chan.cid, n)
        if chan.wanting and chan.hoarded():
            self._reclaim(chan)
        self._notify()

    def _reclaim(self, chan: _Chan) -> bool:
        """A producer waits while the channel has room that other workers hold
        as credits (granted ahead, for a put they may never make): ask them
        back. Each gives back what it does not need now, at its next read of
        its link (a worker keeps the one its own waiting put needs). True
        if it asked anyone."""
        asked = False
        for wid, n in chan.credits.items():
            if n > 0 and wid not in chan.reclaiming:
                link = self._links.get(wid)
                if link is not None and not link.closed:
                    chan.reclaiming.add(wid)
                    self._reply(link, Kind.RECLAIM, chan.cid)
                    asked = True
        return asked

    def _reply(self, link: _Link, kind: Kind, cid: int, tag: int = 0) -> None:
        if link.closed:
            return
        if link.stalled:
            link.unsent.append((kind, cid, tag, b""))
        else:
            self._post(link, kind, cid, tag)

    def _take_back(self, link: _Link) -> None:
        """Read back what the worker has not read: its items go first in line
        again (their requests stay open), its other messages go back in order."""
        msgs = self._unread(link)
        for kind, cid, _, payload in reversed(msgs):
            if kind is Kind.ITEM:
                self._unsend(link, cid, payload)
            elif kind is Kind.CLOSED:
                self._unsend(link, cid, None)  # said again after the items
        for kind, cid, tag, _ in msgs:
            if kind is not Kind.ITEM and kind is not Kind.CLOSED:
                self._reply(link, kind, cid, tag)

    def _unread(self, link: _Link) -> list[tuple[Kind, int, int, bytes]]:
        """What never reached `link`'s worker, in the order it was sent: what
        its socket holds (read back here), then what the socket refused.
        Once what is on its way to it has arrived (the claim)."""
        self._claim(link)
        msgs = [(m.kind, m.channel, m.tag, m.payload) for m in workwire.recv_all(link.child)]
        return msgs + [entry[1:] for entry in self._take_refused(link)]

    def _unsend(self, link: _Link, cid: int, payload: bytes | None) -> None:
        """An item (None: a CLOSED reply) that did not reach the worker: the
        item goes first in line again, and the worker's request stays open."""
        chan = self._by_id[cid]
        if payload is not None:
            chan.got -= 1
            # Behind the items this worker read past and gave back (it read
            # them first), ahead of the rest; callers go from the last item
            # to the first, so each lands before the one sent after it.
            ungot = chan.ungot
            chan.items.insert(ungot[1] if ungot is not None and ungot[0] is link else 0, payload)
        if not link.closed:
            link.asked[chan.cid] = link.asked.get(chan.cid, 0) + 1
            if link not in chan.consumers:
                chan.consumers.append(link)

    def _end_link(self, link: _Link) -> None:
        """The worker is gone: read what it sent, take back what it never read."""
        self._read(link)
        link.closed = True
        for kind, cid, _, payload in reversed(self._unread(link)):
            if kind is Kind.ITEM:
                self._unsend(link, cid, payload)  # never taken: first in line again
        for chan in self._by_id:
            if link in chan.consumers:
                chan.consumers.remove(link)
            if link in chan.wanting:
                chan.wanting.remove(link)
            chan.credits.pop(link.wid, None)
            chan.reclaiming.discard(link.wid)
        link.asked.clear()
        if self._selector is not None:
            try:
                self._selector.unregister(link.sock)
            except (KeyError, ValueError):
                pass
        link.sock.close()
        link.child.close()
        for chan in self._by_id:
            self._serve_waiting(chan)
            self._grant(chan)

    def _drain_into_leftovers(self, chan: _Chan) -> None:
        chan.ungot = None
        chan.drained += len(chan.items)
        chan.leftovers.extend(chan.items)
        chan.items.clear()

    # -- the manager's own calls (any thread) -----------------------------------

    def put(self, chan: _Chan, item: Any, timeout: float | None) -> bool:
        payload = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        end = workwire.deadline(timeout)
        with self._locked():
            while True:
                if chan.closed:
                    raise Closed(f"channel {chan.name!r} is closed")
                if self._stopping:
                    return False
                if chan.room() > 0:
                    self._accept(chan, payload)
                    return True
                if chan.hoarded() and self._reclaim(chan):
                    self._unlock()  # the RECLAIMs go out now, not once we are done waiting
                    self._lock.acquire()
                    continue
                if not self._wait(end) and _expired(end):
                    raise queue.Full(f"channel {chan.name!r} stayed full for {timeout}s")

    def get(self, chan: _Chan, timeout: float | None) -> Any:
        end = workwire.deadline(timeout)
        with self._locked():
            while not chan.items:
                if chan.closed or self._stopping:
                    raise Closed(f"channel {chan.name!r} is closed and empty")
                if not self._wait(end) and _expired(end):
                    raise queue.Empty(f"nothing arrived on channel {chan.name!r} within {timeout}s")
            payload = chan.items.popleft()
            chan.got += 1
            chan.ungot = None
            self._grant(chan)
        return pickle.loads(payload)

    def close(self, chan: _Chan) -> None:
        with self._locked():
            if chan.closed:
                return
            chan.closed = True
            self._serve_waiting(chan)
            self._grant(chan)  # the producers blocked on a full channel go on (their items drained)
            self._notify()

    def drain(self, chan: _Chan) -> list[Any]:
        with self._locked():
            self._drain_into_leftovers(chan)
            blobs, chan.leftovers = chan.leftovers, []
            self._grant(chan)
        items = []
        for i, blob in enumerate(blobs):
            try:
                items.append(pickle.loads(blob))
            except BaseException as exc:
                # An item that cannot be unpickled is the error's, as a get()'s
                # would be; the others stay, in order, for the next drain().
                # (Interrupted, not the item's doing: it stays too.)
                keep = blobs if isinstance(exc, KeyboardInterrupt) else blobs[:i] + blobs[i + 1:]
                with self._locked():
                    chan.leftovers[:0] = keep
                raise
        return items

    def stats(self, chan: _Chan) -> ChannelStats:
        with self._locked():
            return ChannelStats(chan.put, chan.got, chan.drained, len(chan.items))

    def closed(self, chan: _Chan) -> bool:
        with self._locked():
            return chan.closed


class Channel:
    """A channel as the manager sees it: ``pc.channels[name]``.

    Any thread of the manager process may use it.
    """

    def __init__(self, plane: ChannelPlane, chan: _Chan) -> None:
        self._plane = plane
        self._chan = chan
        self.name = chan.name
        self.maxsize = chan.maxsize

    def put(self, item: Any, timeout: float | None = None) -> bool:
        """Add `item`; block while the channel is full.

        True once it is in the channel; False if the controller is stopping
        (the item was not added). Raises `Closed` on a closed channel and
        `queue.Full` when `timeout` passes first.
        """
        return self._plane.put(self._chan, item, timeout)

    def get(self, timeout: float | None = None) -> Any:
        """Take the next item; block while empty.

        Raises `Closed` when the channel is closed and empty (or the controller
        stopped), `queue.Empty` when `timeout` passes first.
        """
        return self._plane.get(self._chan, timeout)

    def close(self) -> None:
        """No more items: consumers get what is queued, then `Closed`. Idempotent."""
        self._plane.close(self._chan)

    def drain(self) -> list[Any]:
        """Remove and return every queued item (and those `stop()` drained), counted as drained."""
        return self._plane.drain(self._chan)

    def stats(self) -> ChannelStats:
        return self._plane.stats(self._chan)

    @property
    def closed(self) -> bool:
        return self._plane.closed(self._chan)

    def __len__(self) -> int:
        return self.stats().queued

    def __iter__(self) -> Any:
        """Items until the channel is closed and empty."""
        while True:
            try:
                yield self.get()
            except Closed:
                return

    def __repr__(self) -> str:
        s = self.stats()
        return f"<Channel {self.name!r} maxsize={self.maxsize} queued={s.queued} put={s.put} got={s.got}>"



def _expired(end: float | None) -> bool:
    return end is not None and time.monotonic() >= end


__all__ = ["Channel", "ChannelPlane", "ChannelStats", "Closed"]
