"""The dashboard's charts: pure functions from numbers to typed chart data.

A :class:`BarChart` carries its geometry (rows, segments, markers, in px) and is drawn as
server-side ``<svg>`` by the ``bar_chart`` macro of ``templates/charts.html``, with a
``<title>`` (hover text) on every bar. A :class:`TimeChart` carries its data as the JSON that
``static/dashboard.js`` hands to uPlot (vendored under ``static/uplot``, served by the API
itself), which shows the value of every line at the hovered time; nothing is fetched from
elsewhere. No markup is made here: the templates escape every text.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Top margin of a bar chart (px): room for its caption.
TOP = 28
#: Shortest time span a chart zooms in to (s).
MIN_SPAN_S = 10.0


@dataclass(frozen=True)
class Line:
    """One line of a time chart: ``points`` are (time s since epoch, value or None for a gap)."""

    label: str
    color: str
    points: Sequence[tuple[float, float | None]]
    dashed: bool = False


@dataclass(frozen=True)
class Bar:
    """One horizontal bar: stacked ``parts`` of (value, color, name) and a label."""

    label: str
    parts: Sequence[tuple[float, str, str]]
    note: str = ""
    markers: Sequence[tuple[float, str]] = field(default_factory=tuple)


def nice_ceiling(value: float) -> float:
    """Smallest 1, 2, 2.5 or 5 times a power of ten that is >= ``value`` (1 for 0 or less)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = step * 10.0**exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop always returns


def format_value(value: float | None, unit: str = "") -> str:
    """Short human text for a number: 1234 -> "1.2k", 0.0042 s -> "4.2 ms"."""
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value:.3g} s"
    suffix = f" {unit}" if unit and unit != "%" else unit
    magnitude = abs(value)
    if magnitude >= 1_000_000:
        return f"{value / 1_000_000:.3g}M{suffix}"
    if magnitude >= 10_000:
        return f"{value / 1000:.3g}k{suffix}"
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}{suffix}"
    return f"{value:.3g}{suffix}"


def grid_steps(top: float) -> int:
    """Gridline intervals for an axis up to ``top`` (from :func:`nice_ceiling`) that land on
    round values: 10 -> 5 (2, 4, ...), 20 -> 4 (5, 10, ...), 25 -> 5, 50 -> 5."""
    lead = top / 10.0 ** math.floor(math.log10(top)) if top > 0 else 1.0
    return 4 if abs(lead - 2.0) < 1e-9 else 5


def duration(seconds: float) -> str:
    """A span in words: 900 -> "15 min", 5400 -> "1 h 30 min", 86400 -> "24 h"."""
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min" if minutes else f"{seconds:.0f} s"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def clock(at: float) -> str:
    """HH:MM:SS (UTC) of a time in seconds since the epoch."""
    return time.strftime("%H:%M:%S", time.gmtime(at))


@dataclass(frozen=True)
class TimeChart:
    """A line chart as uPlot draws it: ``spec`` is the JSON of ``static/dashboard.js`` (None:
    nothing to draw, the ``empty`` message is shown); ``hover`` gives each line's latest value."""

    title: str
    spec: dict[str, Any] | None
    hover: str = ""
    empty: str = "no data yet"
    width: int = 560
    height: int = 200


@dataclass(frozen=True)
class Segment:
    """One stacked part of a bar, in px, with its hover text."""

    x: float
    width: float
    color: str
    title: str


@dataclass(frozen=True)
class BarRow:
    """One bar of a :class:`BarChart`: its label, parts, marker lines (x, color) and note."""

    label: str
    y: int
    segments: Sequence[Segment]
    markers: Sequence[tuple[float, str]]
    note: str


@dataclass(frozen=True)
class BarChart:
    """Horizontal bars with their geometry (px); no rows: the ``empty`` message is shown."""

    title: str
    width: int
    height: int
    label_w: int
    plot_w: int
    rows: Sequence[BarRow]
    empty: str = "nothing to show"


def time_chart(
    title: str,
    lines: Sequence[Line],
    *,
    start: float,
    end: float,
    unit: str = "",
    width: int = 560,
    height: int = 200,
    thresholds: Sequence[tuple[float, str]] = (),
    empty: str = "no data yet",
) -> TimeChart:
    """A line chart over ``[start, end]`` (s since epoch), drawn in the browser by uPlot.

    The ``time_chart`` macro makes it a ``<figure class="tchart">`` holding ``spec`` as JSON;
    ``dashboard.js`` draws it with the vendored uPlot, whose legend shows every line's value at
    the hovered time. ``hover`` (the figure's title without JavaScript) gives each line's latest
    value.
    ``None`` values and points more than three median steps apart break the line, so a gap in
    collection shows as a gap, not as a straight ramp.
    """
    values = [
        v
        for line in lines
        for t, v in line.points
        if v is not None and math.isfinite(v) and start <= t <= end
    ]
    if not values or end <= start:
        return TimeChart(title, None, empty=empty, width=width, height=height)
    # Less history than the window: zoom in on what there is rather than squeeze it right.
    first = min(t for line in lines for t, v in line.points if v is not None and start <= t)
    if first - start > MIN_SPAN_S:
        start = max(start, min(first, end - MIN_SPAN_S) - 0.05 * (end - first))
    xs, columns = align(lines, start, end)
    latest = []
    for line, column in zip(lines, columns, strict=True):
        last = next((v for v in reversed(column) if v is not None), None)
        latest.append(f"{line.label}: {format_value(last, unit)}")
    spec = {
        "title": title,
        "unit": unit,
        "start": start,
        "end": end,
        "height": height,
        "x": xs,
        "thresholds": [{"value": v, "color": c} for v, c in thresholds],
        "series": [
            {"label": line.label, "color": line.color, "dash": line.dashed, "values": column}
            for line, column in zip(lines, columns, strict=True)
        ],
    }
    hover = f"{title} (latest) · " + " · ".join(latest)
    return TimeChart(title, spec, hover=hover, empty=empty, width=width, height=height)


def align(
    lines: Sequence[Line], start: float, end: float
) -> tuple[list[float], list[list[float | None]]]:
    """One time axis for all lines (sorted, within the window) and each line's values on it.

    A null is put after a point whose successor is more than three median steps away, so the
    chart breaks the line there.
    """
    inside = [
        [
            (t, v if v is None or math.isfinite(v) else None)
            for t, v in line.points
            if start <= t <= end
        ]
        for line in lines
    ]
    times = sorted({round(t, 3) for points in inside for t, _ in points})
    steps = sorted(b - a for a, b in itertools.pairwise(times))
    gap = 3 * steps[len(steps) // 2] if steps else math.inf
    xs: list[float] = []
    for a, b in itertools.pairwise(times):
        xs.append(a)
        if b - a > gap:
            xs.append((a + b) / 2)  # a break: every line is null here
    if times:
        xs.append(times[-1])
    index = {t: i for i, t in enumerate(xs)}
    columns: list[list[float | None]] = []
    for points in inside:
        column: list[float | None] = [None] * len(xs)
        for t, v in points:
            column[index[round(t, 3)]] = None if v is None else round(v, 6)
        columns.append(column)
    return xs, columns


def bar_chart(
    title: str,
    bars: Sequence[Bar],
    *,
    unit: str = "",
    maximum: float | None = None,
    width: int = 560,
    empty: str = "nothing to show",
) -> BarChart:
    """Horizontal bars, one row per :class:`Bar`, stacked parts, optional marker lines."""
    if not bars:
        return BarChart(title, width, 70, 0, 0, [], empty)
    totals = [sum(v for v, _, _ in bar.parts) for bar in bars]
    notes = [bar.note or format_value(total, unit) for bar, total in zip(bars, totals, strict=True)]
    # Room for the longest note (about 6 px per character at 11 px), within bounds.
    row_h, label_w = 26, 150
    note_w = min(300, max(90, 6 * max(len(n) for n in notes) + 12))
    height = TOP + row_h * len(bars) + 6
    marks = [m for bar in bars for m, _ in bar.markers]
    top = maximum if maximum is not None else nice_ceiling(max([*totals, *marks, 0.0]))
    plot_w = width - label_w - note_w - 8

    def x_of(v: float) -> float:
        return label_w + plot_w * min(max(v, 0.0), top) / top

    rows = []
    for i, bar in enumerate(bars):
        segments = []
        left = 0.0
        for value, color, name in bar.parts:
            if value <= 0:
                continue
            x0, x1 = x_of(left), x_of(left + value)
            hover = f"{bar.label} {name}: {format_value(value, unit)}"
            segments.append(Segment(x0, max(x1 - x0, 1.0), color, hover))
            left += value
        markers = [(x_of(value), color) for value, color in bar.markers]
        rows.append(BarRow(bar.label, TOP + i * row_h, segments, markers, notes[i]))
    return BarChart(title, width, height, label_w, plot_w, rows, empty)
