"""The output capture's own life: what it opens, it closes once."""

from __future__ import annotations

import os
import threading

import pytest

from procctl.capture import OutputCapture


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))


def test_close_as_the_capture_thread_ends_by_itself_closes_each_descriptor_once(runtime, monkeypatch):
    """close() loses the CPU right after it asked the thread to end, and the
    thread, woken by its last worker's end, ends meanwhile. Both sides closed
    the wake pipe: an EBADF (`procctl run` said "cannot write the output: Bad
    file descriptor" and gave no summary), or the close of whatever descriptor
    had taken its number meanwhile."""
    capture = OutputCapture(lambda output: None).start()
    thread = capture._thread
    wake_r, wake_w = capture._wake_r, capture._wake_w
    ended = threading.Event()
    real_join, real_is_alive, real_ident = threading.Thread.join, threading.Thread.is_alive, threading.Thread.ident

    def end_it_first(self):
        """What close() asks of its thread first: by then, the thread has ended by itself."""
        if self is thread and capture._closing and not ended.is_set():
            ended.set()
            os.write(wake_w, b"\0")  # (its last worker's end, read)
            real_join(thread, 5.0)

    def is_alive(self):
        end_it_first(self)
        return real_is_alive(self)

    def ident(self):
        end_it_first(self)
        return real_ident.fget(self)

    monkeypatch.setattr(threading.Thread, "is_alive", is_alive)
    monkeypatch.setattr(threading.Thread, "ident", property(ident))
    capture.close()
    assert ended.is_set() and not real_is_alive(thread)
    for fd in (wake_r, wake_w):
        with pytest.raises(OSError):
            os.fstat(fd)  # closed, by close(), once
    assert not os.path.exists(capture.path)
