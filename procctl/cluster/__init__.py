"""procctl across a Dask cluster: `ClusterController` and `ClusterExecutor`.

Needs Dask distributed (``pip install 'procctl[dask]'``); `import procctl`
and the one-machine paths never load it.
"""

from __future__ import annotations

try:
    import distributed  # noqa: F401 - the check that the extra is installed
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "procctl.cluster needs Dask distributed: pip install 'procctl[dask]'"
    ) from exc

from .controller import ClusterController, connect
from .executor import ClusterExecutor

__all__ = ["ClusterController", "ClusterExecutor", "connect"]
