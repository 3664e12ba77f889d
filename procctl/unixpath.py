"""Unix socket addresses of any length.

A socket's address holds 108 bytes (``sun_path``); a runtime directory deep
in a temporary tree (pytest-xdist's, a long ``$XDG_RUNTIME_DIR``) gives
longer paths, on which bind() and connect() fail ("AF_UNIX path too long").
A long path is reached through its directory instead: opened (``O_PATH``),
it is ``/proc/self/fd/N``, and ``/proc/self/fd/N/NAME`` is short.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

#: The longest path bind() and connect() take as they are.
SUN_PATH_MAX = 107


def bind(sock: socket.socket, path: str) -> None:
    _at(sock.bind, path)


def connect(sock: socket.socket, path: str) -> None:
    _at(sock.connect, path)


def _at(call: Callable[[str], None], path: str) -> None:
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        call(path)
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        call(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)
