"""The open controllers of this process.

A module of its own, imported by the pytest plugin when pytest loads it: one
registry then outlives a re-import of procctl.controller (pytest's in-process
runs drop the modules they imported), and the plugin still finds every
controller's workers, whichever copy of the module made them.
"""

from __future__ import annotations

import weakref
from typing import Any

#: Every started, not yet closed ProcessController (weakly: a forgotten one may go).
open_controllers: weakref.WeakSet[Any] = weakref.WeakSet()
