"""Terminal output of the ``taskyard`` commands: tables and human times (``--json`` for scripts).

Everything these commands print that a task, a worker or a producer wrote (exception text, task
names, headers, arguments, batch items) is hostile: an escape sequence in it could retitle,
clear or repaint the operator's terminal, fake a line with a bare CR, or write the clipboard
(OSC 52). So every line goes out through :func:`echo`, which passes it through :func:`safe`, and
:func:`table` cleans every cell. ``--json`` output needs nothing more: ``json.dumps`` escapes
every control character as ``\\uXXXX``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import click

# C0 controls, DEL and C1 controls (U+0080-U+009F: 8-bit CSI and OSC are as live as ESC [ on
# many terminals) are shown as a visible \xNN, never sent.
_ESCAPED = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
# Newline and tab keep their meaning where the text is several lines (a traceback).
_ESCAPED_KEEP_LINES = {
    code: shown for code, shown in _ESCAPED.items() if code not in (ord("\n"), ord("\t"))
}


def safe(text: object, *, lines: bool = True) -> str:
    """``text`` fit for a terminal: controls escaped (newline and tab kept if ``lines``)."""
    return str(text).translate(_ESCAPED_KEEP_LINES if lines else _ESCAPED)


def echo(message: object = "", *, err: bool = False, nl: bool = True, lines: bool = True) -> None:
    """Print ``message`` through :func:`safe`: the one way a command prints stored data."""
    click.echo(safe(message, lines=lines), err=err, nl=nl)


def when(at: Any, now: float | None = None) -> str:
    """A time in seconds since the epoch as "2026-12-02 01:12:11 UTC (3 min ago)"."""
    try:
        moment = float(at)
    except (TypeError, ValueError):
        return "-"
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))
    delta = now - moment
    return f"{stamp} ({span(abs(delta))} {'ago' if delta >= 0 else 'from now'})"


def span(seconds: float) -> str:
    """A duration in words: 42 -> "42 s", 190 -> "3 min", 7300 -> "2 h 1 min", 2 days -> "2 d"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    return f"{hours // 24} d"


def number(value: Any, unit: str = "") -> str:
    """A reading for a table cell: "-" for none, three significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def cell(value: Any) -> str:
    """Any value as one table cell (lists joined, mappings as compact JSON)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return number(value)
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, Mapping):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a titled table with aligned columns ("(none)" when empty)."""
    click.echo(click.style(safe(title, lines=False), bold=True))
    if not rows:
        click.echo("  (none)\n")
        return
    header = [safe(h, lines=False) for h in header]
    rows = [[safe(c, lines=False) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [list(header), *rows]:
        click.echo(
            ("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
        )
    click.echo("")


def records(title: str, items: Sequence[Mapping[str, Any]]) -> None:
    """A table of dicts, one column per key (in the order the first item has them)."""
    header: list[str] = []
    for item in items:
        header.extend(k for k in item if k not in header)
    table(title, header, [[cell(item.get(k)) for k in header] for item in items])
