"""Run the procctl command line as a user would, in its own session, with deadlines."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable

from procs import still_running

PYTHON = sys.executable
CLI = [PYTHON, "-m", "procctl"]


def run_cli(args: list[str], timeout: float = 60, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=cwd)


class LiveCli:
    """A running `procctl` whose stdout lines the test can wait for."""

    def __init__(self, args: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
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
                    raise AssertionError(f"procctl exited early ({self.proc.wait()}); output: {self.lines[-20:]}")
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
