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

import os
import signal

# A Ctrl-C (SIGINT to the whole process group) while the fork server loads
# the worker side would print a KeyboardInterrupt traceback from it, and
# take it down: ignored for the time of the import. Its children then get
# what the server had before (multiprocessing keeps that for them).
_was = signal.signal(signal.SIGINT, signal.SIG_IGN) if os.getpid() != 1 else None

from . import worker  # noqa: E402, F401 - the preload itself

if _was is not None:
    signal.signal(signal.SIGINT, _was)

if os.getpid() != 1:  # never alter what a pid-1 init does with signals
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Children of the fork server (ours and anyone's) get the default back at once.
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
