"""procctl: run N worker processes you can pause, resume and stop, leaving nothing behind."""

from .controller import ProcessController, WorkerStartError
from .states import Event, Outcome, State, WorkerReport, WorkerStatus
from .worker import WorkerContext

__version__ = "0.1.0"

__all__ = [
    "Event",
    "Outcome",
    "ProcessController",
    "State",
    "WorkerContext",
    "WorkerReport",
    "WorkerStartError",
    "WorkerStatus",
    "__version__",
]
