"""The seam between the controller and one worker: commands in, reports out.

Everything the two sides exchange goes through this module, so another
engine can replace it without touching the controller's API.

    manager                                      worker i
    -------                                      --------
    Board (shared memory, one slot per worker) --> read at every checkpoint
      word  = seq << 8 | probe << 2 | state         (no syscall while RUNNING)
      progress done / total  <----------------------- ctx.progress() writes
      beat  <---------------------------------------- the last probe the worker saw
    link socket, one way: 1 byte per command ----> a PAUSED worker blocks on it
    link socket, other way <------------------------ ACK frames, one RESULT frame

The board carries only the latest command, so a worker that is busy or hung
never makes commands pile up, and the doorbell's writes are non-blocking: a
full doorbell already guarantees the worker will wake.  Report frames are
read without blocking, so a worker stalled half-way through a frame cannot
hang the controller.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import struct
import threading
from multiprocessing import reduction
from typing import Any

# Board slot layout (int64/float64 words): command word, progress done, total,
# the controller's marks (bit 0: set before it sends SIGTERM; the bits above:
# how many times the executor asked for the tasks read and not started), the beat,
# the item clock (the executor's task_timeout inside a map chunk), and where
# in a map chunk the worker is (its task id + 1, and the items it runs:
# first << 32 | count), so that a crash there costs the item, not the chunk;
# word 8: how many workers the controller has, once a resize changed it (0:
# as many as when the worker started); word 9: the executor task whose
# function runs now (its id + 1; 0 between two: a result being pickled and
# sent is not the task's time). The rest is room.
SLOT_WORDS = 16
WORD = 8
#: Heartbeat (see supervise.py, ProcessController heartbeat=): the controller
#: asks a RUNNING worker for a sign of life by changing the probe bits of its
#: command word; the worker's next checkpoint sees a new word, as for any
#: command, and answers by storing the probe in its beat word.  The hot path
#: stays one load and one compare: nothing is written per checkpoint.
#: A new probe is only sent once the last one was answered, so six bits
#: that cycle are enough to tell the two apart.
PROBE_SHIFT = 2
PROBE_LIMIT = 64
PROBE_MASK = (PROBE_LIMIT - 1) << PROBE_SHIFT
COMMAND_MASK = ~PROBE_MASK  # the seq and state bits
#: The beat of a worker that owes no more checkpoints: its target has
#: returned (or raised), or it was told to stop. What it does from then on
#: (pickling a large result, saving its state, exit handlers) is bounded by
#: the stop's grace, not by the heartbeat. Never a probe (those are 1..63).
BEAT_DONE = PROBE_LIMIT


def probe_of(word: int) -> int:
    return (word & PROBE_MASK) >> PROBE_SHIFT


def with_probe(word: int, probe: int) -> int:
    return (word & COMMAND_MASK) | (probe << PROBE_SHIFT)

FRAME_HEADER = struct.Struct("!BQ")  # kind, payload length
ACK = 1  # payload: seq, state
RESULT = 2  # payload: pickled (outcome, result, error)
START_FAILED = 3  # payload: traceback text (utf-8)
PROGRESS = 4  # payload: pickled dict of the last progress() keywords
ACK_BODY = struct.Struct("!qB")
#: A whole ACK frame (header and body), packed in one call on the worker's hot path.
ACK_FRAME = struct.Struct("!BQqB")

#: Report reads ask for SMALL_READ bytes, or up to READ_CHUNK while a large
#: frame is coming: os.read() allocates what it is asked for, and a 1 MiB
#: buffer for an 18-byte acknowledgement cost more than the read itself.
SMALL_READ = 1 << 16
READ_CHUNK = 1 << 20
SMALL_FRAME = 1 << 16


def pack_command(seq: int, state: int) -> int:
    return (seq << 8) | state


def unpack_command(word: int) -> tuple[int, int]:
    return word >> 8, word & 0x3


class InheritedFd:
    """A file descriptor to hand to a child process under any start method.

    Under fork the child inherits the number as it is; under spawn and
    forkserver, pickling asks multiprocessing to pass the descriptor along,
    as it does for its own Connection objects.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        return _rebuild_fd, (reduction.DupFd(self.fd),)

    def detach(self) -> int:
        return self.fd


class _Passed:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


def _rebuild_fd(dup: Any) -> _Passed:
    return _Passed(dup.detach())


def _board_size(workers: int) -> int:
    size = max(workers * SLOT_WORDS * WORD, mmap.PAGESIZE)
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def _make_board_fd(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("procctl-board", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        size_shared(fd, size, "the workers' shared board")
    except OSError:
        os.close(fd)
        raise
    return fd


def size_shared(fd: int, size: int, what: str) -> None:
    """Make the shared memory `fd` `size` bytes, saying what failed if it
    cannot be (a file size limit, `ulimit -f`, counts for a memfd too)."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        why = "the file size limit (ulimit -f) is lower" if exc.errno == errno.EFBIG else exc.strerror
        raise OSError(exc.errno, f"cannot make {what} of {size} bytes: {why}") from None


class Board:
    """Shared memory with one slot per worker: the command and the progress."""

    def __init__(self, workers: int, fd: int | None = None) -> None:
        self.size = _board_size(workers)
        self.owner = fd is None
        self.fd = _make_board_fd(self.size) if fd is None else fd
        self._map = mmap.mmap(self.fd, self.size)
        self._words = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")
        if not self.owner:
            os.close(self.fd)  # the mapping stays valid
            self.fd = -1

    @property
    def slots(self) -> int:
        return self.size // (SLOT_WORDS * WORD)

    def grow(self, workers: int) -> None:
        """Room for `workers` slots (the owner only; resize()).

        The file grows and the owner maps it again; a worker maps the board
        as large as it was when the worker started, and only ever touches
        its own slot, which stays where it was.
        """
        if workers <= self.slots:
            return
        size = max(_board_size(workers), 2 * self.size)
        size_shared(self.fd, size, "the workers' shared board")
        bigger = mmap.mmap(self.fd, size)
        self._words.release()
        self._floats.release()
        self._map.close()
        self._map, self.size = bigger, size
        self._words = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")

    def post(self, worker: int, word: int) -> None:
        self._words[worker * SLOT_WORDS] = word

    def command(self, worker: int) -> int:
        return self._words[worker * SLOT_WORDS]

    def reset(self, worker: int, word: int) -> None:
        """A fresh slot for a new incarnation of `worker`: command `word`, no progress."""
        base = worker * SLOT_WORDS
        self._words[base + 3] = 0
        self._words[base + 4] = 0
        self._floats[base + 5] = 0.0
        self._words[base + 6] = 0
        self._words[base + 7] = 0
        self._floats[base + 1] = 0.0
        self._floats[base + 2] = 0.0
        self._words[base + 8] = 0
        self._words[base + 9] = 0
        self._words[base] = word

    # Word 3 is written by the controller only (one writer: no lost update).

    def mark_terminate(self, worker: int) -> None:
        self._words[worker * SLOT_WORDS + 3] |= 1

    def terminate_marked(self, worker: int) -> bool:
        return self._words[worker * SLOT_WORDS + 3] & 1 == 1

    def ask_back(self, worker: int) -> None:
        """Ask the worker for the tasks it read and has not started (the
        executor's; it gives them back before it starts another)."""
        self._words[worker * SLOT_WORDS + 3] += 2

    def asked_back(self, worker: int) -> int:
        """How many times the worker was asked for its unstarted tasks."""
        return self._words[worker * SLOT_WORDS + 3] >> 1

    def beat(self, worker: int) -> int:
        """The last heartbeat probe the worker answered."""
        return self._words[worker * SLOT_WORDS + 4]

    def set_beat(self, worker: int, probe: int) -> None:
        self._words[worker * SLOT_WORDS + 4] = probe

    def item_started(self, worker: int) -> float:
        """When the item the worker runs began (time.monotonic(), which is
        the same clock in every process here), as it last said; 0.0 if never."""
        return self._floats[worker * SLOT_WORDS + 5]

    def set_item_started(self, worker: int, when: float) -> None:
        self._floats[worker * SLOT_WORDS + 5] = when

    def items_running(self, worker: int, task: int) -> tuple[int, int] | None:
        """Which items of map chunk `task` the worker runs, as it last said:
        (first, count), count 0 between two blocks; None if it said nothing of `task`."""
        base = worker * SLOT_WORDS
        if self._words[base + 6] != task + 1:
            return None
        where = self._words[base + 7]
        return where >> 32, where & 0xFFFFFFFF

    def set_items_running(self, worker: int, task: int, first: int, count: int) -> None:
        base = worker * SLOT_WORDS
        self._words[base + 7] = first << 32 | count
        self._words[base + 6] = task + 1

    def set_task_running(self, worker: int, task: int | None) -> None:
        """The function of executor task `task` runs now (None: none does; the
        last one returned or raised, and its result is being pickled and sent)."""
        self._words[worker * SLOT_WORDS + 9] = 0 if task is None else task + 1

    def task_running(self, worker: int, task: int) -> bool:
        return self._words[worker * SLOT_WORDS + 9] == task + 1

    def set_workers(self, worker: int, count: int) -> None:
        """Tell `worker` how many workers the controller has now (a resize)."""
        self._words[worker * SLOT_WORDS + 8] = count

    def workers(self, worker: int) -> int:
        """How many workers the controller has, as last told to `worker` (0: never told)."""
        return self._words[worker * SLOT_WORDS + 8]

    def set_progress(self, worker: int, done: float, total: float) -> None:
        base = worker * SLOT_WORDS
        self._floats[base + 2] = total
        self._floats[base + 1] = done

    def progress(self, worker: int) -> tuple[float, float]:
        base = worker * SLOT_WORDS
        return self._floats[base + 1], self._floats[base + 2]

    def close(self) -> None:
        if self._map.closed:
            return
        self._words.release()
        self._floats.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WorkerLink:
    """The manager's end of one worker's channel.

    One Unix socket pair carries both directions: doorbell bytes to the
    worker, report frames back. One descriptor per worker in the manager
    instead of two pipes' worth.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.report_fd = ours.detach()
        self.doorbell_fd = self.report_fd
        self._child = theirs.detach()
        self._child_end: ControlEnd | None = None
        os.set_blocking(self.report_fd, False)
        self._buffer = bytearray()
        self.eof = False
        self.closed = False

    def child_fds(self) -> tuple[InheritedFd, InheritedFd]:
        """The (doorbell, report) ends to pass to the worker process: one socket."""
        end = InheritedFd(self._child)
        return end, end  # one object: pickled once, passed to the child once

    def child_end(self, worker: int, board: Board) -> ControlEnd:
        """The worker's ControlEnd, made here for a child about to be forked.

        A forked child starts with a copy of it: it need not build one, and
        every page it would have written to do so stays shared.
        """
        self._child_end = ControlEnd(worker, board, self._child, self._child)
        return self._child_end

    def release_child_fds(self) -> None:
        """Close our copy of the child's end once the child has it."""
        if self._child_end is not None:
            self._child_end.close()  # our copy of it, and with it the descriptor
            self._child_end = None
        elif self._child >= 0:
            os.close(self._child)
        self._child = -1

    def ring(self) -> None:
        try:
            os.write(self.doorbell_fd, b"\0")
        except OSError:
            pass  # full: the worker will wake anyway; gone: the reaper will see it

    def read_frames(self) -> tuple[list[tuple[int, bytes]], bool]:
        """Read what is available without blocking: (frames, at_eof)."""
        eof = False
        while True:
            want = self._want()
            try:
                chunk = os.read(self.report_fd, want)
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The worker ended with doorbell bytes unread: what it sent
                # is already here; this is its end of file.
                chunk = b""
            if not chunk:
                eof = True
                break
            self._buffer += chunk
            if len(chunk) < want:
                break
        return self._split_frames(), eof

    def _want(self) -> int:
        """How much to read: SMALL_READ, or more while a large frame is under way."""
        buf = self._buffer
        if len(buf) >= FRAME_HEADER.size:
            length: int = FRAME_HEADER.unpack_from(buf, 0)[1]
            missing = FRAME_HEADER.size + length - len(buf)
            if missing > SMALL_READ:
                return min(missing, READ_CHUNK)
        return SMALL_READ

    def _split_frames(self) -> list[tuple[int, bytes]]:
        frames = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= FRAME_HEADER.size:
            kind, length = FRAME_HEADER.unpack_from(buf, pos)
            end = pos + FRAME_HEADER.size + length
            if len(buf) < end:
                break
            frames.append((kind, bytes(buf[pos + FRAME_HEADER.size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames


    @property
    def partial(self) -> bool:
        """Bytes of an unfinished frame are waiting (a worker died mid-send)."""
        return bool(self._buffer)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release_child_fds()
        os.close(self.report_fd)


class ControlEnd:
    """The worker's end of its channel."""

    def __init__(self, worker: int, board: Board, doorbell_fd: int, report_fd: int) -> None:
        self.worker = worker
        self.board = board
        # Both are the one link socket (two descriptors of it under spawn and
        # forkserver). It stays blocking for the frames; the doorbell is read,
        # and small frames tried, per call without blocking (MSG_DONTWAIT).
        self.doorbell_fd = doorbell_fd
        self.report_fd = report_fd
        self._sock = socket.socket(fileno=doorbell_fd)
        # Frames must be whole whatever thread writes them: a progress() from a
        # helper thread must never land inside the main thread's result frame.
        self._send_lock = threading.Lock()

    def command(self) -> int:
        return self.board.command(self.worker)

    def drain_doorbell(self) -> None:
        try:
            while len(self._sock.recv(4096, socket.MSG_DONTWAIT)) == 4096:
                pass
        except (BlockingIOError, ConnectionResetError):
            pass

    def let_go(self) -> None:
        """Forget the socket object, leaving its descriptor to the process's
        exit (no 'unclosed socket' warning at the worker's shutdown); later
        progress sends are dropped."""
        with self._send_lock:
            self._sock.detach()

    def close(self) -> None:
        """Close the link's descriptors (a worker's exit does it too)."""
        if self.report_fd != self.doorbell_fd:
            os.close(self.report_fd)
        self._sock.close()

    def send(self, kind: int, payload: bytes) -> None:
        header = FRAME_HEADER.pack(kind, len(payload))
        with self._send_lock:
            if len(payload) <= SMALL_FRAME:
                self._write_all(header + payload)  # one system call
            else:
                self._write_all(header)
                self._write_all(payload)  # no copy of a large result

    def _write_all(self, data: bytes) -> None:
        sent = os.write(self.report_fd, data)  # all of it, but for a large frame
        if sent < len(data):
            view = memoryview(data)[sent:]
            while view:
                view = view[os.write(self.report_fd, view) :]

    def try_send(self, kind: int, payload: bytes) -> bool:
        """Send a small frame only if it fits in the pipe now; never block."""
        frame = FRAME_HEADER.pack(kind, len(payload)) + payload
        if len(frame) > select.PIPE_BUF:
            return False  # could be written in pieces
        if not self._send_lock.acquire(blocking=False):
            return False  # another thread is sending: drop rather than wait
        try:
            try:
                sent = self._sock.send(frame, socket.MSG_DONTWAIT)
            except OSError:  # full, the manager gone, or the link let go at the end
                return False
            if sent < len(frame):  # a frame this small goes whole; never leave half of one
                self._write_all(frame[sent:])
            return True
        finally:
            self._send_lock.release()

    def ack(self, seq: int, state: int) -> None:
        frame = ACK_FRAME.pack(ACK, ACK_BODY.size, seq, state)
        with self._send_lock:
            self._write_all(frame)
