"""Shutdown escalation and exit-status decoding, in one place."""

from __future__ import annotations

import logging
import signal
from typing import Protocol

log = logging.getLogger("procctl")

#: After the grace period: how long SIGTERM may take, then SIGKILL.
TERM_TIMEOUT = 0.5
KILL_TIMEOUT = 5.0


class Stoppable(Protocol):
    def wait_ended(self, timeout: float | None) -> bool: ...

    def signal_live(self, sig: int) -> list[int]: ...


def escalate(target: Stoppable, grace: float, term_timeout: float, kill_timeout: float) -> bool:
    """Wait for the workers to end: grace, then SIGTERM, then SIGKILL.

    STOPPED must already have been broadcast. True if every worker ended.
    """
    if target.wait_ended(grace):
        return True
    ids = target.signal_live(signal.SIGTERM)
    log.info("workers %s did not stop within %.1fs: sent SIGTERM", ids, grace)
    if target.wait_ended(term_timeout):
        return True
    ids = target.signal_live(signal.SIGKILL)
    log.warning("workers %s ignored SIGTERM: sent SIGKILL", ids)
    if target.wait_ended(kill_timeout):
        return True
    log.error("workers %s survived SIGKILL for %.1fs", ids, kill_timeout)
    return False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended, telling a signal from an exit code."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        return f"was killed by {signal_name(-exitcode)}"
    return f"exited with code {exitcode}"


def crash_message(exitcode: int | None) -> str:
    hint = ""
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == signal.SIGKILL:
            hint = " (kill -9, or the out-of-memory killer)"
        elif sig == signal.SIGSEGV:
            hint = " (a segmentation fault in native code)"
    elif exitcode is not None:
        hint = " (os._exit, or an interpreter failure)"
    return f"the worker process {describe_exit(exitcode)} without reporting{hint}"
