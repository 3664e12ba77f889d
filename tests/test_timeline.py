"""procctl.timeline: the Gantt chart's structure, from synthetic logs and from a real run."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest
import targets

from procctl import Event, ProcessController
from procctl.timeline import OUTCOMES, render_timeline, timeline_format

SVG = "{http://www.w3.org/2000/svg}"


def parse(path):
    return ET.parse(path).getroot()


def classes(el):
    return set((el.get("class") or "").split())


def find_class(root, *names, tag="*"):
    wanted = set(names)
    return [el for el in root.iter() if wanted <= classes(el) and (tag == "*" or el.tag == SVG + tag)]


def rows(root):
    return {int(g.get("data-worker")): g for g in find_class(root, "row", tag="g")}


def spans(row, state):
    return find_class(row, "span", state, tag="rect")


def synthetic(workers=3):
    """Broadcasts: run at 0.1, pause at 1, run at 2, stop at 3; worker 1 fails at 0.5."""
    events = [
        {"t": 0.01, "event": "paused", "worker": w} for w in range(workers)
    ] + [{"t": 0.1, "event": "broadcast", "state": "running"}]
    events += [{"t": 0.11, "event": "running", "worker": w} for w in range(workers)]
    events += [{"t": 0.5, "event": "failed", "worker": 1, "error": "Traceback...\nValueError: bad input"}]
    events += [{"t": 1.0, "event": "broadcast", "state": "paused"}]
    events += [{"t": 1.01, "event": "paused", "worker": w} for w in range(workers) if w != 1]
    events += [{"t": 2.0, "event": "broadcast", "state": "running"}]
    events += [{"t": 2.01, "event": "running", "worker": w} for w in range(workers) if w != 1]
    events += [{"t": 3.0, "event": "broadcast", "state": "stopped"}]
    events += [{"t": 3.05, "event": "stopped", "worker": w} for w in range(workers) if w != 1]
    events += [{"event": "summary", "workers": workers, "elapsed": 3.1}]
    return events


def test_rows_spans_outcomes_and_broadcasts(tmp_path):
    path = tmp_path / "t.svg"
    render_timeline(synthetic(3), path)
    root = parse(path)
    by_worker = rows(root)
    assert sorted(by_worker) == [0, 1, 2]
    # workers 0 and 2: paused, running, paused, running, then stopped
    for w in (0, 2):
        assert len(spans(by_worker[w], "running")) == 2
        assert len(spans(by_worker[w], "paused")) == 2
        marks = find_class(by_worker[w], "outcome")
        assert [classes(m) - {"outcome"} for m in marks] == [{"stopped"}]
    # worker 1 failed at 0.5: one paused span, one running span ending there, a failed mark
    assert len(spans(by_worker[1], "running")) == 1
    running = spans(by_worker[1], "running")[0]
    assert float(running.get("data-end")) == pytest.approx(0.5)
    (mark,) = find_class(by_worker[1], "outcome", "failed")
    assert "ValueError: bad input" in mark.find(SVG + "title").text
    lines = find_class(root, "broadcast", tag="g")
    assert [b.get("data-state") for b in lines] == ["running", "paused", "running", "stopped"]
    assert all(b.find(SVG + "line") is not None for b in lines)
    assert [b.find(SVG + "text").text for b in lines] == ["running", "paused", "running", "stopped"]


def test_span_geometry_follows_time(tmp_path):
    path = tmp_path / "t.svg"
    render_timeline(synthetic(3), path)
    row = rows(parse(path))[0]
    first_run, second_run = sorted(spans(row, "running"), key=lambda r: float(r.get("x")))
    _, pause = sorted(spans(row, "paused"), key=lambda r: float(r.get("x")))
    # 0.11..1.01 and 2.01..3.05 at the same scale: widths proportional to durations
    ratio = float(first_run.get("width")) / float(second_run.get("width"))
    assert ratio == pytest.approx(0.90 / 1.04, rel=0.02)
    # the pause starts where the first run ends
    assert float(pause.get("x")) == pytest.approx(float(first_run.get("x")) + float(first_run.get("width")), abs=0.05)


def test_summary_closes_open_spans(tmp_path):
    events = [
        {"t": 0.0, "event": "paused", "worker": 0},
        {"t": 1.0, "event": "running", "worker": 0},
        {"event": "summary", "elapsed": 4.0},
    ]
    path = tmp_path / "t.svg"
    render_timeline(events, path)
    row = rows(parse(path))[0]
    (running,) = spans(row, "running")
    assert float(running.get("data-end")) == 4.0
    assert find_class(row, "outcome") == []  # still going: no outcome to mark


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_each_outcome_has_its_own_mark(tmp_path, outcome):
    events = [{"t": 0.0, "event": "running", "worker": 0}, {"t": 1.0, "event": outcome, "worker": 0, "exitcode": -9}]
    path = tmp_path / "t.svg"
    render_timeline(events, path)
    (mark,) = find_class(parse(path), "outcome", outcome, tag="path")
    assert mark.get("data-worker") == "0"
    assert outcome in mark.find(SVG + "title").text


def test_outcome_shapes_differ(tmp_path):
    events = [{"t": 0.0, "event": "running", "worker": w} for w in range(5)]
    events += [{"t": 1.0, "event": o, "worker": w} for w, o in enumerate(OUTCOMES)]
    path = tmp_path / "t.svg"
    render_timeline(events, path)
    root = parse(path)
    shapes = {}
    for w, g in rows(root).items():
        (mark,) = find_class(g, "outcome", tag="path")
        # compare the shape's path commands only: positions differ per row anyway
        shapes[OUTCOMES[w]] = "".join(c for c in mark.get("d") if c.isalpha())
    assert len(set(shapes.values())) == len(OUTCOMES)


def test_events_after_an_outcome_are_ignored(tmp_path):
    events = [
        {"t": 0.0, "event": "running", "worker": 0},
        {"t": 1.0, "event": "crashed", "worker": 0, "exitcode": -11},
        {"t": 2.0, "event": "running", "worker": 0},
    ]
    path = tmp_path / "t.svg"
    render_timeline(events, path)
    row = rows(parse(path))[0]
    assert len(spans(row, "running")) == 1
    assert "exit code -11" in find_class(row, "outcome", "crashed")[0].find(SVG + "title").text


def test_workers_argument_adds_silent_rows(tmp_path):
    path = tmp_path / "t.svg"
    render_timeline([{"t": 0.0, "event": "running", "worker": 1}], path, workers=4)
    assert sorted(rows(parse(path))) == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["t.svg", "t.html"])
def test_an_error_with_control_characters_or_a_lone_surrogate_still_renders(tmp_path, name):
    # ANSI colours in an exception's message, and a file name's undecodable byte
    # (os.fsdecode): the SVG was not well-formed XML, or not written at all (UnicodeEncodeError).
    events = synthetic()
    failed = next(e for e in events if e["event"] == "failed")
    failed["error"] = "ValueError: \x1b[31mred\x1b[0m \x00 cannot parse data-\udcff.csv"
    render_timeline(events, tmp_path / name)
    text = (tmp_path / name).read_text(encoding="utf-8")
    assert "cannot parse data-\ufffd.csv" in text and "\x1b" not in text
    if name.endswith(".svg"):
        assert rows(parse(tmp_path / name)).keys() == {0, 1, 2}


def test_empty_log_still_renders(tmp_path):
    path = tmp_path / "t.svg"
    render_timeline([], path, title="nothing <yet>")
    root = parse(path)
    assert rows(root) == {}
    assert any(el.text == "nothing <yet>" for el in root.iter(SVG + "text"))


def test_event_objects_and_dicts_render_alike(tmp_path):
    dicts = synthetic(2)
    objects = [Event(**{k: v for k, v in d.items() if k in Event.__dataclass_fields__}) for d in dicts if "t" in d]
    a, b = tmp_path / "a.svg", tmp_path / "b.svg"
    render_timeline([d for d in dicts if "t" in d], a)
    render_timeline(objects, b)
    assert a.read_text() == b.read_text()


def _many(workers):
    events = [{"t": 0.0, "event": "broadcast", "state": "running"}]
    for w in range(workers):
        events.append({"t": 0.01 + w * 1e-4, "event": "running", "worker": w})
        events.append({"t": 1.0 + (w % 7) * 0.1, "event": "paused", "worker": w})
        events.append({"t": 2.0 + w * 1e-3, "event": OUTCOMES[w % 5], "worker": w})
    return events


@pytest.mark.parametrize("workers", [10, 200])
def test_readable_for_10_and_200_workers(tmp_path, workers):
    path = tmp_path / "t.svg"
    render_timeline(_many(workers), path)
    root = parse(path)
    by_worker = rows(root)
    assert sorted(by_worker) == list(range(workers))
    assert len(find_class(root, "span", "running")) >= workers
    assert len(find_class(root, "outcome", tag="path")) == workers
    assert len(find_class(root, "swatch", tag="path")) == len(OUTCOMES)  # the legend
    labels = [t for g in by_worker.values() for t in find_class(g, "label", tag="text")]
    if workers == 10:
        assert len(labels) == 10  # every row labelled
    else:
        assert 10 <= len(labels) < workers / 2  # thinned out, still there
    heights = {float(r.get("height")) for r in find_class(root, "span", "running")}
    height = float(root.get("height"))
    assert height < 2000  # fits a page
    assert max(heights) < height / workers * 1.01  # rows do not overlap
    ticks = [t for t in find_class(root, "tick", tag="text") if "axis-title" not in classes(t)]
    assert 1.0 in {float(t.text.rstrip("s")) for t in ticks}


def test_labels_do_not_overlap_for_200(tmp_path):
    path = tmp_path / "t.svg"
    render_timeline(_many(200), path)
    labels = [t for g in rows(parse(path)).values() for t in find_class(g, "label", tag="text")]
    ys = sorted(float(t.get("y")) for t in labels)
    assert min(b - a for a, b in zip(ys, ys[1:], strict=False)) >= 11


def test_html_is_a_self_contained_page_with_the_svg(tmp_path):
    path = tmp_path / "t.html"
    render_timeline(synthetic(3), path, title="batch & co")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>batch &amp; co</title>" in text
    assert "<script" in text and "src=" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    svg = text[text.index("<svg"): text.index("</svg>") + len("</svg>")]
    root = ET.fromstring(svg)
    assert sorted(rows(root)) == [0, 1, 2]
    assert find_class(root, "legend")


@pytest.mark.parametrize("name", ["t.png", "t", "t.svg.txt", "t.json"])
def test_other_extensions_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.svg or \.html"):
        render_timeline(synthetic(1), tmp_path / name)
    assert not (tmp_path / name).exists()
    with pytest.raises(ValueError):
        timeline_format(name)


def test_format_is_case_insensitive():
    assert timeline_format("RUN.SVG") == ".svg"
    assert timeline_format(os.path.join("a.b", "run.html")) == ".html"


@pytest.mark.parametrize("events", ["notalist", [1, 2, 3], None, {"t": 1}])
def test_events_of_the_wrong_type_are_a_type_error_naming_them(tmp_path, events):
    # It was "vars() argument must have __dict__ attribute", or "'NoneType' object is not iterable".
    with pytest.raises(TypeError, match="events must be"):
        render_timeline(events, tmp_path / "x.svg")
    assert not (tmp_path / "x.svg").exists()


def test_a_real_run(tmp_path):
    """run, pause, run, stop with real workers, drawn from the controller's on_event."""
    events: list[Event] = []
    with ProcessController(targets.loop, 3, on_event=events.append) as pc:
        pc.run()
        pc.pause()
        pc.run()
        pc.stop()
    path = tmp_path / "real.svg"
    render_timeline(events, path, workers=3)
    root = parse(path)
    by_worker = rows(root)
    assert sorted(by_worker) == [0, 1, 2]
    for row in by_worker.values():
        assert len(spans(row, "running")) == 2
        assert len(spans(row, "paused")) == 2  # the initial pause and the broadcast one
        assert len(find_class(row, "outcome", "stopped")) == 1
    assert [b.get("data-state") for b in find_class(root, "broadcast", tag="g")] == [
        "running", "paused", "running", "stopped"]


def test_a_real_failure_is_attributed(tmp_path):
    events: list[Event] = []
    with ProcessController(targets.raise_error, 2, on_event=events.append) as pc:
        pc.run()
        assert pc.wait(timeout=10)
    path = tmp_path / "failed.html"
    render_timeline(events, path)
    text = path.read_text(encoding="utf-8")
    root = ET.fromstring(text[text.index("<svg"): text.index("</svg>") + len("</svg>")])
    for w, row in rows(root).items():
        (mark,) = find_class(row, "outcome", "failed", tag="path")
        assert f"ValueError: bad input in worker {w}" in mark.find(SVG + "title").text
