"""Server-rendered SVG charts for the dashboard: pure functions from numbers to markup.

No JavaScript and nothing fetched: each chart is a self-contained ``<svg>`` element, so the page
works offline and in any browser. All text goes through :func:`html.escape`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
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
        candidate = step * 10.0 ** exponent
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
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f'<text class="caption" x="4" y="15" fill="#374151" font-weight="600" '
            f'{_FONT}>{escape(title)}</text>')


def _empty(width: int, height: int, title: str, message: str) -> str:
    return (_svg_open(width, height, title)
            + f'<rect x="0.5" y="20.5" width="{width - 1}" height="{height - 21}" fill="#f9fafb" '
            f'stroke="{_GRID}"/><text x="{width / 2:.0f}" y="{height / 2 + 10:.0f}" '
            f'text-anchor="middle" fill="{_MUTED}" {_FONT}>{escape(message)}</text></svg>')


def time_chart(title: str, lines: Sequence[Line], *, start: float, end: float,
               unit: str = "", width: int = 560, height: int = 200,
               thresholds: Sequence[tuple[float, str]] = (), empty: str = "no data yet") -> str:
    """A line chart over ``[start, end]`` (s since epoch); y from 0 to a round maximum.

    ``None`` values and points more than three median steps apart break the line, so a gap in
    collection shows as a gap, not as a straight ramp.
    """
    values = [v for line in lines for t, v in line.points
              if v is not None and math.isfinite(v) and start <= t <= end]
    if not values or end <= start:
        return _empty(width, height, title, empty)
    # Less history than the window: zoom in on what there is rather than squeeze it right.
    first = min(t for line in lines for t, v in line.points if v is not None and start <= t)
    if first - start > MIN_SPAN_S:
        start = max(start, min(first, end - MIN_SPAN_S) - 0.05 * (end - first))
    top = nice_ceiling(max([*values, *(t for t, _ in thresholds)]))
    # Axis labels carry only short units; the chart title names the others.
    axis_unit = unit if unit in ("s", "%") else ""
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def x_of(t: float) -> float:
        return _LEFT + plot_w * (t - start) / (end - start)

    def y_of(v: float) -> float:
        return _TOP + plot_h * (1 - min(v, top) / top)

    out = [_svg_open(width, height, title)]
    steps = grid_steps(top)
    for i in range(steps + 1):
        value = top * i / steps
        y = y_of(value)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{width - _RIGHT}" y2="{y:.1f}" '
                   f'stroke="{_GRID}"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{_MUTED}" '
                   f'{_FONT}>{escape(format_value(value, axis_unit))}</text>')
    for i in range(4):
        t = start + (end - start) * i / 3
        anchor = ("start", "middle", "middle", "end")[i]
        out.append(f'<text x="{x_of(t):.1f}" y="{height - 6}" text-anchor="{anchor}" '
                   f'fill="{_MUTED}" {_FONT}>{clock(t)}</text>')
    for value, color in thresholds:
        y = y_of(value)
        out.append(f'<line class="threshold" x1="{_LEFT}" y1="{y:.1f}" x2="{width - _RIGHT}" '
                   f'y2="{y:.1f}" stroke="{color}" stroke-dasharray="6 4"/>')
    for line in lines:
        path = _path(line.points, start, end, x_of, y_of)
        if not path:
            continue
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        out.append(f'<path class="series" data-label="{escape(line.label)}" d="{path}" '
                   f'fill="none" stroke="{line.color}" stroke-width="2" stroke-linecap="round"'
                   f' stroke-linejoin="round"{dash}>'
                   f'<title>{escape(line.label)}</title></path>')
    out.append("</svg>")
    return "".join(out)


def _path(points: Sequence[tuple[float, float | None]], start: float, end: float,
          x_of: Callable[[float], float], y_of: Callable[[float], float]) -> str:
    inside = sorted((t, v) for t, v in points if start <= t <= end)
    steps = sorted(b[0] - a[0] for a, b in itertools.pairwise(inside))
    gap = 3 * steps[len(steps) // 2] if steps else math.inf
    parts: list[str] = []
    previous: float | None = None
    for t, v in inside:
        if v is None or not math.isfinite(v):
            previous = None
            continue
        x, y = x_of(t), y_of(v)
        if previous is None or t - previous > gap:
            # A new stroke; the tiny step makes a lone point visible as a round dot.
            parts.append(f"M{x:.1f},{y:.1f} h0.01")
        else:
            parts.append(f"L{x:.1f},{y:.1f}")
        previous = t
    return " ".join(parts)


def bar_chart(title: str, bars: Sequence[Bar], *, unit: str = "", maximum: float | None = None,
              width: int = 560, empty: str = "nothing to show") -> str:
    """Horizontal bars, one row per :class:`Bar`, stacked parts, optional marker lines."""
    if not bars:
        return _empty(width, 70, title, empty)
    notes = [bar.note or format_value(total, unit) for bar, total in
             zip(bars, (sum(v for v, _, _ in b.parts) for b in bars), strict=True)]
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
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" fill="#111827" '
                   f'{_FONT}>{escape(bar.label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{plot_w}" height="16" '
                   f'fill="#f3f4f6"/>')
        left = 0.0
        for value, color, name in bar.parts:
            if value <= 0:
                continue
            x0, x1 = x_of(left), x_of(left + value)
            out.append(f'<rect class="bar" data-label="{escape(bar.label)}" x="{x0:.1f}" '
                       f'y="{y + 3}" width="{max(x1 - x0, 1.0):.1f}" height="16" fill="{color}">'
                       f'<title>{escape(f"{bar.label} {name}: {format_value(value, unit)}")}'
                       f'</title></rect>')
            left += value
        for value, color in bar.markers:
            x = x_of(value)
            out.append(f'<line x1="{x:.1f}" y1="{y + 1}" x2="{x:.1f}" y2="{y + 21}" '
                       f'stroke="{color}" stroke-width="2"/>')
        note = notes[i]
        out.append(f'<text x="{label_w + plot_w + 8}" y="{y + 15}" fill="#111827" '
                   f'{_FONT}>{escape(note)}</text>')
    out.append("</svg>")
    return "".join(out)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """An HTML legend: colored swatches with labels."""
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{color}"></i>{escape(label)}</span>'
        for label, color in items) + "</div>"
