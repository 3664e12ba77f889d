"""The manager's own threads start with the operator's signals blocked.

CPython runs signal handlers in the main thread only. When the kernel hands a
signal to another thread, Python's C handler there marks it pending but does
not wake the main thread: a main thread asleep in a wait (the controller's
epoll, `reap()` without a timeout) runs the handler only when something else
wakes it, which may be never. With every thread procctl starts blocking these
signals, the kernel delivers them to the main thread, or keeps them pending
while the main thread itself holds them blocked (as it does around a fork) and
delivers them the moment it lets them go.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from . import limits

#: The signals an operator sends the manager (and a worker resets for its own).
MANAGED_SIGNALS = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
     signal.SIGTTIN, signal.SIGTTOU}
)


def exit_now(code: int) -> NoReturn:
    """End the process at once with `code`, its standard streams flushed: no
    more exit handlers, no wait for other threads (each caller says why)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@contextmanager
def blocked() -> Iterator[None]:
    """MANAGED_SIGNALS blocked in the calling thread for the block: what it
    starts meanwhile (a thread, a forked child) inherits the mask."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start(thread: threading.Thread) -> None:
    """`thread.start()`, the new thread inheriting a mask that blocks MANAGED_SIGNALS.

    A thread the system refuses (a process or memory limit) raises
    limits.SystemLimit, an OSError naming the limit, as a refused fork does."""
    with blocked():
        try:
            thread.start()
        except RuntimeError as exc:
            if "can't start new thread" not in str(exc):
                raise
            raise limits.thread_refused() from None
