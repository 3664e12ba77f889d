"""The manager's listening sockets, closed in every process it forks.

A forked worker holds a copy of each descriptor the manager has open: a
listener's copy keeps its port bound (`--metrics-addr`), and connections can
wait on it, for as long as any worker (or what a worker started) lives, so
that a manager killed and started again on the same port finds it in use. The
sockets are not inheritable across exec already; this covers fork, and only
the listeners (whatever else a worker inherits is its business). Manager side.
"""

from __future__ import annotations

import os
import socket
import weakref

_listeners: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def close_in_children(sock: socket.socket) -> None:
    """Close `sock` in every child forked from now on."""
    _listeners.add(sock)


def _close_all() -> None:
    for sock in list(_listeners):
        try:
            sock.close()  # this process's copy: the manager's stays open
        except OSError:
            pass
    _listeners.clear()


os.register_at_fork(after_in_child=_close_all)
