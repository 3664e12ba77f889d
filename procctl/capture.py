"""Manager side of output capture: workers' stdout/stderr, line by line.

    worker (capture_worker.py)                      manager (this module)
    socket: header + the pipe's read end (SCM_RIGHTS) -> accepted: "+"
    fd 1, fd 2 --- one pipe per worker -----------> OutputCapture thread: split lines,
                                                   hand them to the sink ([3] line),
                                                   write --log-dir files

Each worker incarnation (worker id, pid) has its own connection, and with
`log_dir` its own file `worker-ID-PID.log`. A line is handed on only whole;
what is left without a newline when the worker ends is handed on as a line.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import IO, NamedTuple

from . import listeners, threads, unixpath
from .capture_worker import CaptureSpec
from .control import check_peer_uid, peer_credentials, remove_stale, runtime_dir

#: The longest header a worker may send before its output.
MAX_HEADER = 1024
#: The longest line handed on whole; a longer one is cut into pieces of this size.
MAX_LINE = 64 * 1024
#: How long close() waits for the last bytes of ended workers.
DRAIN_TIMEOUT = 2.0


class Output(NamedTuple):
    """Whole lines one worker wrote: `text` is one or more lines, each ending
    in a newline. A block, not a line at a time, so that a chatty worker's
    megabytes cost the manager a few C-level string operations."""

    worker: int
    pid: int
    text: str

    def lines(self) -> list[str]:
        """The lines, split at newlines only: a carriage return stays in its
        line (a progress bar's updates are one line, shown as its latest state)."""
        return self.text[:-1].split("\n") if self.text.endswith("\n") else self.text.split("\n")

    def prefixed(self) -> str:
        """`[3] line` for each line."""
        prefix = f"[{self.worker}] "
        return prefix + self.text[:-1].replace("\n", "\n" + prefix) + "\n"


Sink = Callable[[Output], None]


class _Conn:
    """One worker incarnation: its handshake socket, then its output pipe."""

    __slots__ = ("sock", "fd", "worker", "pid", "buffer", "log")

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.fd = -1
        self.worker = -1
        self.pid = 0
        self.buffer = b""
        self.log: IO[bytes] | None = None


class OutputCapture:
    """Accept the workers' output connections and hand their lines to `sink` (from its thread)."""

    def __init__(self, sink: Sink, log_dir: str | None = None, *, line_buffered: bool = True) -> None:
        self.sink = sink
        self.log_dir = log_dir
        self.line_buffered = line_buffered
        self.path = os.path.join(runtime_dir(), f".{os.getpid()}.{id(self):x}.output")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="procctl-capture", daemon=True)
        self._listener: socket.socket | None = None

    @property
    def spec(self) -> CaptureSpec:
        return CaptureSpec(self.path, self.line_buffered)

    def start(self) -> OutputCapture:
        remove_stale(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unixpath.bind(listener, self.path)
        os.chmod(self.path, 0o600)
        listener.listen(1024)
        listener.setblocking(False)
        listeners.close_in_children(listener)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        threads.start(self._thread)
        return self

    def close(self) -> None:
        """Stop accepting; read what the ended workers left (bounded), then close everything."""
        if self._closing:
            return
        self._closing = True
        # The wake pipe is ours, the selector the thread's once it started: the
        # thread may be ending by itself (its last worker gone) at this moment,
        # and a pipe closed by both sides was an EBADF here, or worse, a close
        # of whatever descriptor had meanwhile taken its number.
        if self._thread.ident is not None:
            os.write(self._wake_w, b"\0")
            self._thread.join(DRAIN_TIMEOUT + 1.0)
            if self._thread.is_alive():  # (it ends at its deadline: the pipe stays open for it)
                remove_stale(self.path)
                return
        else:  # never started
            self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        remove_stale(self.path)

    # -- the thread ------------------------------------------------------------------

    def _loop(self) -> None:
        deadline: float | None = None
        try:
            while True:
                if self._closing:
                    if deadline is None:
                        deadline = time.monotonic() + DRAIN_TIMEOUT
                        self._stop_accepting()
                    if not self._connections() or time.monotonic() >= deadline:
                        return
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, _ in self._sel.select(timeout):
                    if key.fd == self._wake_r:
                        os.read(self._wake_r, 64)
                    elif key.data is None:
                        self._accept()
                    else:
                        self._read(key.data)
        finally:
            for conn in self._connections():
                self._end(conn)
            self._stop_accepting()
            self._sel.close()

    def _connections(self) -> list[_Conn]:
        return [key.data for key in self._sel.get_map().values() if isinstance(key.data, _Conn)]

    def _stop_accepting(self) -> None:
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except OSError:  # EMFILE and the like: that worker keeps its own streams
            return
        try:
            check_peer_uid(peer_credentials(sock)[1])
        except (OSError, PermissionError):
            sock.close()
            return
        sock.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ, _Conn(sock))

    def _read(self, conn: _Conn) -> None:
        if conn.sock is not None:
            self._handshake(conn, conn.sock)
            return
        try:
            data = os.read(conn.fd, 1 << 16)  # (os.read allocates what it asks for: not 1 MiB a line)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end(conn)
            return
        conn.buffer += data
        self._lines(conn, final=False)

    def _handshake(self, conn: _Conn, sock: socket.socket) -> None:
        """The header and the pipe's read end; then the pipe replaces the socket."""
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_HEADER, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        try:
            header = json.loads(data) if data.endswith(b"\n") and len(fds) == 1 else None
            conn.worker, conn.pid = int(header["worker"]), int(header["pid"])  # type: ignore[index]
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            self._end(conn)
            return
        conn.fd = fds[0]
        os.set_blocking(conn.fd, False)
        if self.log_dir is not None:
            try:
                conn.log = open(os.path.join(self.log_dir, f"worker-{conn.worker}-{conn.pid}.log"), "ab")  # noqa: SIM115
            except OSError:
                conn.log = None
        self._sel.unregister(sock)
        conn.sock = None
        self._sel.register(conn.fd, selectors.EVENT_READ, conn)
        try:
            sock.send(b"+")
        except OSError:
            pass  # the worker gave up waiting and keeps its streams: the pipe just ends
        sock.close()

    def _lines(self, conn: _Conn, *, final: bool) -> None:
        data = conn.buffer
        cut = data.rfind(b"\n") + 1
        if final:
            cut = len(data)
        elif cut == 0 and len(data) >= MAX_LINE:
            cut = MAX_LINE
        if cut == 0:
            return
        chunk, conn.buffer = data[:cut], data[cut:]
        if conn.log is not None:
            try:
                conn.log.write(chunk if chunk.endswith(b"\n") else chunk + b"\n")
                conn.log.flush()
            except OSError:
                conn.log = None
        text = chunk.decode("utf-8", errors="replace")
        if not text.endswith("\n"):
            text += "\n"
        try:
            self.sink(Output(conn.worker, conn.pid, text))
        except Exception:  # noqa: BLE001 - a display problem must not stop the capture
            pass

    def _end(self, conn: _Conn) -> None:
        if conn.worker >= 0 and conn.buffer:
            self._lines(conn, final=True)
        for source in (conn.sock, conn.fd):
            if source is not None and source != -1:
                try:
                    self._sel.unregister(source)
                except (KeyError, ValueError):
                    pass
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None
        if conn.fd >= 0:
            os.close(conn.fd)
            conn.fd = -1
        if conn.log is not None:
            conn.log.close()
            conn.log = None
