"""The dashboard's charts: pure functions from numbers to markup.

Bar charts are self-contained server-rendered ``<svg>`` elements with a ``<title>`` (hover text)
on every bar. Time charts carry their data as JSON and are drawn in the browser by uPlot
(vendored under ``static/uplot``, served by the API itself), which shows the value of every line
at the hovered time; nothing is fetched from elsewhere. All text goes through
:func:`html.escape`.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

#: Plot margins (px): left leaves room for the y labels, bottom for the time labels.
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 28, 24
#: Shortest time span a chart zooms in to (s).
MIN_SPAN_S = 10.0
_FONT = 'font-family="system-ui,sans-serif" font-size="11"'
_MUTED = "#6b7280"
_GRID = "#e5e7eb"


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


def _svg_open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<text class="caption" x="4" y="15" fill="#374151" font-weight="600" '
        f"{_FONT}>{escape(title)}</text>"
    )


def _empty(width: int, height: int, title: str, message: str) -> str:
    return (
        _svg_open(width, height, title)
        + f'<rect x="0.5" y="20.5" width="{width - 1}" height="{height - 21}" fill="#f9fafb" '
        f'stroke="{_GRID}"/><text x="{width / 2:.0f}" y="{height / 2 + 10:.0f}" '
        f'text-anchor="middle" fill="{_MUTED}" {_FONT}>{escape(message)}</text></svg>'
    )


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
) -> str:
    """A line chart over ``[start, end]`` (s since epoch), drawn in the browser by uPlot.

    The markup is a ``<figure class="tchart">`` holding the data as JSON; ``dashboard.js``
    draws it with the vendored uPlot, whose legend shows every line's value at the hovered time.
    The figure's ``title`` (the hover text without JavaScript) gives each line's latest value.
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
        return _empty(width, height, title, empty)
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
    data = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
    return (
        f'<figure class="tchart" aria-label="{escape(title)}" title="{escape(hover)}" '
        f'data-title="{escape(title)}"><figcaption>{escape(title)}</figcaption>'
        f'<script type="application/json">{data}</script></figure>'
    )


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
) -> str:
    """Horizontal bars, one row per :class:`Bar`, stacked parts, optional marker lines."""
    if not bars:
        return _empty(width, 70, title, empty)
    notes = [
        bar.note or format_value(total, unit)
        for bar, total in zip(bars, (sum(v for v, _, _ in b.parts) for b in bars), strict=True)
    ]
    # Room for the longest note (about 6 px per character at 11 px), within bounds.
    row_h, label_w = 26, 150
    note_w = min(300, max(90, 6 * max(len(n) for n in notes) + 12))
    height = _TOP + row_h * len(bars) + 6
    totals = [sum(v for v, _, _ in bar.parts) for bar in bars]
    marks = [m for bar in bars for m, _ in bar.markers]
    top = maximum if maximum is not None else nice_ceiling(max([*totals, *marks, 0.0]))
    plot_w = width - label_w - note_w - 8

    def x_of(v: float) -> float:
        return label_w + plot_w * min(max(v, 0.0), top) / top

    out = [_svg_open(width, height, title)]
    for i, bar in enumerate(bars):
        y = _TOP + i * row_h
        out.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" fill="#111827" '
            f"{_FONT}>{escape(bar.label)}</text>"
        )
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{plot_w}" height="16" fill="#f3f4f6"/>')
        left = 0.0
        for value, color, name in bar.parts:
            if value <= 0:
                continue
            x0, x1 = x_of(left), x_of(left + value)
            out.append(
                f'<rect class="bar" data-label="{escape(bar.label)}" x="{x0:.1f}" '
                f'y="{y + 3}" width="{max(x1 - x0, 1.0):.1f}" height="16" fill="{color}">'
                f"<title>{escape(f'{bar.label} {name}: {format_value(value, unit)}')}"
                f"</title></rect>"
            )
            left += value
        for value, color in bar.markers:
            x = x_of(value)
            out.append(
                f'<line x1="{x:.1f}" y1="{y + 1}" x2="{x:.1f}" y2="{y + 21}" '
                f'stroke="{color}" stroke-width="2"/>'
            )
        note = notes[i]
        out.append(
            f'<text x="{label_w + plot_w + 8}" y="{y + 15}" fill="#111827" '
            f"{_FONT}>{escape(note)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """An HTML legend: colored swatches with labels."""
    return (
        '<div class="legend">'
        + "".join(
            f'<span><i style="background:{color}"></i>{escape(label)}</span>'
            for label, color in items
        )
        + "</div>"
    )
