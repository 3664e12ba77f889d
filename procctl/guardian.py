"""The guardian: a small process that cleans up after a manager that was SIGKILLed.

A worker dies with its manager (the kernel's parent-death signal), but what
the worker started would be handed to init and live on. One guardian per
manager process watches the manager through a pidfd; the manager tells it,
over a pipe, which process groups and cgroups its workers lead; when the
manager dies the guardian kills them all and exits. It runs in its own
session, so a signal to the manager's process group leaves it standing, and
it is a fresh interpreter (not a fork of the manager), so it holds none of
the manager's memory. It is not the manager's child: a go-between starts it
and exits at once, so that after close() the manager has no process of
procctl's below it (a user's "no child left" check, psutil's children()),
while the guardian stays for the next controller.

    manager (guardian.Link)  -- notes: "+pid" "-pid" "c/path" "u/path" "x" -->  guardian_process.main()
                             -- bell: a byte, "read your notes" ------------>
    manager exits            -- pidfd readable ----------------------------->  kill groups, cgroups; exit

The manager-side half (`Link`) starts it on first use and never waits for it:
registrations wait in the pipe, so a manager killed before the guardian is
up is still cleaned up after.

The guardian does not read the notes as they come: a write it woke for would
take a CPU from the manager at the worst moment (a hundred workers starting
or ending), and it needs them only once the manager is gone. They wait in
the notes pipe, which it watches for its end only; the manager rings the bell
when the pipe is a quarter full, so that it never fills, and at release.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import subprocess
import sys
import threading
from typing import IO

from . import threads

log = logging.getLogger("procctl")

#: How long the thread that reaps the go-between waits for it to say the guardian's pid.
GO_BETWEEN_WAIT = 60.0
#: The notes pipe's size where the kernel cannot say (64 KiB, 8 KiB for a user
#: past fs.pipe-user-pages-soft): the bell rings at a quarter of it.
PIPE_BUF_DEFAULT = 8192


# -- the manager's side --------------------------------------------------------------


class Link:
    """The manager's end: starts the guardian, tells it what to clean up."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        #: The go-between (our child until it exits, right after it forked the guardian).
        self.process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        #: The read end the guardian holds the other end of: closed when it has exited.
        self._out: IO[bytes] | None = None
        self._w = -1
        self._bell = -1
        #: Bytes written since the last ring, and how many call for one.
        self._unread = 0
        self._ring_at = PIPE_BUF_DEFAULT // 4
        self._lock = threading.Lock()
        self._settling = threading.Lock()
        self._releasing = False
        self._pending: list[str] = []
        r, w = os.pipe()
        bell_r, bell_w = os.pipe()
        with contextlib.suppress(OSError):
            self._ring_at = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) // 4
        try:
            me = os.pidfd_open(self.owner)
        except (AttributeError, OSError):  # pragma: no cover - no pidfd here
            me = -1
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {package_root!r}); "
                f"from procctl.guardian_process import main; main({self.owner}, {me}, {r}, {bell_r})")
        passed = (r, bell_r) if me < 0 else (r, bell_r, me)
        try:
            # -I -S: no user site, no PYTHON* variables, no site: a fast, plain start.
            # -I drops PYTHONDONTWRITEBYTECODE too, so -B carries the manager's own
            # choice (as multiprocessing's spawn passes the interpreter's flags).
            flags = ["-I", "-S", "-B"] if sys.dont_write_bytecode else ["-I", "-S"]
            self.process = subprocess.Popen(
                [sys.executable, *flags, "-c", code], pass_fds=passed,
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            )
        except OSError as exc:
            log.warning("cannot start the guardian (%s): what workers start may outlive a killed manager", exc)
            os.close(w)
            os.close(bell_w)
        else:
            self._w, self._bell = w, bell_w
            os.set_inheritable(w, False)
            os.set_inheritable(bell_w, False)
            self._out = self.process.stdout
            # Reaped as soon as it has said the guardian's pid, not at close():
            # a zombie child all through the run trips a script's own checks
            # (psutil's children(), then ZombieProcess on the first call).
            with contextlib.suppress(OSError):  # (no room for a thread: then at close(), as before)
                threads.start(threading.Thread(target=self._settle_when_said, name="procctl-guardian-settle",
                                               daemon=True))
        finally:
            os.close(r)
            os.close(bell_r)
            if me >= 0:
                os.close(me)

    @property
    def pid(self) -> int | None:
        """The guardian's pid (waits for the go-between, at most a few seconds)."""
        self.settle()
        return self._pid

    def _settle_when_said(self) -> None:
        """settle() once the go-between has said the guardian's pid (it waits
        for that without the lock, and as long as a loaded machine may take:
        close() settles on its own meanwhile, with its own bound)."""
        out = self._out
        if out is None:
            return
        poller = select.poll()
        try:
            poller.register(out.fileno(), select.POLLIN)
            poller.poll(int(GO_BETWEEN_WAIT * 1000))
        except (OSError, ValueError):  # closed meanwhile: close() settled
            return
        self.settle()

    def settle(self, timeout: float = 5.0) -> None:
        """Reap the go-between once it has said the guardian's pid: after
        this no process of ours is the manager's child."""
        if self.process is None or os.getpid() != self.owner:
            return
        with self._settling:
            process = self.process
            if process is None or self._out is None:
                return
            line = _read_line(self._out.fileno(), timeout)
            try:
                self._pid = int(line)
            except ValueError:
                log.warning("the guardian did not start: what workers start may outlive a killed manager")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
            if process.returncode is not None:
                self.process = None

    def note(self, kind: str, arg: object) -> None:
        """Queue a message for the next flush(): the starts and ends of a
        batch of workers go in one write."""
        if self._w < 0 or os.getpid() != self.owner:
            return
        with self._lock:
            self._pending.append(f"{kind}{arg}\n")

    def send(self, kind: str, arg: object) -> None:
        """Send a message now (with whatever was noted before it)."""
        self.note(kind, arg)
        self.flush()

    def flush(self) -> None:
        # Called after each pass of the controller's loop: nothing noted is the
        # common case, answered without a system call or the lock. A write
        # wakes nobody (see the module docstring); a ring, rarely, does.
        if not self._pending or self._w < 0 or os.getpid() != self.owner:
            return
        with self._lock:
            if not self._pending or self._w < 0:  # (released meanwhile)
                return
            self._write("".join(self._pending).encode())
            self._pending.clear()

    def _write(self, data: bytes) -> None:
        """Write `data` to the notes pipe, a quarter of it at most at a time,
        ringing the bell before a part that the notes since the last ring would
        take past that quarter (held: self._lock). A write can then wait only
        for a guardian that has been rung since what fills the pipe came."""
        view = memoryview(data)
        try:
            while view:
                part = view[: self._ring_at]
                if self._unread + len(part) > self._ring_at:
                    os.write(self._bell, b".")
                    self._unread = 0
                while part:
                    n = os.write(self._w, part)
                    part, view = part[n:], view[n:]
                    self._unread += n
        except OSError as exc:
            self.settle()  # one that never started says so there (a process limit): once
            if self._pid is not None and not self._releasing:
                # (At release, one gone has nothing left to guard: a worker's own
                # controller's guardian, ended with the worker's tree, ends so.)
                log.warning("the guardian is gone (%s): what workers start may outlive a killed manager", exc)
            with contextlib.suppress(OSError):
                os.close(self._w)
            with contextlib.suppress(OSError):
                os.close(self._bell)
            self._w = self._bell = -1

    def _ring(self) -> None:
        with self._lock:
            if self._bell >= 0:
                try:
                    os.write(self._bell, b".")
                except OSError:
                    pass
                self._unread = 0

    def release(self, timeout: float = 2.0) -> None:
        """At the manager's clean exit: let the guardian clean up and end, and wait for it."""
        if self._w < 0 or os.getpid() != self.owner:
            return
        self._releasing = True
        self.send("x", "")
        self._ring()
        with self._lock:
            for fd in (self._w, self._bell):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._w = self._bell = -1
        self.settle(timeout)
        with self._settling:
            if self.process is None and self._out is not None:
                _read_line(self._out.fileno(), timeout)  # "" once the guardian has exited: its end closed
                self._out.close()
                self._out = None


def _read_line(fd: int, timeout: float) -> str:
    """What comes on `fd` up to a newline or its end, waiting at most `timeout`."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while not data.endswith(b"\n"):
        if not poller.poll(max(0, int(timeout * 1000))):
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


_link: Link | None = None
_link_lock = threading.Lock()


def release_at_exit() -> None:
    """Let this process's guardian go (called once the controllers are closed at exit)."""
    current = _link
    if current is not None:
        current.release()


def release_if_unused() -> None:
    """Let this process's guardian go now if no controller here is open.

    For a process that runs controllers now and then and lives on between
    them (a Dask worker running procctl's node agents): it keeps no guardian
    between two runs; the next controller starts a new one. A controller
    registers itself as open before it takes the link, so one starting
    meanwhile either keeps this guardian or starts its own."""
    global _link
    from . import registry

    with _link_lock:
        current = _link
        if current is None or current.owner != os.getpid() or len(registry.open_controllers):
            return
        _link = None
    current.release()


def link() -> Link:
    """This process's guardian link, started on first use."""
    global _link
    with _link_lock:
        if _link is None or _link.owner != os.getpid():
            _link = Link()
        return _link


def guardian_pid() -> int | None:
    """The pid of this process's guardian, if one was started."""
    current = _link
    return current.pid if current is not None and current.owner == os.getpid() else None
