"""Terminal output of the ``taskyard`` commands: tables and human times (``--json`` for scripts)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import click


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
    click.echo(click.style(title, bold=True))
    if not rows:
        click.echo("  (none)\n")
        return
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
