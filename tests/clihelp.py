"""Run the procctl command line as a user would, in its own session, with deadlines."""

from __future__ import annotations

import json
import os
import pty
import select
import selectors
import subprocess
import sys
import time
from collections.abc import Callable

from procs import still_running

PYTHON = sys.executable
CLI = [PYTHON, "-m", "procctl"]


def run_cli(args: list[str], timeout: float = 60, cwd: str | None = None, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=None if env is None else {**os.environ, **env}, input=input)


class LiveCli:
    """A running `procctl` whose stdout lines the test can wait for."""

    def __init__(self, args: list[str], cwd: str | None = None, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> None:
        self.proc = subprocess.Popen(
            CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, stdin=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env}, preexec_fn=preexec_fn,
            start_new_session=True,  # its own process group, as on a terminal
        )
        self.lines: list[str] = []
        self.err = b""
        self._buffer = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._sel.register(self.proc.stderr, selectors.EVENT_READ)

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting; output so far: {self.lines[-20:]}")
            for key, _ in self._sel.select(remaining):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    code = self.proc.wait()
                    err = (self.err + self.proc.stderr.read()).decode(errors="replace")
                    raise AssertionError(
                        f"procctl exited early ({code}); output: {self.lines[-20:]}; stderr: {err[-2000:]}")
                if key.fileobj is self.proc.stderr:
                    self.err += chunk
                else:
                    self._buffer += chunk
            *done, self._buffer = self._buffer.split(b"\n")
            self.lines.extend(line.decode() for line in done)
        return self.lines

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self._sel.close()
        text = "\n".join(self.lines) + "\n" + self._buffer.decode() + out.decode()
        return self.proc.returncode, text, (self.err + err).decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def json_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def worker_pids(events: list[dict]) -> set[int]:
    return {e["pid"] for e in events if "pid" in e}


def assert_all_gone(pids: set[int], timeout: float = 5.0) -> None:
    """Every process in `pids` has exited (none orphaned, none a zombie)."""
    alive = still_running(pids, timeout)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


def run_on_pty(args: list[str], cwd: str | None = None, timeout: float = 30,
               env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run procctl with its stdout on a pseudo-terminal, as a person would."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: become procctl
        os.environ.update(COLUMNS="100", LINES="30", **(env or {}))
        if cwd:
            os.chdir(cwd)
        os.execv(sys.executable, [sys.executable, "-m", "procctl"] + args)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")
