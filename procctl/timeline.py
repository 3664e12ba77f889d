"""Draw a run's events as a Gantt chart: an SVG file, or a self-contained HTML page.

One row per worker, time on the x axis.  A worker's "running" and "paused"
events open a span of that state that lasts until its next event; an outcome
event (finished, stopped, failed, crashed, killed, hung) ends the row with a
mark, and a ``restarting`` event after it goes on with the worker's next
incarnation on the same row.
Broadcasts are dashed vertical lines.  Standard library only: the library must
not pull in a display dependency.

Stable hooks for tests and for people styling the output::

    <g class="row" data-worker="3" id="worker-3">
        <rect class="span running"> / <rect class="span paused">
        <path class="outcome finished">   (stopped, failed, crashed, killed)
    <g class="broadcast running" data-t="1.02">   (paused, stopped)
    <g class="legend">, <g class="axis">
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from .states import error_line

__all__ = ["FORMATS", "OUTCOMES", "SPAN_STATES", "render_timeline", "timeline_format"]

#: File extensions render_timeline() can write.
FORMATS = (".svg", ".html")
SPAN_STATES = ("running", "paused")
OUTCOMES = ("finished", "stopped", "failed", "crashed", "killed", "hung")
PROBLEMS = frozenset({"failed", "crashed", "killed", "hung"})

EventLike = Any  # a procctl.Event, or a mapping like its to_dict()

# -- palette: spans are soft fills, outcomes strong colours with distinct shapes,
# so the chart still reads in greyscale and for colour-blind people.
SPAN_COLOURS = {"running": "#4c8fe0", "paused": "#f2b441"}
OUTCOME_COLOURS = {
    "finished": "#1a9850",
    "stopped": "#5b6270",
    "failed": "#d7301f",
    "crashed": "#8e44ad",
    "killed": "#1b1b1b",
    "hung": "#e6550d",
}
BROADCAST_COLOURS = {"running": "#1f5fa8", "paused": "#b07800", "stopped": "#c0392b"}
INK, MUTED, GRID, STRIPE = "#222", "#666", "#e6e8eb", "#f4f6f8"

# -- geometry (px)
WIDTH = 1200
LEFT, RIGHT = 64, 34  # room for the worker labels / for outcome marks at the end
PLOT_TARGET = 640  # aim for this plot height, within the row height bounds below
ROW_MIN, ROW_MAX = 5.0, 28.0
LABEL_MIN_GAP = 12.0  # px between two worker labels, so they never overlap
BROADCAST_LABEL_GAP = 64.0  # px between two broadcast labels on one level
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


def timeline_format(path: str | os.PathLike[str]) -> str:
    """The format for `path` (".svg" or ".html"); ValueError for anything else.

    Cheap, so a command line can reject a bad --timeline before any worker starts.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        allowed = " or ".join(FORMATS)
        where = f": {os.fspath(path)}" if os.fspath(path) else ""
        raise ValueError(f"timeline file must end in {allowed}, not {ext or 'no extension'!r}{where}")
    return ext


def render_timeline(
    events: Iterable[EventLike],
    path: str | os.PathLike[str],
    *,
    workers: int | Iterable[int] | None = None,
    title: str | None = None,
) -> None:
    """Write the run described by `events` to `path` as an SVG or HTML Gantt chart.

    `events` are procctl.Event objects or their dicts, in any order.  `workers`
    (a count, or the ids) adds a row for workers that have no event yet.  A
    ``{"event": "summary", "elapsed": ...}`` closes spans still open at the end.
    """
    fmt = timeline_format(path)
    run = build_run(events, workers)
    svg = render_svg(run, title=title)
    text = _html_page(svg, title or _default_title(run)) if fmt == ".html" else _XML_DECL + svg
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_NOT_XML.sub("\ufffd", text))


#: What XML 1.0 cannot hold, even escaped: C0 controls but tab and newlines (an error's ANSI
#: colours), and lone surrogates (an undecodable byte of a file name, as os.fsdecode gives it).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


# -- the model ------------------------------------------------------------------


@dataclass
class Span:
    state: str
    start: float
    end: float


@dataclass
class Row:
    worker: int
    spans: list[Span] = field(default_factory=list)
    outcome: str | None = None
    outcome_t: float | None = None
    detail: str | None = None  # error line or exit code, for the tooltip
    open_state: str | None = None
    open_since: float = 0.0
    #: Outcomes of earlier incarnations of a restarted worker: (outcome, t, detail).
    earlier: list[tuple[str, float, str | None]] = field(default_factory=list)

    def close_span(self, t: float) -> None:
        if self.open_state is not None:
            self.spans.append(Span(self.open_state, self.open_since, max(t, self.open_since)))
            self.open_state = None


@dataclass
class Run:
    rows: list[Row]
    broadcasts: list[tuple[float, str]]
    end: float

    def outcome_counts(self) -> dict[str, int]:
        counts = {o: 0 for o in OUTCOMES}
        for row in self.rows:
            if row.outcome is not None:
                counts[row.outcome] += 1
            for outcome, _, _ in row.earlier:
                counts[outcome] += 1
        return counts


def _as_dict(event: EventLike) -> Mapping[str, Any]:
    if isinstance(event, Mapping):
        return event
    to_dict = getattr(event, "to_dict", None)
    if callable(to_dict):
        result: Mapping[str, Any] = to_dict()
        return result
    try:
        return vars(event)
    except TypeError:  # (vars() of an int said "must have __dict__ attribute")
        raise TypeError(f"events must be procctl.Event objects or dicts, not {type(event).__name__}") from None


def _detail(e: Mapping[str, Any]) -> str | None:
    """The one line worth showing in a tooltip: the error's (states.error_line), or the exit code."""
    line = error_line(str(e["error"])) if e.get("error") else None
    if line:
        return line
    code = e.get("exitcode")
    if code is not None and e.get("event") in ("crashed", "killed"):
        return f"exit code {code}"
    return None


#: The latest time (seconds since the run began) an event may carry: far beyond
#: any run, and small enough that the axis, and microseconds in a trace, stay finite.
MAX_T = 1e15
#: No run has more workers than the kernel has process ids (pid_max is at most 2**22).
MAX_WORKERS = 2**22


def number(value: Any, limit: float = MAX_T) -> float | None:
    """`value` as a float if it is a real number (not a bool) within +-limit; else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return f if math.isfinite(f) and abs(f) <= limit else None


def worker_id(value: Any) -> int | None:
    """`value` if it is a worker id (an int from 0 below MAX_WORKERS); else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_WORKERS:
        return value
    return None


def usable(e: Mapping[str, Any]) -> bool:
    """Can the event be drawn? An event log may hold anything (a hand-edited or
    foreign line): one without a finite time, or whose worker is not an id,
    is skipped, as a torn line is."""
    return number(e.get("t")) is not None and (e.get("worker") is None or worker_id(e["worker"]) is not None)


def build_run(events: Iterable[EventLike], workers: int | Iterable[int] | None = None) -> Run:
    """Fold the events into rows of spans, outcomes and broadcast moments
    (events that are not `usable` are skipped)."""
    if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
        raise TypeError(f"events must be an iterable of procctl.Event objects or dicts, not {type(events).__name__}")
    rows: dict[int, Row] = {}
    if workers is not None:
        for wid in range(workers) if isinstance(workers, int) else workers:
            rows[int(wid)] = Row(int(wid))
    dicts = [_as_dict(e) for e in events]
    timed = sorted(((float(d["t"]), d) for d in dicts if usable(d)), key=lambda pair: pair[0])
    broadcasts: list[tuple[float, str]] = []
    end = max([0.0] + [t for t, _ in timed] + _summary_elapsed(dicts))
    for t, e in timed:
        t, kind = max(0.0, t), str(e.get("event"))
        if kind == "broadcast":
            broadcasts.append((t, str(e.get("state") or "")))
        elif e.get("worker") is not None:
            row = rows.setdefault(e["worker"], Row(e["worker"]))
            _apply(row, kind, t, e)
    for row in rows.values():
        row.close_span(end)
    return Run([rows[w] for w in sorted(rows)], broadcasts, end)


def _summary_elapsed(dicts: Sequence[Mapping[str, Any]]) -> list[float]:
    found = (number(d.get("elapsed")) for d in dicts if d.get("event") == "summary")
    return [e for e in found if e is not None]


def _apply(row: Row, kind: str, t: float, e: Mapping[str, Any]) -> None:
    if kind == "restarting" and row.outcome is not None and row.outcome_t is not None:
        # A new incarnation of the worker id: its row goes on, the mark stays.
        row.earlier.append((row.outcome, row.outcome_t, row.detail))
        row.outcome, row.outcome_t, row.detail = None, None, None
        return
    if row.outcome is not None:
        return  # a worker's row ends at its outcome; nothing after it can be drawn
    if kind in SPAN_STATES:
        row.close_span(t)
        row.open_state, row.open_since = kind, t
    elif kind in OUTCOMES:
        row.close_span(t)
        row.outcome, row.outcome_t, row.detail = kind, t, _detail(e)
    # "started", progress and anything unknown: not drawn.


# -- layout -----------------------------------------------------------------------


@dataclass
class Layout:
    n: int
    t_end: float
    row_h: float
    plot_top: float
    label_step: int
    levels: list[int]  # broadcast label level, per broadcast
    top_axis: bool

    @property
    def plot_w(self) -> float:
        return WIDTH - LEFT - RIGHT

    @property
    def plot_bottom(self) -> float:
        return self.plot_top + self.n * self.row_h

    @property
    def height(self) -> int:
        return int(math.ceil(self.plot_bottom + 44))

    def x(self, t: float) -> float:
        return LEFT + self.plot_w * min(max(t, 0.0), self.t_end) / self.t_end

    def y(self, index: int) -> float:
        return self.plot_top + index * self.row_h


def _layout(run: Run) -> Layout:
    n = len(run.rows)
    t_end = run.end if run.end > 0 else 1.0
    row_h = min(ROW_MAX, max(ROW_MIN, PLOT_TARGET / max(n, 1)))
    step = _nice_int(math.ceil(LABEL_MIN_GAP / row_h))
    scale = (WIDTH - LEFT - RIGHT) / t_end
    levels = _label_levels([LEFT + t * scale for t, _ in run.broadcasts])
    band = 16 * (max(levels) + 1) if levels else 0
    top_axis = n * row_h > 420  # tall charts get tick labels above the rows too
    plot_top = 92 + band + (16 if top_axis else 0)
    return Layout(n, t_end, row_h, plot_top, step, levels, top_axis)


def _nice_int(k: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= k."""
    base = 1
    while True:
        for m in (1, 2, 5):
            if m * base >= k:
                return m * base
        base *= 10


def _label_levels(xs: Sequence[float]) -> list[int]:
    """Stack broadcast labels on up to three levels so that close ones do not overlap."""
    last: list[float] = [-1e9, -1e9, -1e9]
    levels = []
    for x in xs:
        free = [i for i, lx in enumerate(last) if x - lx >= BROADCAST_LABEL_GAP]
        level = free[0] if free else min(range(3), key=lambda i: last[i])
        last[level] = x
        levels.append(level)
    return levels


def _ticks(t_end: float, plot_w: float) -> tuple[list[float], float]:
    target = max(2, int(plot_w // 110))
    raw = t_end / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    count = int(math.floor(t_end / step + 1e-9))
    return [i * step for i in range(count + 1)], step


def _fmt_time(t: float, step: float) -> str:
    if step >= 60:
        minutes, seconds = divmod(int(round(t)), 60)
        return f"{minutes}m{seconds:02d}s" if seconds else f"{minutes}m"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10**decimals % 1 > 1e-6:  # 2.5, 0.25: one more digit
        decimals += 1
    return f"{t:.{decimals}f}s"


def _secs(t: float) -> str:
    return f"{t:.3f}s" if t < 10 else f"{t:.2f}s"


# -- drawing ------------------------------------------------------------------------


def _default_title(run: Run) -> str:
    n = len(run.rows)
    return f"procctl run · {n} worker{'s' if n != 1 else ''}"


def _css() -> str:
    rules = [
        f"text{{font-family:{FONT};fill:{INK}}}",
        ".title{font-size:17px;font-weight:600}",
        f".subtitle{{font-size:12px;fill:{MUTED}}}",
        f".label{{font-size:10.5px;fill:{MUTED};text-anchor:end;font-variant-numeric:tabular-nums}}",
        f".tick{{font-size:10.5px;fill:{MUTED};text-anchor:middle;font-variant-numeric:tabular-nums}}",
        # A white halo, so that broadcast lines crossing a label do not strike it through.
        ".tick,.broadcast text{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}",
        f".gridline{{stroke:{GRID};stroke-width:1}}",
        f".stripe{{fill:{STRIPE}}}",
        ".legend text{font-size:12px}",
        ".broadcast line{stroke-width:1.3;stroke-dasharray:5 4}",
        ".broadcast text{font-size:11px;font-weight:600;text-anchor:middle}",
        ".outcome,.swatch{stroke:#fff;stroke-linejoin:round}",
    ]
    # Legend swatches share the colours but not the class, so that counting
    # ".span" or ".outcome" counts what happened in the run.
    rules += [f".span.{s},.swatch.{s}{{fill:{c}}}" for s, c in SPAN_COLOURS.items()]
    rules += [f".outcome.{o},.swatch.{o}{{fill:{c}}}" for o, c in OUTCOME_COLOURS.items()]
    for s, c in BROADCAST_COLOURS.items():
        rules += [f".broadcast.{s} line{{stroke:{c}}}", f".broadcast.{s} text{{fill:{c}}}"]
    return "\n".join(rules)


def render_svg(run: Run, *, title: str | None = None) -> str:
    """The chart as an SVG document (no XML declaration, so it can be inlined)."""
    lay = _layout(run)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="procctl-timeline" width="{WIDTH}" '
        f'height="{lay.height}" viewBox="0 0 {WIDTH} {lay.height}" data-workers="{lay.n}" '
        f'data-elapsed="{run.end:g}">',
        f"<style>{_css()}</style>",
        f'<rect class="background" width="{WIDTH}" height="{lay.height}" fill="#fff"/>',
    ]
    parts += _header(run, lay, title or _default_title(run))
    parts += _background(run, lay)
    parts += _axis(lay)
    parts += [_row(i, row, lay) for i, row in enumerate(run.rows)]
    parts += _broadcasts(run, lay)
    if not run.rows:
        parts.append(f'<text class="subtitle" x="{LEFT}" y="{lay.plot_top + 20:.1f}">no worker events</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _header(run: Run, lay: Layout, title: str) -> list[str]:
    counts = run.outcome_counts()  # per outcome in the legend, not repeated here
    bits = [f"{lay.n} worker{'s' if lay.n != 1 else ''}", f"{_secs(run.end)} elapsed"]
    bits.append(f"{len(run.broadcasts)} broadcast{'s' if len(run.broadcasts) != 1 else ''}")
    return [
        f'<text class="title" x="{LEFT}" y="28">{escape(title)}</text>',
        f'<text class="subtitle" x="{LEFT}" y="48">{escape(" · ".join(bits))}</text>',
        _legend(counts, y=72.0),
    ]


def _legend(counts: dict[str, int], y: float) -> str:
    items: list[str] = []
    x = float(LEFT)
    for state in SPAN_COLOURS:
        items.append(f'<rect class="swatch {state}" x="{x:.1f}" y="{y - 6:.1f}" width="22" height="12" rx="2"/>')
        items.append(f'<text x="{x + 28:.1f}" y="{y + 4:.1f}">{state}</text>')
        x += 28 + _text_width(state) + 20
    for outcome in OUTCOMES:
        label = f"{outcome} {counts[outcome]}"
        items.append(_mark(outcome, x + 7, y, 6.5, kind="swatch"))
        items.append(f'<text x="{x + 18:.1f}" y="{y + 4:.1f}">{label}</text>')
        x += 18 + _text_width(label) + 20
    items.append(
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 8:.1f}" y2="{y + 8:.1f}" stroke="{MUTED}" '
        f'stroke-width="1.3" stroke-dasharray="4 3"/>'
    )
    items.append(f'<text x="{x + 8:.1f}" y="{y + 4:.1f}">broadcast</text>')
    return '<g class="legend">' + "".join(items) + "</g>"


def _text_width(text: str, size: float = 12.0) -> float:
    """A sans-serif estimate: SVG has no layout engine to ask, and the legend only needs spacing."""
    return len(text) * size * 0.52


def _background(run: Run, lay: Layout) -> list[str]:
    """Stripes per label group (a row each when rows are tall), behind everything."""
    out = ['<g class="stripes">']
    for start in range(0, lay.n, lay.label_step):
        if (start // lay.label_step) % 2 == 0:
            rows = min(lay.label_step, lay.n - start)
            out.append(
                f'<rect class="stripe" x="{LEFT}" y="{lay.y(start):.2f}" '
                f'width="{lay.plot_w:.1f}" height="{rows * lay.row_h:.2f}"/>'
            )
    out.append("</g>")
    return out


def _axis(lay: Layout) -> list[str]:
    ticks, step = _ticks(lay.t_end, lay.plot_w)
    out = ['<g class="axis">']
    for t in ticks:
        x = lay.x(t)
        out.append(f'<line class="gridline" x1="{x:.1f}" x2="{x:.1f}" '
                   f'y1="{lay.plot_top:.1f}" y2="{lay.plot_bottom:.1f}"/>')
        label = escape(_fmt_time(t, step))
        out.append(f'<text class="tick" x="{x:.1f}" y="{lay.plot_bottom + 15:.1f}">{label}</text>')
        if lay.top_axis:
            out.append(f'<text class="tick" x="{x:.1f}" y="{lay.plot_top - 5:.1f}">{label}</text>')
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT + lay.plot_w:.1f}" y1="{lay.plot_bottom:.1f}" '
        f'y2="{lay.plot_bottom:.1f}" stroke="#9aa0a6"/>'
    )
    out.append(f'<text class="tick axis-title" x="{LEFT + lay.plot_w / 2:.1f}" '
               f'y="{lay.plot_bottom + 34:.1f}">time since start</text>')
    out.append(f'<text class="label" x="{LEFT - 8}" y="{lay.plot_top - (20 if lay.top_axis else 6):.1f}">worker</text>')
    out.append("</g>")
    return out


def _row(index: int, row: Row, lay: Layout) -> str:
    y = lay.y(index)
    bar_h = lay.row_h * 0.72 if lay.row_h >= 10 else lay.row_h - 1
    bar_y = y + (lay.row_h - bar_h) / 2
    out = [f'<g class="row" data-worker="{row.worker}" id="worker-{row.worker}">']
    if index % lay.label_step == 0:
        fy = y + lay.row_h / 2 + 3.5
        out.append(f'<text class="label" x="{LEFT - 8}" y="{fy:.1f}">{row.worker}</text>')
    for i, span in enumerate(row.spans):
        out.append(_span(row, span, lay, bar_y, bar_h, last=i == len(row.spans) - 1))
    marks = list(row.earlier)
    if row.outcome is not None and row.outcome_t is not None:
        marks.append((row.outcome, row.outcome_t, row.detail))
    for outcome, t, detail in marks:
        radius = min(7.0, max(2.6, lay.row_h * 0.42))  # small rows: marks no taller than a row
        if outcome in PROBLEMS and lay.row_h < 12:
            radius = max(radius * 1.5, 4.0)  # among hundreds of rows, the failures must jump out
        tip = f"worker {row.worker} {outcome} at {_secs(t)}"
        if detail:
            tip += f": {detail}"
        out.append(_mark(outcome, lay.x(t), y + lay.row_h / 2, radius, tip,
                         data=f' data-worker="{row.worker}" data-t="{t:g}"'))
    out.append("</g>")
    return "".join(out)


def _span(row: Row, span: Span, lay: Layout, y: float, h: float, last: bool) -> str:
    x0, x1 = lay.x(span.start), lay.x(span.end)
    width = max(x1 - x0, 0.8)  # a blink of a state still shows
    tip = f"worker {row.worker} {span.state} {_secs(span.start)} – {_secs(span.end)} ({_secs(span.end - span.start)})"
    if last and row.outcome is None:
        tip += ", still going at the end of the log"
    rx = min(2.0, h / 4)
    return (
        f'<rect class="span {span.state}" x="{x0:.2f}" y="{y:.2f}" width="{width:.2f}" height="{h:.2f}" '
        f'rx="{rx:.1f}" data-start="{span.start:g}" data-end="{span.end:g}"><title>{escape(tip)}</title></rect>'
    )


def _mark(outcome: str, cx: float, cy: float, r: float, tip: str | None = None, data: str = "",
          kind: str = "outcome") -> str:
    """A shape per outcome (circle, square, cross, triangle, diamond): readable without colour."""
    d = _SHAPES[outcome](cx, cy, r)
    stroke = max(0.6, min(1.5, r / 4))
    title = f"<title>{escape(tip)}</title>" if tip else ""
    return f'<path class="{kind} {outcome}" d="{d}" stroke-width="{stroke:.2f}"{data}>{title}</path>'


def _circle(cx: float, cy: float, r: float) -> str:
    return f"M{cx - r:.2f},{cy:.2f}a{r:.2f},{r:.2f} 0 1,0 {2 * r:.2f},0a{r:.2f},{r:.2f} 0 1,0 {-2 * r:.2f},0Z"


def _square(cx: float, cy: float, r: float) -> str:
    s = r * 0.85
    return f"M{cx - s:.2f},{cy - s:.2f}h{2 * s:.2f}v{2 * s:.2f}h{-2 * s:.2f}Z"


def _cross(cx: float, cy: float, r: float) -> str:
    w = r * 0.38  # half the arm width
    plus = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    c = math.cos(math.pi / 4)
    pts = [(cx + (px - py) * c, cy + (px + py) * c) for px, py in plus]
    return "M" + "L".join(f"{x:.2f},{y:.2f}" for x, y in pts) + "Z"


def _triangle(cx: float, cy: float, r: float) -> str:
    return f"M{cx:.2f},{cy - r:.2f}L{cx + r:.2f},{cy + r * 0.8:.2f}L{cx - r:.2f},{cy + r * 0.8:.2f}Z"


def _diamond(cx: float, cy: float, r: float) -> str:
    return f"M{cx:.2f},{cy - r:.2f}L{cx + r:.2f},{cy:.2f}L{cx:.2f},{cy + r:.2f}L{cx - r:.2f},{cy:.2f}Z"


def _hourglass(cx: float, cy: float, r: float) -> str:
    s = r * 0.85
    return f"M{cx - s:.2f},{cy - s:.2f}h{2 * s:.2f}L{cx - s:.2f},{cy + s:.2f}h{2 * s:.2f}Z"


_SHAPES = {"finished": _circle, "stopped": _square, "failed": _cross, "crashed": _triangle, "killed": _diamond,
           "hung": _hourglass}


def _broadcasts(run: Run, lay: Layout) -> list[str]:
    out = []
    band_top = lay.plot_top - (16 if lay.top_axis else 0)
    for (t, state), level in zip(run.broadcasts, lay.levels, strict=True):
        x = lay.x(t)
        label_y = band_top - 6 - 16 * level
        lx = min(max(x, LEFT + 24), WIDTH - 28)  # keep the label inside the picture
        tip = f"broadcast {state} at {_secs(t)}"
        out.append(
            f'<g class="broadcast {escape(state)}" data-t="{t:g}" data-state={quoteattr(state)}>'
            f"<title>{escape(tip)}</title>"
            f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{label_y + 4:.1f}" y2="{lay.plot_bottom:.1f}"/>'
            f'<text x="{lx:.1f}" y="{label_y:.1f}">{escape(state)}</text></g>'
        )
    return out


# -- HTML -------------------------------------------------------------------------

_XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'

_PAGE_CSS = """
body{margin:0;padding:24px;background:#f3f4f6;font-family:FONT;color:#222}
.chart{display:inline-block;background:#fff;border-radius:8px;box-shadow:0 1px 4px rgba(0,0,0,.12);padding:8px}
.hint{font-size:12px;color:#666;margin:8px 2px}
.row:hover .span{filter:brightness(.88)}
.row:hover .label{fill:#000;font-weight:600}
#tip{position:fixed;pointer-events:none;background:rgba(20,20,20,.92);color:#fff;font-size:12px;
     padding:5px 8px;border-radius:4px;white-space:nowrap;display:none;z-index:10}
""".replace("FONT", FONT)

# The SVG's <title> children become a quick custom tooltip (the native one is slow and tiny).
_PAGE_JS = """
(function(){
  var tip=document.getElementById('tip');
  document.querySelectorAll('.procctl-timeline title').forEach(function(t){
    t.parentNode.setAttribute('data-tip',t.textContent); t.remove();
  });
  document.addEventListener('mousemove',function(e){
    var el=e.target.closest&&e.target.closest('[data-tip]');
    if(!el){tip.style.display='none';return;}
    tip.textContent=el.getAttribute('data-tip'); tip.style.display='block';
    tip.style.left=(e.clientX+14)+'px'; tip.style.top=(e.clientY+12)+'px';
  });
})();
"""


def _html_page(svg: str, title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_PAGE_CSS}</style>\n</head>\n<body>\n"
        f'<div class="chart">\n{svg}\n</div>\n'
        '<p class="hint">Hover a span, an outcome mark or a broadcast line for details.</p>\n'
        f'<div id="tip"></div>\n<script>{_PAGE_JS}</script>\n</body>\n</html>\n'
    )
