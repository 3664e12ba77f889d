"""The exceptions of the work plane, shared by both sides of the process boundary."""

from __future__ import annotations


class Closed(Exception):
    """The channel is closed and empty, or this worker was stopped: nothing more will come."""


class WorkerCrashed(RuntimeError):
    """The worker running a task died (signal, os._exit, segfault) before it answered."""


class TaskTimeout(TimeoutError):
    """A task ran longer than the executor's task_timeout; its worker was killed."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as its `__cause__`."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def format_exc() -> str:
    """traceback.format_exc(), traceback imported on first use: a worker that
    never fails never loads it (about 4 ms of a spawn worker's start)."""
    import traceback

    return traceback.format_exc()
