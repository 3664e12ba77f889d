"""Worker side of output capture: send this worker's stdout and stderr to the manager.

`run_captured` wraps the user's target: before it runs, file descriptors 1
and 2 become one pipe whose read end it hands to the manager's capture
server (capture.py) over a Unix socket,
and (on a terminal, or with --log-dir) Python's streams write each line
through, so nothing printed before a crash is lost. If the manager does not answer, the worker keeps its streams.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import unixpath

#: How long the worker waits for the capture server to accept it.
HANDSHAKE_TIMEOUT = 5.0
#: The output pipe's capacity, asked for (Linux: F_SETPIPE_SZ).
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(frozen=True)
class CaptureSpec:
    """Where a worker sends its output: the manager's capture socket, and
    whether its Python streams write each line through (on a terminal, and
    for --log-dir) or buffer as Python does for a pipe."""

    path: str
    line_buffered: bool = True


def run_captured(ctx: Any, spec: CaptureSpec, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `target(ctx, *args, **kwargs)` with stdout and stderr going to the manager."""
    redirect_output(spec, ctx.worker_id)
    return target(ctx, *args, **kwargs)


def redirect_output(spec: CaptureSpec, worker_id: int) -> bool:
    """Point fds 1 and 2 at a pipe the manager reads; False (streams unchanged) if it does not answer.

    The pipe's read end travels to the manager over the capture socket
    (SCM_RIGHTS): a pipe costs a writer less than a socket does.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)  # room for a burst while the manager is busy
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default is fine
        sock.settimeout(HANDSHAKE_TIMEOUT)
        unixpath.connect(sock, spec.path)
        header = json.dumps({"worker": worker_id, "pid": os.getpid()}).encode() + b"\n"
        socket.send_fds(sock, [header], [r])
        if sock.recv(1) != b"+":  # accepted: from here on the manager reads us
            os.close(w)
            return False
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
    except OSError:
        os.close(w)
        return False
    finally:
        os.close(r)
        sock.close()
    if spec.line_buffered:
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                # Each line reaches the pipe when written: a crash loses none.
                reconfigure(line_buffering=True)
    return True
