"""A `--target module:attr`, sent to the workers by its name.

`procctl run --target` names a callable as gunicorn and uvicorn do. The
workers get the name, not the object: under spawn and forkserver a pickled
function would be imported while the child unpickles its arguments, before
the worker has pointed its stdout at the manager (a module that prints at
import would write past the capture, on the run's stdout), and a lambda or
any object pickle refuses to send by reference would not reach them at all.
Each process resolves the name once, on its first call; under fork the
manager's resolution is inherited.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Resolved targets of this process, by their name.
_resolved: dict[str, Callable[..., Any]] = {}


@dataclass(frozen=True)
class NamedTarget:
    """Calls the callable `spec` names ("package.module:attr.attr"), importing
    its module from `path` (the directory the command ran in, None if it was
    removed) or sys.path."""

    spec: str
    path: str | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def resolve(self) -> Callable[..., Any]:
        target = _resolved.get(self.spec)
        if target is None:
            if self.path is not None and self.path not in sys.path:
                sys.path.insert(0, self.path)
            module_name, _, attr = self.spec.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            target = remember(self.spec, obj)
        return target


def remember(spec: str, target: Callable[..., Any]) -> Callable[..., Any]:
    """Record what `spec` names in this process (the manager, which checked it)."""
    _resolved[spec] = target
    return target
