"""The control socket of a run: where `procctl ls/status/pause/...` reach it.

    procctl status RUN ---- newline-delimited JSON over a Unix socket ----> ControlServer (manager)
        Request {"cmd": "status"}\\n                                        accept thread: SO_PEERCRED check
        Reply   {"ok": true, ...}\\n   <------------------------------------  one thread per connection,
                                                                            answering from the controller's
                                                                            thread-safe public methods

Each user has one directory of sockets (`runtime_dir()`, mode 0700); a run's
socket (mode 0600) is `NAME.sock`, NAME being `--name` or the manager's pid.
The protocol is JSON, never pickle: a request is one line of at most
MAX_REQUEST bytes; a bad one gets an error reply and changes nothing.  A
socket whose owner died is stale: whoever meets it first removes it.

Only the command line and `ProcessController(..., control=True)` import this
module; `import procctl` does not.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import select
import selectors
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import listeners, threads, unixpath
from .limits import BeyondCapacity
from .states import Event, WorkerStatus, strict_json

log = logging.getLogger("procctl.control")

#: The longest request line the server reads (bytes, newline included).
MAX_REQUEST = 64 * 1024
#: How long a connection may take to send one request.
REQUEST_TIMEOUT = 10.0
#: How long a pause or resume waits for the workers' acknowledgements before it goes on
#: (the control socket's replies, the commands' schedules and keys); the command stays
#: posted, and busy workers apply it at their next checkpoint.
ACK_WAIT = 2.0
#: How long a scale request waits for the resize before it answers that it is
#: under way (a shrink waits for its workers to end, up to the grace): well
#: within the 10 s a command waits for an answer.
SCALE_ANSWER = 5.0
#: How long a status snapshot is reused (any event or command invalidates it),
#: so that a flood of requests costs the manager little.
STATUS_CACHE = 0.05
#: How often each worker's CPU % and RSS are measured at most.
USAGE_INTERVAL = 0.5
#: How long close() lets the event streams send their last events.
FLUSH_TIMEOUT = 2.0
#: Connections served at once; more are told the run is busy.
MAX_CONNECTIONS = 64
#: Event streams at once: followers never take every connection, so a command
#: (stop, status) always finds one.
MAX_FOLLOWERS = MAX_CONNECTIONS // 2
#: How much of an oversized request is read and thrown away, so that its
#: sender finishes writing and reads the error reply.
DISCARD_LIMIT = 64 * 1024 * 1024
#: The largest worker count or id a request may carry (a C int, as the kernel counts processes).
MAX_COUNT = 2**31 - 1
COMMANDS = ("info", "status", "pause", "resume", "stop", "scale", "events", "metrics")
#: The last line of an event stream the run ended itself (not an event: it has no "event").
END_OF_EVENTS = b'{"end": true}'
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUFFIX = ".sock"
#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")


class ControlError(RuntimeError):
    """A control socket that cannot be set up or reached (the message says why)."""


class NoAnswer(ControlError):
    """A live run's socket took the request but the run did not answer in time
    (stopped with SIGSTOP, or its process busy in a long callback)."""


class ProtocolError(ValueError):
    """A request that is not what the protocol accepts."""


# -- the protocol ----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request: `{"cmd": "pause", "workers": [0, 3]}`."""

    cmd: str
    workers: tuple[int, ...] | None = None  # pause/resume/stop: only these (None: all)
    n: int | None = None  # scale: the new number of workers
    follow: bool = False  # events: go on with the live events
    wait: bool = False  # stop of some workers: a second reply once they have ended

    def to_line(self) -> bytes:
        body: dict[str, Any] = {"cmd": self.cmd}
        if self.workers is not None:
            body["workers"] = list(self.workers)
        if self.n is not None:
            body["n"] = self.n
        if self.follow:
            body["follow"] = True
        if self.wait:
            body["wait"] = True
        return json.dumps(body).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Request:
        try:
            body = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"not a JSON request: {exc}") from None
        except RecursionError:  # brackets nested past the decoder's depth, in a short line
            raise ProtocolError("not a JSON request: nested too deeply") from None
        if not isinstance(body, dict):
            raise ProtocolError("a request is a JSON object like {\"cmd\": \"status\"}")
        cmd = body.get("cmd")
        if cmd not in COMMANDS:
            raise ProtocolError(f"unknown command {cmd!r}; commands are {', '.join(COMMANDS)}")
        workers = body.get("workers")
        if workers is not None:
            bad = ProtocolError("workers must be a non-empty list of worker ids (integers >= 0)")
            if not isinstance(workers, list) or not workers:
                raise bad
            for w in workers:
                if not isinstance(w, int) or isinstance(w, bool) or w < 0:
                    raise bad
                if not _is_count(w):  # (past any run's size: the run's own check names its range)
                    raise ProtocolError(f"workers: {w} is not a worker id")
            workers = tuple(workers)
        n = body.get("n")
        if cmd == "scale" and not (isinstance(n, int) and _is_count(n) and n >= 1):
            raise ProtocolError("scale needs n, a number of workers >= 1")
        follow, wait = body.get("follow", False), body.get("wait", False)
        if not isinstance(follow, bool) or not isinstance(wait, bool):
            raise ProtocolError("follow and wait must be true or false")
        return cls(cmd, workers, n if cmd == "scale" else None, follow, wait and cmd == "stop")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


@dataclass(frozen=True)
class Reply:
    """One reply: `{"ok": true, ...data}` or `{"ok": false, "error": "..."}`."""

    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: A stop of some workers that began: set once it is over (not sent; see _serve).
    done: _StopDone | None = field(default=None, compare=False)

    def to_line(self) -> bytes:
        body: dict[str, Any] = {"ok": self.ok, **self.data}
        if self.error is not None:
            body["error"] = self.error
        return json_bytes(body)

    @classmethod
    def failure(cls, error: str) -> Reply:
        return cls(False, {}, error)

    @classmethod
    def bad_input(cls, error: str) -> Reply:
        """A request whose arguments the run cannot take (a worker id it does not have)."""
        return cls(False, {"bad_input": True}, error)


def _ended(pc: Any, ids: tuple[int, ...]) -> list[int]:
    """Those of `ids` that are workers of `pc` that have ended and wait for no
    restart (an id it never had is for its own command to refuse). One that
    waits for its restart takes a command: its next process starts in it."""
    pending = getattr(pc, "_restart_pending", lambda wid: False)
    try:
        alive = {s.worker_id: s.alive for s in pc.status()}
    except Exception:  # noqa: BLE001 - a run that cannot tell: its command decides
        return []
    return [i for i in ids if alive.get(i) is False and not pending(i)]


def _bad_input(exc: ValueError) -> Reply:
    """A request the run cannot take (a --workers id it does not have): bad
    input, in the option's own name."""
    text = str(exc)
    return Reply.bad_input("--" + text if text.startswith("workers:") else text)


def json_bytes(body: dict[str, Any]) -> bytes:
    """One strict JSON line: NaN and infinities (which JSON has no word for) are null."""
    return strict_json(body).encode() + b"\n"


# -- where the sockets live ------------------------------------------------------


def runtime_dir(create: bool = True) -> str:
    """The user's directory of control sockets, mode 0700.

    `$XDG_RUNTIME_DIR/procctl` where the session has one, else
    `procctl-UID` under the temp dir. A directory that another user owns or
    that others can enter is refused: it could hand our commands to them.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base):  # (a relative one is ignored, as the XDG spec says)
        path = os.path.join(base, "procctl")
    else:
        path = os.path.join(tempfile.gettempdir(), f"procctl-{os.getuid()}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot create the control directory {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ControlError(f"the control directory {path} is not a directory of this user")
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise ControlError(f"the control directory {path} is open to others: {exc.strerror}") from None
    return path


def check_name(name: str) -> str:
    """A run name: letters, digits, '.', '_', '-', up to 64 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"run name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def socket_path(name: str, directory: str | None = None) -> str:
    return os.path.join(directory or runtime_dir(), check_name(name) + SUFFIX)


# -- who may connect ---------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def check_peer_uid(peer_uid: int, owner_uid: int | None = None) -> None:
    """PermissionError unless `peer_uid` is the run's owner (root is not let in either)."""
    owner = os.getuid() if owner_uid is None else owner_uid
    if peer_uid != owner:
        raise PermissionError(f"uid {peer_uid} is not the owner of this run (uid {owner})")


# -- finding runs ------------------------------------------------------------------


def is_live(path: str) -> bool:
    """True if a run answers at `path`; a socket nobody listens on is removed (stale)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        unixpath.connect(probe, path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        remove_stale(path)
        return False
    except OSError:
        return False
    finally:
        probe.close()


def remove_stale(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("could not remove stale socket %s: %s", path, exc)


#: A run's private sockets: `.PID.ID.output` (output capture), `.PID.ID.tmp` (listen() before its link).
PRIVATE_RE = re.compile(r"^\.(\d+)\.[0-9a-f]+\.(output|tmp)$")


def sockets(directory: str | None = None) -> list[str]:
    """The sockets in the user's directory, live or not, by name.

    The private sockets of runs that died without removing them (SIGKILL)
    are removed on the way: their owner pid is in the name.
    """
    where = directory or runtime_dir(create=False)
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        return []
    for name in names:
        found = PRIVATE_RE.match(name)
        if found is not None and not _pid_alive(int(found.group(1))):
            remove_stale(os.path.join(where, name))
    return [os.path.join(where, n) for n in names if n.endswith(SUFFIX) and not n.startswith(".")]


def _pid_alive(pid: int) -> bool:
    """Is there a process `pid`? (A reused pid keeps a stale socket a while longer: harmless.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone's: not ours to judge
    return True


# -- the server --------------------------------------------------------------------


@dataclass(frozen=True)
class RunHooks:
    """What the server asks of the run it serves (any of them from its threads).

    `controller()` is the run's ProcessController (None before it starts);
    `stop()` asks for a graceful stop and returns at once; `scale(n)` resizes
    the run to n workers (ValueError or RuntimeError, whose message the
    client shows, when it refuses), or is None for a run that cannot resize
    (the sum job's books, a map's executor are sized once).
    """

    job: str
    controller: Callable[[], Any]
    stop: Callable[[], None]
    scale: Callable[[int], None] | None = None


def listen(path: str) -> socket.socket:
    """A listening socket at `path`, mode 0600, never replacing a live run's.

    Bound and made private under a temporary name first, then linked into
    place: nobody can connect before the mode is set, and the link fails if
    the name was taken meanwhile.
    """
    directory, name = os.path.split(path)
    if os.path.lexists(path) and is_live(path):
        raise ControlError(f"a run named {name[:-len(SUFFIX)]!r} is already live ({path})")
    tmp = os.path.join(directory, f".{os.getpid()}.{threading.get_ident()}.tmp")
    remove_stale(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixpath.bind(sock, tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        try:
            os.link(tmp, path)
        except FileExistsError:
            if is_live(path):
                raise ControlError(f"a run named {name[:-len(SUFFIX)]!r} is already live ({path})") from None
            os.link(tmp, path)  # it was stale, and is gone now
    except BaseException:
        sock.close()
        raise
    finally:
        remove_stale(tmp)
    sock.set_inheritable(False)
    return sock


class _StopDone(threading.Event):
    """Set once a `stop --workers` from the control socket is over: its stop
    returned (or failed: `error`), or the run is over (the server closes only then)."""

    error: str | None = None


class ControlServer:
    """Serve one run's control socket from a thread of the manager.

    `record(event)` keeps the run's events for `events`; `close()` stops
    serving, ends the followers' streams and removes the socket.
    """

    def __init__(self, hooks: RunHooks, name: str | None = None, directory: str | None = None) -> None:
        self.hooks = hooks
        self.pid = os.getpid()
        self.name = check_name(name) if name is not None else str(self.pid)
        self.path = socket_path(self.name, directory)
        self.started = time.time()
        self._t0 = time.monotonic()
        self._events: list[dict[str, Any]] = []
        #: Guards the events, the streams and the bells (followers wait on their bells).
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = False
        #: Workers a `stop --workers` is stopping: {id: pid} (their state reads "stopping").
        self._retiring: dict[int, int | None] = {}
        #: Those stops under way: close() lets whoever waits for one go.
        self._stops: set[_StopDone] = set()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._follower_slots = threading.BoundedSemaphore(MAX_FOLLOWERS)
        #: Each follower's bell (a pipe's write end): rung by every event and by close().
        self._bells: set[int] = set()
        self._usage = _Usage()
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._snapshot_lock = threading.Lock()
        self._streams: set[threading.Thread] = set()
        self._encoded: tuple[dict[str, Any], bytes] | None = None
        self._sock: socket.socket | None = None
        self._inode = -1
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> ControlServer:
        sockets(os.path.dirname(self.path))  # a run starting meets the directory: clean what dead runs left
        self._sock = listen(self.path)
        listeners.close_in_children(self._sock)
        self._inode = os.stat(self.path).st_ino
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="procctl-control", daemon=True)
        threads.start(self._thread)
        return self

    def close(self) -> None:
        """Stop answering, end every follower's stream, remove the socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ring_followers()
            for done in self._stops:
                done.set()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        if self._wake_w >= 0:
            os.write(self._wake_w, b"\0")
        if self._thread is not None:
            self._thread.join(5.0)
        # The followers get every event, the summary last, before the process may exit.
        until = time.monotonic() + FLUSH_TIMEOUT
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.join(max(0.0, until - time.monotonic()))
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, event: Event | dict[str, Any]) -> None:
        """Keep one event of the run (a procctl.Event or its dict) for `events`."""
        body = event.to_dict() if isinstance(event, Event) else dict(event)
        with self._lock:
            self._events.append(body)
            self._snapshot = None
            self._ring_followers()

    def _ring_followers(self) -> None:
        """Wake every follower (held: self._lock). A bell already rung stays rung."""
        for bell in self._bells:
            try:
                os.write(bell, b"\0")
            except OSError:  # full: rung already
                pass

    def mark_stopping(self) -> None:
        self._stopping = True

    # -- serving -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in sel.select():
                    if key.fd == self._wake_r or self._closed:
                        return
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        continue
                    self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            _, uid, _ = peer_credentials(conn)
            check_peer_uid(uid)
        except (OSError, PermissionError) as exc:
            _send_quietly(conn, Reply.failure(f"refused: {exc}").to_line())
            conn.close()
            return
        if not self._slots.acquire(blocking=False):
            _send_quietly(conn, Reply.failure("busy: too many control connections; try again").to_line())
            conn.close()
            return
        try:
            threads.start(threading.Thread(target=self._serve, args=(conn,), name="procctl-control-conn",
                                           daemon=True))
        except OSError as exc:  # no room for a thread (limits.SystemLimit): this one is refused, the next may not be
            self._slots.release()
            _send_quietly(conn, Reply.failure(f"busy: {exc}; try again").to_line())
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            for line in _lines(conn):
                if isinstance(line, Reply):
                    conn.sendall(line.to_line())
                    if line.data.get("fatal"):
                        _discard(conn)
                        return
                    continue
                try:
                    request = Request.parse(line)
                except ProtocolError as exc:  # a request that cannot be taken: bad input (exit 2)
                    conn.sendall(_bad_input(exc).to_line())
                    continue
                if request.cmd == "events":
                    if not self._follower_slots.acquire(blocking=False):
                        conn.sendall(Reply.failure("busy: too many event streams; try again").to_line())
                        return
                    me = threading.current_thread()
                    with self._lock:
                        self._streams.add(me)
                    try:
                        self._stream_events(conn, request.follow)
                    finally:
                        with self._lock:
                            self._streams.discard(me)
                        self._follower_slots.release()
                    return
                if request.cmd == "status":
                    conn.sendall(self._status_line_or_error())
                    continue
                reply = self.answer(request)
                conn.sendall(reply.to_line())
                if reply.done is not None and request.wait:
                    # stop --workers without --no-wait: a second line once they have
                    # ended (close() waits for it to go, as for the followers).
                    me = threading.current_thread()
                    with self._lock:
                        self._streams.add(me)
                    try:
                        reply.done.wait()
                        second = (Reply.failure(f"stop failed: {reply.done.error}") if reply.done.error is not None
                                  else Reply(True, {"stopped": reply.data["stopping"]}))
                        conn.sendall(second.to_line())
                    finally:
                        with self._lock:
                            self._streams.discard(me)
                    return
        except OSError:
            pass  # the client went away or was too slow: nothing of the run depends on it
        finally:
            self._slots.release()  # first: a client that sees the end finds its place free
            conn.close()

    def _status_line_or_error(self) -> bytes:
        try:
            return self.status_line()
        except Exception as exc:  # noqa: BLE001 - a request must never disturb the run
            return Reply.failure(f"status failed: {exc}").to_line()

    def answer(self, request: Request) -> Reply:
        """The reply to one request (every command but events)."""
        try:
            handler = getattr(self, f"_do_{request.cmd}")
            reply: Reply = handler(request)
            if request.cmd not in ("info", "status", "metrics"):
                self._snapshot = None
            return reply
        except Exception as exc:  # noqa: BLE001 - a request must never disturb the run
            log.debug("control request %s failed", request, exc_info=True)
            return Reply.failure(f"{request.cmd} failed: {exc}")

    # -- commands ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        pc = self.hooks.controller()
        statuses: list[WorkerStatus] = pc.status() if pc is not None else []
        return self._info(pc, statuses)

    def _info(self, pc: Any, statuses: list[WorkerStatus]) -> dict[str, Any]:
        if pc is None:
            state = "starting"
        elif statuses and not any(s.alive for s in statuses):
            state = "ended"
        elif self._stopping or pc.state.name == "STOPPED":
            state = "stopping"
        else:
            state = pc.state.name.lower()
        return {"name": self.name, "pid": self.pid, "job": self.hooks.job,
                "workers": pc.workers if pc is not None else 0, "state": state,
                "elapsed": round(time.monotonic() - self._t0, 3), "socket": self.path}

    def _do_info(self, request: Request) -> Reply:
        return Reply(True, self.info())

    def _do_status(self, request: Request) -> Reply:
        return Reply(True, dict(self.status()))

    def status_line(self) -> bytes:
        """The status reply, encoded once per snapshot."""
        body = self.status()
        with self._snapshot_lock:
            cached = self._encoded
            if cached is not None and cached[0] is body:
                return cached[1]
        line = Reply(True, dict(body)).to_line()
        with self._snapshot_lock:
            self._encoded = (body, line)
        return line

    def status(self) -> dict[str, Any]:
        """The run and its workers, reused for STATUS_CACHE seconds unless something happened."""
        with self._snapshot_lock:
            now = time.monotonic()
            if self._snapshot is not None and now - self._snapshot[0] < STATUS_CACHE:
                return self._snapshot[1]
            pc = self.hooks.controller()
            statuses: list[WorkerStatus] = pc.status() if pc is not None else []
            body = self._info(pc, statuses)
            everyone = body["state"] == "stopping"
            body["workers"] = [self._worker(s, everyone) for s in statuses]
            self._snapshot = (now, body)
            return body

    def _worker(self, s: WorkerStatus, stopping: bool) -> dict[str, Any]:
        cpu, rss = self._usage.of(s)
        fraction = None
        if s.done is not None and s.total:
            fraction = min(1.0, s.done / s.total)
        if not s.alive:
            state = "ended"
        elif stopping or self._retiring.get(s.worker_id, -1) == s.pid:
            state = "stopping"  # told to stop (a stop is never acknowledged: it ends the worker)
        else:
            state = s.state.name.lower()
        return {"id": s.worker_id, "pid": s.pid, "state": state,
                "alive": s.alive, "outcome": s.outcome.value if s.outcome else None,
                "restarts": int(getattr(s, "restarts", 0) or 0), "done": s.done, "total": s.total,
                "progress": fraction, "rate": s.rate, "eta": None if state == "stopping" else s.eta,
                "info": dict(s.info),
                "cpu_percent": cpu, "rss": rss, **({"node": s.node} if getattr(s, "node", None) else {})}

    def _do_pause(self, request: Request) -> Reply:
        return self._broadcast(request, "pause")

    def _do_resume(self, request: Request) -> Reply:
        return self._broadcast(request, "run")

    def _broadcast(self, request: Request, method: str) -> Reply:
        pc = self._live_controller()
        if isinstance(pc, Reply):
            return pc
        kwargs: dict[str, Any] = {"timeout": ACK_WAIT}
        if request.workers is not None:
            if not _accepts(getattr(pc, method), "workers"):
                return Reply.failure(f"this run does not support {request.cmd} of single workers"
                                     " (--workers); it needs a controller with per-worker commands")
            kwargs["workers"] = list(request.workers)
            ended = _ended(pc, request.workers)
            if ended:
                return Reply.failure(f"worker{'s' if len(ended) > 1 else ''} {', '.join(map(str, ended))} of this"
                                     f" run {'have' if len(ended) > 1 else 'has'} ended: nothing to {request.cmd}")
        try:
            getattr(pc, method)(**kwargs)
        except TimeoutError as exc:
            # The command stays posted: busy workers apply it at their next checkpoint.
            return Reply(True, {"acknowledged": False, "note": str(exc)})
        except ValueError as exc:
            return _bad_input(exc)
        except RuntimeError as exc:
            return Reply.failure(str(exc))
        return Reply(True, {"acknowledged": True})

    def _do_stop(self, request: Request) -> Reply:
        if request.workers is not None:
            return self._stop_some(request.workers)
        self._stopping = True
        self.hooks.stop()
        if not request.wait:
            return Reply(True, {"stopping": "all"})
        # A second reply once the run has ended: a command's (run, map, sum)
        # with the command itself (close() tells it); a script's once every
        # worker has ended: the script may go on with other work, its
        # controller open, and its last worker may end with no event (hung).
        done = _StopDone()
        with self._lock:
            if self._closed:
                return Reply(True, {"stopping": "all"})
            self._stops.add(done)
        wait_ended = getattr(self.hooks.controller(), "wait_ended", None)
        if self.hooks.job.startswith("script ") and wait_ended is not None:
            # (wait_ended carries the stop out too, should the script not be waiting)
            try:
                threads.start(threading.Thread(target=self._see_through, args=(partial(wait_ended, None), done),
                                               name="procctl-control-stop", daemon=True))
            except OSError:  # no room for a thread: told at close(), as a command's
                pass
        return Reply(True, {"stopping": "all"}, done=done)

    def _stop_some(self, ids: tuple[int, ...]) -> Reply:
        """Begin the stop of workers `ids` and answer at once: the stop (grace,
        escalation) goes on in a thread of its own, whose end the reply's `done`
        tells (for a second reply to one who waits, see _serve)."""
        pc = self._live_controller()
        if isinstance(pc, Reply):
            return pc
        stop = getattr(pc, "stop", None)  # (a map run's hooks have none: it stops as a whole)
        if stop is None or not _accepts(stop, "workers"):
            return Reply.failure("this run does not support stop of single workers (--workers)")
        from .controller import check_worker_ids

        statuses = {s.worker_id: s for s in pc.status()}
        try:
            ids = tuple(check_worker_ids(ids, len(statuses)))
        except ValueError as exc:
            return _bad_input(exc)
        # An ended worker is nothing to stop, unless it waits for its restart: the
        # stop holds it (as stop(workers=) does), and it is never restarted.
        ended = _ended(pc, ids)
        if ended:
            return Reply.failure(f"worker{'s' if len(ended) > 1 else ''} {', '.join(map(str, ended))} of this"
                                 f" run {'have' if len(ended) > 1 else 'has'} ended: nothing to stop")
        done = _StopDone()
        retiring = {i: statuses[i].pid for i in ids if statuses[i].alive}
        with self._lock:
            if self._closed:
                return Reply.failure("the run is ending")
            self._retiring.update(retiring)
            self._stops.add(done)
        try:
            threads.start(threading.Thread(target=self._see_through, args=(partial(stop, workers=list(ids)), done),
                                           name="procctl-control-stop", daemon=True))
        except OSError as exc:  # no room for a thread: nothing began
            with self._lock:
                self._stops.discard(done)
                for i in retiring:
                    self._retiring.pop(i, None)
            return Reply.failure(f"busy: {exc}; try again")
        return Reply(True, {"stopping": list(ids)}, done=done)

    def _see_through(self, stop: Callable[[], Any], done: _StopDone) -> None:
        """Carry out (or wait for) a stop from the control socket, then set `done`."""
        try:
            stop()
        except Exception as exc:  # noqa: BLE001 - told to the one who waits for it
            log.debug("a stop from the control socket failed", exc_info=True)
            done.error = str(exc) or type(exc).__name__
        finally:
            with self._lock:
                self._stops.discard(done)
            done.set()

    def _do_scale(self, request: Request) -> Reply:
        pc = self._live_controller()
        if isinstance(pc, Reply):
            return pc
        if self.hooks.scale is None:
            kind = self.hooks.job.split()[0] if self.hooks.job else ""
            who = {"run": "procctl run --cluster", "": "it"}.get(kind, f"procctl {kind}")
            return Reply.failure(f"this run does not support scale: {who} keeps the number of workers it started with")
        assert request.n is not None  # Request.parse requires n for scale
        scale, n = self.hooks.scale, request.n
        failed: list[BaseException] = []
        finished, answered = threading.Event(), threading.Event()

        def resize() -> None:
            try:
                scale(n)
            except BaseException as exc:  # noqa: BLE001 - answered below, or said on the run's stderr
                failed.append(exc)
                if answered.is_set():  # (its caller was told it was under way)
                    log.warning("the scale to %d workers failed: %s", n, exc)
            finally:
                finished.set()

        try:
            threads.start(threading.Thread(target=resize, name="procctl-control-scale", daemon=True))
        except OSError as exc:  # no room for a thread: nothing began
            return Reply.failure(f"busy: {exc}; try again")
        if not finished.wait(SCALE_ANSWER):
            # A shrink waits for the removed workers (their grace), a growth of thousands
            # for their start: it goes on, and the caller is told so, not a timeout.
            answered.set()
            if not finished.is_set():
                return Reply(True, {"workers": n, "pending": True})
        if failed:
            error = failed[0]
            if isinstance(error, BeyondCapacity):  # more than the system lets it start: bad input, as --workers's
                return Reply.bad_input(str(error))
            if isinstance(error, (RuntimeError, ValueError)):  # the run's refusal (--max-workers, a stop)
                return Reply.failure(str(error))
            raise error
        now = getattr(pc, "workers", request.n)
        if now != request.n:  # a stop came while it grew: it grew no further
            return Reply.failure(f"the run began to stop while it grew: {now} workers, not {request.n}")
        return Reply(True, {"workers": request.n})

    def _do_metrics(self, request: Request) -> Reply:
        return Reply(True, {"text": self.metrics_text()})

    def metrics_text(self) -> str:
        from .metrics import render_metrics

        body = self.status()
        # The run's own counts (counters never go down): the workers' sums lose the restarts
        # of those a shrink removed, and the work of earlier incarnations.
        pc = self.hooks.controller()
        done = getattr(pc, "_tasks_done_total", None)
        return render_metrics(body, body["workers"], getattr(pc, "_restarts_total", None),
                              done() if callable(done) else None)

    def _live_controller(self) -> Any:
        pc = self.hooks.controller()
        if pc is None:
            return Reply.failure("the run has not started its workers yet")
        if self._stopping:
            return Reply.failure("the run is stopping")
        return pc

    def _stream_events(self, conn: socket.socket, follow: bool) -> None:
        """The events from the start; with `follow`, then live until the run ends
        or the follower goes away (its end closed: the stream and its connection end)."""
        conn.settimeout(None)  # a follower may read slowly; the run never waits for it
        conn.sendall(Reply(True, {"events": "follow" if follow else "all"}).to_line())
        bell_r = bell_w = -1
        if follow:
            bell_r, bell_w = os.pipe()
            os.set_blocking(bell_r, False)
            os.set_blocking(bell_w, False)
            with self._lock:
                self._bells.add(bell_w)
        waiting = select.poll()
        if follow:
            waiting.register(conn, select.POLLIN)
            waiting.register(bell_r, select.POLLIN)
        try:
            sent = 0
            while True:
                with self._lock:
                    batch = self._events[sent:]
                    done = self._closed or not follow
                sent += len(batch)
                if batch:
                    conn.sendall(b"".join(json_bytes(e) for e in batch))
                if done and sent == len(self._events):
                    conn.sendall(END_OF_EVENTS + b"\n")  # (a run that dies mid-stream sends none)
                    return
                if not batch and not done:  # wait for an event, the end, or the follower's going
                    for fd, _ in waiting.poll():
                        if fd == bell_r:
                            os.read(bell_r, 65536)  # (a pipe's worth of rings: all of them)
                        elif not conn.recv(4096):  # (what a follower writes is not read)
                            return
        finally:
            if follow:
                with self._lock:
                    self._bells.discard(bell_w)
                os.close(bell_r)
                os.close(bell_w)


def _accepts(method: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _lines(conn: socket.socket) -> Iterator[bytes | Reply]:
    """The request lines of a connection; a Reply for a truncated or oversized one."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            if len(buffer) >= MAX_REQUEST:
                yield Reply(False, {"fatal": True}, f"request too long: more than {MAX_REQUEST} bytes"
                            " without a newline")
                return
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                if buffer.strip():
                    yield Reply.failure("truncated request: the connection ended before its newline")
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        if len(line) >= MAX_REQUEST:
            yield Reply(False, {"fatal": True}, f"request too long: more than {MAX_REQUEST} bytes")
            return
        if line.strip():
            yield line


def _discard(conn: socket.socket) -> None:
    """Read and drop the rest of an oversized request (bounded), so the sender sees the reply."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(2.0)
    dropped = 0
    while dropped < DISCARD_LIMIT:
        chunk = conn.recv(1 << 20)
        if not chunk:
            return
        dropped += len(chunk)


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall(data)
    except OSError:
        pass


def _age(pid: int) -> float | None:
    """Seconds since process `pid` started, to a clock tick: /proc's own clock
    (psutil's create_time() adds the boot time, which /proc gives in whole seconds)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", "rb") as f:
            up = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return up - start / os.sysconf("SC_CLK_TCK")


class _Usage:
    """CPU % and RSS of each worker, measured with psutil at most every USAGE_INTERVAL."""

    def __init__(self) -> None:
        self._procs: dict[int, Any] = {}
        self._last: dict[int, tuple[float, float, int]] = {}  # worker -> (when, cpu, rss)
        self._lock = threading.Lock()

    def of(self, s: WorkerStatus) -> tuple[float | None, int | None]:
        import psutil

        if not s.alive or s.pid is None:
            return None, None
        with self._lock:
            now = time.monotonic()
            proc = self._procs.get(s.worker_id)
            last = self._last.get(s.worker_id)
            if proc is not None and proc.pid == s.pid and last is not None and now - last[0] < USAGE_INTERVAL:
                return last[1], last[2]
            try:
                if proc is None or proc.pid != s.pid:
                    proc = self._procs[s.worker_id] = psutil.Process(s.pid)
                    # psutil's first call only starts its count (it says 0.0): the
                    # first figure is the mean since the process started instead.
                    proc.cpu_percent(None)
                    times = proc.cpu_times()
                    age = max(_age(s.pid) or time.time() - proc.create_time(), 0.01)
                    cpu = min(100.0 * (times.user + times.system) / age, 100.0 * (os.cpu_count() or 1))
                else:
                    cpu = float(proc.cpu_percent(None))
                rss = int(proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return None, None
            self._last[s.worker_id] = (now, cpu, rss)
            return cpu, rss


# -- the client ---------------------------------------------------------------------


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        unixpath.connect(sock, path)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        remove_stale(path)
        raise ControlError(f"the run at {path} is gone") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach the run at {path}: {exc.strerror or exc}") from None
    return sock


def peer_pid(path: str) -> int | None:
    """The pid of the process that listens on `path` (what the kernel says of
    it, SO_PEERCRED: also for a run that does not answer), or None."""
    try:
        sock = connect(path, 1.0)
    except ControlError:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", creds)[0]
        return pid
    except OSError:
        return None
    finally:
        sock.close()


def read_line(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """The next line from `sock` (None at the end), keeping the rest in `buffer`."""
    while True:
        cut = buffer.find(b"\n")
        if cut >= 0:
            line = bytes(buffer[:cut])
            del buffer[:cut + 1]
            return line
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None
        buffer += chunk


def ask(path: str, request: Request, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply's body; ControlError if there is none."""
    sock = connect(path, timeout)
    try:
        try:
            sock.sendall(request.to_line())
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read (busy): its reason may be waiting
        line = read_line(sock, bytearray())
    except OSError as exc:
        if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
            raise NoAnswer(f"the run at {path} did not answer within {timeout:g}s") from None
        raise ControlError(f"the run at {path} went away: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if line is None:
        raise ControlError(f"the run at {path} ended before it answered")
    reply: dict[str, Any] = json.loads(line)
    return reply
