"""A run's figures in the Prometheus text exposition format (version 0.0.4).

`render_metrics()` turns a status reply (see control.py) into the text;
`MetricsHTTP` serves it on `/metrics` for `--metrics-addr HOST:PORT`, bound
to localhost unless the address names another host. Standard library only.
"""

from __future__ import annotations

import http.server
import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import listeners, threads
from .statecodes import Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("running", "paused", "stopping")
OUTCOMES = tuple(o.value for o in Outcome)  # every one, at 0 until it happens: a fixed series set
#: One gauge per worker: (metric, field of the worker's status, help).
PER_WORKER_GAUGES = (
    ("procctl_worker_progress", "done", "Each worker's last ctx.progress() value."),
    ("procctl_worker_progress_total", "total", "Each worker's progress total, where known."),
    ("procctl_worker_cpu_percent", "cpu_percent", "CPU use of each live worker, in percent of one core."),
    ("procctl_worker_rss_bytes", "rss", "Resident memory of each live worker."),
)


def _label(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{text}"'


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() or abs(value) >= 1e15 else str(int(value))


class _Text:
    def __init__(self, run: str) -> None:
        self.lines: list[str] = []
        self.run = run

    def family(self, name: str, kind: str, doc: str) -> None:
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float | None, **labels: Any) -> None:
        if value is None:
            return
        pairs = ",".join(f"{k}={_label(v)}" for k, v in {"run": self.run, **labels}.items())
        self.lines.append(f"{name}{{{pairs}}} {_number(float(value))}")


def render_metrics(info: dict[str, Any], workers: list[dict[str, Any]], restarts: int | None = None,
                   done: float | None = None) -> str:
    """The text for one run: `info` as the control server describes it, `workers`
    its per-worker status records, `restarts` its restarts so far and `done` its
    work done so far, if it counts them."""
    out = _Text(str(info.get("name", "")))
    live = Counter(w["state"] for w in workers if w.get("alive"))
    ended = Counter(w["outcome"] for w in workers if w.get("outcome"))
    out.family("procctl_up", "gauge", "1 while the run is live.")
    out.sample("procctl_up", 1, pid=info.get("pid", ""), job=info.get("job", ""))
    out.family("procctl_elapsed_seconds", "gauge", "Seconds since the run started.")
    out.sample("procctl_elapsed_seconds", float(info.get("elapsed", 0.0)))
    out.family("procctl_workers", "gauge", "Live workers by state.")
    for state in sorted(set(STATES) | set(live)):
        out.sample("procctl_workers", live.get(state, 0), state=state)
    out.family("procctl_workers_ended", "gauge", "Ended workers by outcome.")
    for outcome in sorted(set(OUTCOMES) | set(ended)):
        out.sample("procctl_workers_ended", ended.get(outcome, 0), outcome=outcome)
    out.family("procctl_restarts_total", "counter", "Worker restarts by the supervisor.")
    if restarts is None:
        restarts = sum(int(w.get("restarts") or 0) for w in workers)
    out.sample("procctl_restarts_total", restarts)
    out.family("procctl_tasks_done_total", "counter", "Work units done: the sum of the workers' progress.")
    if done is None:
        done = sum(float(w["done"]) for w in workers if w.get("done") is not None)
    out.sample("procctl_tasks_done_total", done)
    for name, key, help_text in PER_WORKER_GAUGES:
        out.family(name, "gauge", help_text)
        for w in workers:
            out.sample(name, w.get(key), worker=w["id"])
    return "\n".join(out.lines) + "\n"


def parse_addr(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' -> (host, port); no host means localhost."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--metrics-addr {text!r} must be HOST:PORT, e.g. 127.0.0.1:9100") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics-addr {text!r}: port {port} is not between 0 and 65535")
    return host, port


class MetricsHTTP:
    """`GET /metrics` on a thread; anything else is 404."""

    def __init__(self, addr: tuple[str, int], text: Callable[[], str]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = text().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the run's output is the operator's, not an access log

        server_class = http.server.ThreadingHTTPServer
        if ":" in addr[0]:
            import socket

            class V6(http.server.ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_class = V6
        self._server = server_class(addr, Handler)
        listeners.close_in_children(self._server.socket)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="procctl-metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host if ':' not in str(host) else f'[{host}]'}:{port}/metrics"

    def start(self) -> MetricsHTTP:
        threads.start(self._thread)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
