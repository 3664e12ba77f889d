"""Imported by the fork server only (see controller._preload_in_fork_server).

It loads the worker side once, so that forkserver workers do not each import
it after their fork, and it keeps the fork server standing through a SIGTERM
sent to the whole process group: the fork server is the parent of every
forkserver worker, and its death would take them down with it (their
parent-death signal), where a group SIGTERM is meant to stop them gracefully.
multiprocessing's resource tracker ignores SIGTERM for the same reason. The
fork server still exits as soon as its manager is gone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal

# A Ctrl-C (SIGINT to the whole process group) while the fork server loads
# the worker side would print a KeyboardInterrupt traceback from it, and
# take it down: ignored for the time of the import. Its children then get
# what the server had before (multiprocessing keeps that for them).
_was = signal.signal(signal.SIGINT, signal.SIG_IGN) if os.getpid() != 1 else None

from . import worker  # noqa: E402, F401 - the preload itself
from .threads import MANAGED_SIGNALS  # noqa: E402
from .worker import WORKER_NAME_PREFIX  # noqa: E402

if _was is not None:
    signal.signal(signal.SIGINT, _was)


class _Hook:
    """What multiprocessing's after-fork registry holds on to (it keeps weak references)."""


_hook = _Hook()
#: The fork server. Both hooks are inherited by every process below it (the
#: registries are the process's state), but they are for its own children:
#: what those fork later keeps the mask and handlers its parent gave it.
_SERVER = os.getpid()


def _child_signals() -> None:
    # The fork server was started with the operator's signals blocked
    # (controller._helpers_first) and keeps them so: a Ctrl-C, SIGHUP or
    # SIGUSR1 to the process group never ends it. Its children (ours and
    # anyone's) keep them blocked through their start (a forkserver child
    # imports the parent's main module again) and get SIGTERM's default.
    if os.getppid() == _SERVER:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _unblock_unless_ours(_: object) -> None:
    # Run by multiprocessing in each child just before its target: anyone's
    # process gets the usual mask back; ours keeps it until the worker has
    # its own handlers (worker.py), so a Ctrl-C meanwhile is held, not raised.
    if os.getppid() == _SERVER and not multiprocessing.current_process().name.startswith(WORKER_NAME_PREFIX):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGED_SIGNALS)


if os.getpid() != 1:  # never alter what a pid-1 init does with signals
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.register_at_fork(after_in_child=_child_signals)
    multiprocessing.util.register_after_fork(_hook, _unblock_unless_ours)
