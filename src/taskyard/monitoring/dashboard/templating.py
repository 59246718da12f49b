r"""The dashboard's one Jinja2 environment: templates in ``templates/``, autoescape always on.

Pages hand typed rows to a template; every text a task, a worker or a producer wrote is escaped
by Jinja2 (never by hand, never built into markup by Python). Control characters in such text
are shown as ``\xNN`` (:func:`visible`): they have no place in HTML or SVG (an SVG holding one
is not well-formed XML) and could fake a line in a copied value. The filters here format numbers
and times and quote URL path parts; they return plain text that is escaped like any other.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from taskyard.monitoring.api.docs import TASKYARD_STATIC
from taskyard.monitoring.dashboard.charts import (
    BarChart,
    TimeChart,
    clock,
    duration,
    format_value,
)

#: C0 controls but tab and newline (a bare CR included), DEL and the C1 controls.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}


def visible(value: object) -> object:
    r"""Every ``{{ }}`` output (Jinja2's finalize): text with control characters shown as
    ``\xNN``; markup a macro made (already finalized inside) and other values unchanged."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return value.translate(_CONTROLS)
    return value


def when(at: float | None) -> str:
    """YYYY-MM-DD HH:MM:SS (UTC) of a time in seconds since the epoch; "-" for none."""
    if at is None or not at:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def path_part(value: object) -> str:
    """``value`` quoted as one URL path segment ("/" included)."""
    return quote(str(value), safe="")


def px(value: float) -> str:
    """A coordinate with one decimal (SVG attributes)."""
    return f"{value:.1f}"


@cache
def environment() -> Environment:
    """The environment (made on first use: importing this module reads no file)."""
    env = Environment(
        loader=PackageLoader("taskyard.monitoring.dashboard", "templates"),
        # Every template is HTML or SVG: escape always, whatever the file name.
        autoescape=True,
        # A misspelt field is an error in the tests, not an empty cell on a page.
        undefined=StrictUndefined,
        finalize=visible,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        fmt=format_value, clock=clock, duration=duration, when=when, path_part=path_part, px=px
    )
    env.globals.update(static=TASKYARD_STATIC)
    return env


def render(template: str, **context: Any) -> str:
    """``template`` rendered with ``context``."""
    return environment().get_template(template).render(**context)


def render_chart(chart: BarChart | TimeChart) -> str:
    """One chart alone (the ``bar_chart`` or ``time_chart`` macro), for tests and fragments."""
    macros = environment().get_template("charts.html").module
    macro = macros.bar_chart if isinstance(chart, BarChart) else macros.time_chart  # type: ignore[attr-defined]
    return str(macro(chart))
