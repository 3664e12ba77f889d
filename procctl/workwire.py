"""The work wire: one message link per worker, for channel items and tasks.

    manager                                     worker i
    -------                                     --------
    manager end  <== SOCK_SEQPACKET pair ==>    worker end
    (+ a copy of the worker end, kept open)

Every `recv` returns exactly one whole message, atomically: a worker killed
in the middle of a get either took the message or left it in its socket.
The manager keeps its own copy of the worker's end, so once the worker is
gone it reads back, from that copy, whatever the worker never read
(`reclaim`): nothing sent is ever lost or counted twice.

A message is a 16-byte header (kind, channel, tag) and a payload.  A payload
larger than `MAX_INLINE` travels in a memfd passed along with the header
(SCM_RIGHTS), so a big item is still one atomic message.

Both sides use this module; it holds no policy.
"""

from __future__ import annotations

import array
import enum
import math
import os
import socket
import struct
import threading
import time
from typing import Any, NamedTuple

HEADER = struct.Struct("!BxxxIq")  # kind, channel id, tag (task id, count)
BIG = 0x80  # flag on kind: the payload is in the passed memfd
BIG_BODY = struct.Struct("!Q")  # payload length of a big message
#: Payloads up to this size travel in the message itself.  A seqpacket
#: message must fit the socket's send buffer (212 KiB by default).
MAX_INLINE = 128 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class Kind(enum.IntEnum):
    # worker -> manager
    GET = 1  # credit for one item of `channel`
    CANCEL = 2  # withdraw the GET on `channel`
    PUT = 3  # an item for `channel`
    UNGET = 4  # give back an item that arrived after a CANCEL (payload: the item)
    WANT = 5  # ask for put credits on a bounded `channel`
    RESULT = 6  # the outcome of task `tag`
    INIT_FAILED = 7  # the executor's initializer raised (payload: traceback text)
    RETURNED = 8  # tasks read but never started, given back (payload: TASK_IDS)
    UP = 9  # an executor worker is ready for tasks (its initializer, if any, has run)
    UNWANT = 10  # withdraw the WANT on `channel` (a put timed out)
    RETURN = 11  # give back `tag` unused put credits on `channel`
    # manager -> worker
    ITEM = 16  # reply to GET: one item
    CLOSED = 17  # reply to GET: closed and empty
    CANCELLED = 18  # reply to CANCEL when no item was sent
    CREDIT = 19  # `tag` put credits on `channel`
    TASK = 20  # `tag` tasks to run, in order (payload: task frames, see pack_tasks)
    UNWANTED = 21  # reply to UNWANT: no credit follows (one that crossed it came first)
    RECLAIM = 22  # give back the put credits on `channel` you do not need now


class Message(NamedTuple):
    # A named tuple, not a dataclass: the manager builds one per item.
    kind: Kind
    channel: int
    tag: int
    payload: bytes


_KINDS: dict[int, Kind] = {int(k): k for k in Kind}
#: One task in a TASK message: task id, length of its pickled function, of
#: its pickled call; then the two.  A map's tasks share one pickled function
#: (the worker unpickles it once).
TASK_FRAME = struct.Struct("!qII")
TASK_IDS = struct.Struct("!q")


def pack_tasks(tasks: list[tuple[int, bytes, bytes]]) -> bytes:
    """The payload of a TASK message: (task id, pickled function, pickled call) frames."""
    frame = TASK_FRAME.pack
    return b"".join([part for tid, fn, call in tasks for part in (frame(tid, len(fn), len(call)), fn, call)])


def unpack_tasks(payload: bytes) -> list[tuple[int, bytes, bytes]]:
    out = []
    view = memoryview(payload)
    offset, size, unpack = 0, TASK_FRAME.size, TASK_FRAME.unpack_from
    while offset < len(payload):
        tid, fn_len, call_len = unpack(view, offset)
        offset += size
        fn_end = offset + fn_len
        out.append((tid, bytes(view[offset:fn_end]), bytes(view[fn_end:fn_end + call_len])))
        offset = fn_end + call_len
    return out


def task_ids(msg: Message) -> list[int]:
    """The task ids a TASK or RETURNED message carries, in order."""
    if msg.kind is Kind.TASK:
        return [tid for tid, _, _ in unpack_tasks(msg.payload)]
    return [TASK_IDS.unpack_from(msg.payload, i)[0] for i in range(0, len(msg.payload), TASK_IDS.size)]


def pair() -> tuple[socket.socket, socket.socket]:
    """A (manager, worker) pair of connected seqpacket sockets."""
    manager, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return manager, worker


def send(sock: socket.socket, kind: Kind, channel: int = 0, tag: int = 0, payload: bytes = b"") -> None:
    """Send one message. Raises BlockingIOError on a full non-blocking socket,
    in which case nothing was sent."""
    if len(payload) <= MAX_INLINE:
        sock.send(HEADER.pack(kind, channel, tag) + payload)
        return
    fd = os.memfd_create("procctl-item", os.MFD_CLOEXEC)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        head = HEADER.pack(kind | BIG, channel, tag) + BIG_BODY.pack(len(payload))
        sock.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    finally:
        os.close(fd)  # the message holds its own reference


def recv(sock: socket.socket) -> Message | None:
    """Receive one message; None when the peer is gone (or, non-blocking, none is there).

    Raises BlockingIOError on an empty non-blocking socket.
    """
    buf = _buffer()
    size, ancdata, _flags, _addr = sock.recvmsg_into([buf], _FD_SPACE)
    return message(buf, size, ancdata)


def recv_item(sock: socket.socket, channel: int) -> memoryview | Message | None:
    """Receive one message: an ITEM of `channel` as a view of its payload in
    this thread's buffer (the consumer's path of every item, with no copy and
    no Message), else the Message (None: the peer is gone).

    Raises BlockingIOError on an empty non-blocking socket. The buffer is
    lent with the view until `item_read()`: a receive in between (from what
    unpickling the item runs, a signal handler) gets a buffer of its own.
    """
    bufs, view = _buffers()
    size, ancdata, _flags, _addr = sock.recvmsg_into(bufs, _FD_SPACE)
    if size and not ancdata:
        raw_kind, chan, _tag = HEADER.unpack_from(view)
        if raw_kind == Kind.ITEM and chan == channel:
            _local.lent = True
            return view[HEADER.size:size]
    return message(bufs[0], size, ancdata)


def item_read() -> None:
    """The item recv_item() lent this thread's buffer for is read: the buffer is free again."""
    _local.lent = False


def message(buf: bytearray, size: int, ancdata: list[tuple[int, int, bytes]]) -> Message | None:
    """The message `recvmsg_into` put in `buf` (None: the peer is gone)."""
    if not size:
        return None
    raw_kind, channel, tag = HEADER.unpack_from(buf)
    if not raw_kind & BIG:
        return Message(_KINDS[raw_kind], channel, tag, bytes(memoryview(buf)[HEADER.size:size]))
    data = bytes(memoryview(buf)[:size])
    fds = _fds(ancdata)
    try:
        (length,) = BIG_BODY.unpack_from(data, HEADER.size)
        payload = _read_fd(fds[0], length)
    finally:
        for fd in fds:
            os.close(fd)
    return Message(_KINDS[raw_kind & ~BIG], channel, tag, payload)


_local = threading.local()


def _buffer() -> bytearray:
    # One receive buffer per thread: recvmsg() would allocate (and shrink)
    # a MAX_INLINE buffer for every message.
    return _buffers()[0][0]


def _buffers() -> tuple[list[bytearray], memoryview]:
    """This thread's receive buffer, as recvmsg_into takes it and as a view
    (a new one while it is lent to an item being read)."""
    local = _local
    try:
        if not local.lent:
            return local.bufs  # type: ignore[no-any-return]
    except AttributeError:
        local.lent = False
        buf = bytearray(MAX_INLINE + HEADER.size + BIG_BODY.size)
        local.bufs = ([buf], memoryview(buf))
        return local.bufs  # type: ignore[no-any-return]
    buf = bytearray(MAX_INLINE + HEADER.size + BIG_BODY.size)
    return [buf], memoryview(buf)


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _read_fd(fd: int, length: int) -> bytes:
    parts = []
    offset = 0
    while offset < length:
        chunk = os.pread(fd, min(length - offset, 1 << 24), offset)
        if not chunk:
            raise EOFError("a big message's memfd is shorter than its header says")
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def recv_all(sock: socket.socket) -> list[Message]:
    """Every message waiting on a non-blocking socket."""
    out = []
    while True:
        try:
            msg = recv(sock)
        except (BlockingIOError, InterruptedError):
            break
        except ConnectionResetError:
            break
        if msg is None:
            break
        out.append(msg)
    return out


#: The longest one kernel wait takes: poll() and epoll count milliseconds
#: in an int (about 24.8 days); a longer timeout is waited out in turns.
MAX_WAIT = 86400.0

#: How often a cluster node's agent beats at most (procctl.cluster: every lease/4, not under this).
MIN_BEAT = 0.05
#: The shortest lease a cluster node takes: four beats, each a round trip
#: through Dask (milliseconds); a shorter one would lose every node at the
#: first stall of the client.
MIN_LEASE = 4 * MIN_BEAT


def check_count(name: str, value: Any, low: int | None, what: str) -> int:
    """An integer argument >= `low` (`what` says it in words): TypeError for
    another type, a bool too, as the stdlib's executors; ValueError below `low`
    (None: the caller says that in its own words)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, not {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return value


def check_timeout(name: str, value: Any, *, allow_none: bool = True, positive: bool = False) -> float | None:
    """Validate a timeout argument: None (if allowed), or a number >= 0 (> 0 if
    `positive`: one a wait could never meet); float('inf') means no limit. NaN
    and negative numbers raise ValueError."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond a float: longer than anyone will wait
        seconds = float("inf")
    if seconds != seconds:
        raise ValueError(f"{name} must be a number of seconds, not NaN")
    if positive and seconds <= 0:
        raise ValueError(f"{name} must be > 0 seconds, not {value!r}")
    if seconds < 0:
        raise ValueError(f"{name} must be >= 0, not {value!r}")
    return seconds


def deadline(timeout: float | None, name: str = "timeout") -> float | None:
    """The monotonic time a timeout ends (None: no limit, also for inf), the
    timeout checked as check_timeout() does (as queue.Queue's get and put: a
    negative one is a ValueError)."""
    seconds = check_timeout(name, timeout)
    return None if seconds is None or seconds == math.inf else time.monotonic() + seconds


def remaining(end: float | None) -> float | None:
    """Seconds left until `end` (None: no limit), at most MAX_WAIT: what one
    wait may take (the caller waits again while `end` has not come)."""
    return None if end is None else min(MAX_WAIT, max(0.0, end - time.monotonic()))


def poll_ms(timeout: float | None) -> int | None:
    """A timeout in seconds as poll() takes it: ms, rounded up, at most MAX_WAIT."""
    return None if timeout is None else max(0, math.ceil(min(timeout, MAX_WAIT) * 1000))
