"""The dashboard's overview at ``/dashboard``: queues, throughput, latency, workers, alerts.

:func:`gather` reads the stats store; :func:`render_page` turns those plain dicts into HTML and is
pure, so it is tested on sample data. Bars are server-rendered SVG with a hover title on each;
time charts are drawn by the vendored uPlot, whose legend shows every line's value at the hovered
time. The page loads nothing from elsewhere (works offline); ``dashboard.js`` re-fetches the
board every ``refresh`` seconds, and without JavaScript a ``<meta refresh>`` reloads the page.
The other pages (workers, task names, one task) are in :mod:`.pages`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from html import escape
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.monitoring.dashboard.charts import (
    Bar,
    Line,
    bar_chart,
    clock,
    duration,
    format_value,
    legend,
    time_chart,
)
from taskyard.monitoring.dashboard.layout import (
    CSS,
    PAGE_POLICY,
    covered_since,
    page,
    ranges,
    respond_page,
)
from taskyard.monitoring.dashboard.series_charts import (
    SAMPLED_POINTS,
    sampled_series,
    task_rate_chart,
    worker_chart,
)
from taskyard.routing.levels import LEVEL_NAMES

logger = logging.getLogger(__name__)

#: Color per level, most urgent first: red, orange, blue, green, purple.
LEVEL_COLORS = {
    "critical": "#dc2626",
    "high": "#ea580c",
    "normal": "#2563eb",
    "low": "#16a34a",
    "batch": "#9333ea",
}
#: Series the charts draw over time.
CHART_SERIES = ("queues", "throughput", "latency", "batches", "workers", "tasks")
#: Snapshots drawn per chart, and for the big series (every task name's counters).
CHART_POINTS = 240
SAMPLED_SERIES = ("tasks",)
#: Most snapshots read per series: series_length's default, 2 h at the default 10 s.
MAX_POINTS = 720
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
_SEVERITY_COLORS = {"critical": "#dc2626", "warning": "#d97706"}
#: The pages' style sheet, for pages that build their own shell (layout.page builds one).
_CSS = CSS


def _safe(read: Callable[[], Any], default: Any, what: str, problems: list[str]) -> Any:
    """One store reading; a failure leaves that section empty and is named on the page."""
    try:
        return read()
    except Exception as exc:
        logger.warning("dashboard: reading %s failed", what, exc_info=True)
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return default


def gather(
    store: Any, thresholds: dict[str, float], window_s: float, now: float | None = None
) -> dict[str, Any]:
    """Everything the page shows, as plain dicts, read from a StatsStore."""
    now = time.time() if now is None else now
    problems: list[str] = []
    since = now - window_s
    data: dict[str, Any] = {
        "now": now,
        "window_s": window_s,
        "thresholds": thresholds,
        "problems": problems,
        "queues": _safe(store.queues, [], "queue depths", problems),
        "workers": _safe(store.workers, [], "workers", problems),
        "tasks": _safe(store.tasks, [], "task stats", problems),
        "batches": _safe(store.batches, [], "batch buffers", problems),
        "alerts": _safe(store.alerts, [], "alerts", problems),
        "alert_changes": _safe(
            getattr(store, "alert_changes", lambda: []), [], "alert history", problems
        ),
        "cache": _safe(store.cache, [], "cache", problems),
    }
    # A chart is a few hundred pixels wide: a sample spread over the window draws the same
    # lines as every snapshot, for a fraction of the reading and rendering.
    data["series"] = {
        name: _safe(
            partial(
                sampled_series,
                store,
                name,
                since,
                now,
                SAMPLED_POINTS if name in SAMPLED_SERIES else CHART_POINTS,
            ),
            [],
            f"{name} history",
            problems,
        )
        for name in CHART_SERIES
    }
    return data


# --- charts from snapshots -----------------------------------------------------------------------


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _points(
    snapshots: Sequence[dict[str, Any]], pick: Callable[[dict[str, Any]], Any]
) -> list[tuple[float, float | None]]:
    out = []
    for snap in snapshots:
        at = _num(snap.get("at"))
        if at is not None:
            out.append((at, _num(pick(snap))))
    return out


def _get(snap: dict[str, Any], key: str) -> Any:
    return snap.get(key)


def _depth(snap: dict[str, Any], level: str) -> Any:
    entry = (snap.get("queues") or {}).get(level)
    return entry.get("depth") if isinstance(entry, dict) else entry


def queue_depth_chart(data: dict[str, Any]) -> str:
    snaps = data["series"].get("queues", [])
    lines = [
        Line(level, LEVEL_COLORS[level], _points(snaps, partial(_depth, level=level)))
        for level in LEVEL_NAMES
    ]
    return time_chart(
        "Queue depth per level (messages)",
        lines,
        start=data["now"] - data["window_s"],
        end=data["now"],
        unit="msg",
    )


def _oldest(queue: dict[str, Any]) -> str:
    """ ", oldest 3.2 s" when the queue's oldest ready message has an age."""
    age = _num(queue.get("oldest_ready_age_s"))
    return f", oldest {format_value(age, 's')}" if age is not None else ""


def queue_now_chart(data: dict[str, Any]) -> str:
    bars = []
    for q in data["queues"]:
        # Over AMQP only ready messages are visible: say so rather than show "0 reserved".
        reserved = (
            f"{q.get('reserved', 0)} reserved"
            if q.get("reserved_known", True)
            else "reserved unknown"
        )
        bars.append(
            Bar(
                q["queue"],
                [
                    (float(q.get("ready", 0)), LEVEL_COLORS.get(q["queue"], "#6b7280"), "ready"),
                    (float(q.get("reserved", 0)), "#9ca3af", "reserved"),
                ],
                note=f"{q.get('depth', 0)} ({reserved}{_oldest(q)})",
            )
        )
    return bar_chart(
        "Queue depth now: ready and reserved", bars, unit="msg", empty="queue depths unavailable"
    )


def throughput_chart(data: dict[str, Any]) -> str:
    snaps = data["series"].get("throughput", [])
    lines = [
        Line("succeeded/s", "#16a34a", _points(snaps, lambda s: s.get("succeeded_per_s"))),
        Line("failed/s", "#dc2626", _points(snaps, lambda s: s.get("failed_per_s"))),
        Line(
            "received/s", "#6b7280", _points(snaps, lambda s: s.get("received_per_s")), dashed=True
        ),
    ]
    return time_chart(
        "Throughput (tasks per second)",
        lines,
        start=data["now"] - data["window_s"],
        end=data["now"],
        unit="/s",
    )


def latency_chart(data: dict[str, Any], kind: str) -> str:
    snaps = data["series"].get("latency", [])
    colors = {"p50": "#2563eb", "p95": "#d97706", "p99": "#dc2626"}
    lines = [
        Line(f"{kind} {p}", color, _points(snaps, partial(_get, key=f"{kind}_{p}")))
        for p, color in colors.items()
    ]
    title = "Run time percentiles" if kind == "runtime" else "Queue wait percentiles"
    return time_chart(title, lines, start=data["now"] - data["window_s"], end=data["now"], unit="s")


def _in_flight_items(b: dict[str, Any]) -> float:
    """Items of claimed, unfinished batches: the batching package's field, or the store's."""
    return float(b.get("in_flight_items", b.get("inflight")) or 0)


def batch_chart(data: dict[str, Any]) -> str:
    bars = []
    for b in data["batches"]:
        group = b.get("group")
        name = str(b.get("batch_name", "?")) + (
            f" [{group}]" if isinstance(group, str) and group else ""
        )
        buffered, flying = float(b.get("buffered") or 0), _in_flight_items(b)
        note = f"{buffered:.0f} buffered, {flying:.0f} in flight"
        if b.get("dead"):
            note += f", {b['dead']} dead"
        age = _num(b.get("oldest_age_s"))
        if age is not None and buffered:
            note += f", oldest {format_value(age, 's')}"
        bars.append(
            Bar(
                name,
                [(buffered, "#9333ea", "buffered"), (flying, "#c4b5fd", "in flight")],
                note=note,
            )
        )
    return bar_chart("Batch buffers now (items)", bars, unit="items", empty="no batch buffers")


def batch_history_chart(data: dict[str, Any]) -> str:
    snaps = data["series"].get("batches", [])
    names: list[str] = []
    for snap in snaps:
        for b in snap.get("batches") or []:
            if b.get("batch_name") not in names:
                names.append(str(b.get("batch_name")))

    def buffered(snap: dict[str, Any], name: str) -> float:
        return sum(
            float(b.get("buffered") or 0)
            for b in snap.get("batches") or []
            if b.get("batch_name") == name
        )

    lines = [
        Line(name, _PALETTE[i % len(_PALETTE)], _points(snaps, partial(buffered, name=name)))
        for i, name in enumerate(names[: len(_PALETTE)])
    ]
    return time_chart(
        "Buffered batch items over time",
        lines,
        start=data["now"] - data["window_s"],
        end=data["now"],
        unit="items",
        empty="no batch buffers yet",
    )


def worker_bars(data: dict[str, Any]) -> str:
    t = data["thresholds"]
    bars = []
    for w in data["workers"]:
        host = str(w.get("hostname", "?"))
        state = "alive" if w.get("alive") else f"silent {format_value(_num(w.get('age_s')), 's')}"
        for what, color in (("memory", "#0891b2"), ("cpu", "#4f46e5")):
            value = _num(w.get(f"{what}_pct"))
            markers = [
                (t.get(f"{what}_warning_pct", 80.0), "#d97706"),
                (t.get(f"{what}_critical_pct", 90.0), "#dc2626"),
            ]
            note = f"{format_value(value, '%')} · {state}"
            if w.get("state"):
                note += f" · {w['state']}"
            if what == "memory" and w.get("paused_queues"):
                note += " · paused " + ",".join(str(q) for q in w["paused_queues"])
            bars.append(
                Bar(f"{host} {what}", [(value or 0.0, color, what)], note=note, markers=markers)
            )
    return bar_chart(
        "Worker resources (percent of limit)",
        bars,
        unit="%",
        maximum=100.0,
        empty="no worker heartbeats",
    )


def cache_chart(data: dict[str, Any]) -> str:
    limit = data["thresholds"].get("cache_hit_rate_pct", 50.0)
    bars = []
    for c in data.get("cache", []):
        rate = _num(c.get("hit_rate_pct"))
        hits, misses = int(c.get("hits") or 0), int(c.get("misses") or 0)
        color = "#16a34a" if rate is None or rate >= limit else "#d97706"
        bars.append(
            Bar(
                str(c.get("namespace", "?")),
                [(rate or 0.0, color, "hit rate")],
                note=f"{format_value(rate, '%')} of {hits + misses} lookups",
                markers=[(limit, "#d97706")],
            )
        )
    return bar_chart(
        "Cache hit rate (percent)", bars, unit="%", maximum=100.0, empty="no cache lookups yet"
    )


def worker_history_chart(
    data: dict[str, Any], key: str = "memory_pct", by_host: bool = False
) -> str:
    """One line per worker (or per host) of its memory or CPU over time."""
    t = data["thresholds"]
    what = "memory" if key == "memory_pct" else "cpu"
    per = "host" if by_host else "worker"
    title = "Memory" if what == "memory" else "CPU"
    return worker_chart(
        f"{title} per {per} (percent of limit)",
        data["series"].get("workers", []),
        key,
        start=data["now"] - data["window_s"],
        end=data["now"],
        by_host=by_host,
        thresholds=[
            (t.get(f"{what}_warning_pct", 80.0), "#d97706"),
            (t.get(f"{what}_critical_pct", 90.0), "#dc2626"),
        ],
    )


def task_charts(data: dict[str, Any]) -> str:
    """Succeeded and failed per second, one line per task name (the busiest)."""
    snaps = data["series"].get("tasks", [])
    start, end = data["now"] - data["window_s"], data["now"]
    return task_rate_chart(
        "Succeeded per task (per second)", snaps, "succeeded", start=start, end=end
    ) + task_rate_chart(
        "Failed per task (per second)",
        snaps,
        "failed",
        start=start,
        end=end,
        empty="no task failed in this window",
    )


# --- HTML -------------------------------------------------------------------------------------


def _age(now: float, since: Any) -> str:
    at = _num(since)
    return f"{format_value(max(0.0, now - at), 's')} ago" if at is not None else ""


def alerts_html(data: dict[str, Any]) -> str:
    firing = [a for a in data["alerts"] if a.get("state", "firing") == "firing"]
    if not firing:
        return '<p class="ok" id="no-alerts">No alert is firing.</p>'
    rows = []
    for a in firing:
        severity = str(a.get("severity", "warning"))
        color = _SEVERITY_COLORS.get(severity, "#6b7280")
        rows.append(
            f'<li class="alert {escape(severity)}" style="border-color:{color}">'
            f'<b style="color:{color}">{escape(severity.upper())}</b> '
            f'<span class="alertname">{escape(str(a.get("alertname", "?")))}</span> '
            f'<span class="muted">firing since {clock(_num(a.get("since")) or data["now"])} '
            f"({_age(data['now'], a.get('since'))})</span>"
            f"<div>{escape(str(a.get('summary', '')))}</div></li>"
        )
    return f'<ul class="alerts">{"".join(rows)}</ul>'


def alert_history_html(data: dict[str, Any], limit: int = 15) -> str:
    """The latest alert state changes: when each alert fired and resolved."""
    changes = list(data.get("alert_changes") or [])[:limit]
    if not changes:
        return '<p class="muted" id="no-alert-history">No alert has fired yet.</p>'
    rows = []
    for c in changes:
        state = str(c.get("state", ""))
        severity = str(c.get("severity") or "")
        color = "#16a34a" if state == "resolved" else _SEVERITY_COLORS.get(severity, "#6b7280")
        what = "resolved" if state == "resolved" else f"{severity} firing"
        held = ""
        since, at = _num(c.get("since")), _num(c.get("at"))
        if state == "resolved" and since is not None and at is not None:
            held = f" after {duration(max(0.0, at - since))}"
        rows.append(
            f'<tr><td class="n">{clock(_num(c.get("at")) or data["now"])}</td>'
            f'<td style="color:{color}">{escape(what)}{escape(held)}</td>'
            f'<td class="name">{escape(str(c.get("alertname", "?")))}</td>'
            f"<td>{escape(str(c.get('summary', '')))}</td></tr>"
        )
    return (
        '<table class="tasks" id="alert-history"><thead><tr><th>at (UTC)</th><th>change</th>'
        f"<th>alert</th><th>summary</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def tasks_html(data: dict[str, Any], limit: int = 12) -> str:
    rows = sorted(
        data["tasks"], key=lambda t: -(int(t.get("succeeded") or 0) + int(t.get("failed") or 0))
    )[:limit]
    if not rows:
        return '<p class="muted">No task has run yet.</p>'
    head = (
        "task",
        "queue",
        "succeeded",
        "failed",
        "retried",
        "deferred",
        "run p50",
        "run p95",
        "run p99",
        "wait p95",
    )
    body = "".join(
        "<tr>" + f'<td class="name"><a href="/dashboard/tasks/{quote(str(t.get("name", "?")))}">'
        f"{escape(str(t.get('name', '?')))}</a></td>"
        f'<td><i class="dot" style="background:{LEVEL_COLORS.get(str(t.get("queue")), "#999")}">'
        f"</i>{escape(str(t.get('queue', '')))}</td>"
        + "".join(
            f'<td class="n">{int(t.get(k) or 0)}</td>'
            for k in ("succeeded", "failed", "retried", "deferred")
        )
        + "".join(
            f'<td class="n">{format_value(_num(t.get(k)), "s")}</td>'
            for k in ("runtime_p50", "runtime_p95", "runtime_p99", "wait_p95")
        )
        + "</tr>"
        for t in rows
    )
    return (
        f'<table class="tasks"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>'
        f"</thead><tbody>{body}</tbody></table>"
    )


def kpis_html(data: dict[str, Any]) -> str:
    queues, workers, alerts = data["queues"], data["workers"], data["alerts"]
    latest = (data["series"].get("throughput") or [{}])[0]
    critical = sum(1 for a in alerts if a.get("severity") == "critical")
    items = [
        ("queued", str(sum(int(q.get("depth") or 0) for q in queues)), ""),
        ("workers alive", f"{sum(1 for w in workers if w.get('alive'))}/{len(workers)}", ""),
        ("tasks/s", format_value(_num(latest.get("per_s")) or 0.0), ""),
        ("failed/s", format_value(_num(latest.get("failed_per_s")) or 0.0), ""),
        ("alerts firing", str(len(alerts)), "bad" if critical else "warn" if alerts else ""),
    ]
    return (
        '<div class="kpis">'
        + "".join(
            f'<div class="kpi {cls}"><span>{escape(label)}</span><b>{escape(value)}</b></div>'
            for label, value, cls in items
        )
        + "</div>"
    )


def _card(title: str, *parts: str, wide: bool = False) -> str:
    return (
        f'<section class="card{" wide" if wide else ""}"><h2>{escape(title)}</h2>'
        f"{''.join(parts)}</section>"
    )


def coverage_note(data: dict[str, Any]) -> str:
    """Says so when a series hit the point limit before reaching the window's start."""
    starts = [
        float(snaps[-1]["at"])
        for snaps in data["series"].values()
        if len(snaps) >= MAX_POINTS and snaps and "at" in snaps[-1]
    ]
    if not starts or max(starts) <= data["now"] - data["window_s"]:
        return ""
    return f" · charts show the newest {MAX_POINTS} snapshots (since {clock(max(starts))} UTC)"


def render_board(data: dict[str, Any]) -> str:
    """The refreshable part of the page: KPIs, charts, alerts, task table."""
    problems = "".join(f"<li>{escape(p)}</li>" for p in data["problems"])
    level_legend = legend([(lv, LEVEL_COLORS[lv]) for lv in LEVEL_NAMES])
    return "".join(
        [
            f'<p class="muted">updated {clock(data["now"])} UTC · window '
            f"{duration(data['window_s'])}{coverage_note(data)}</p>",
            f'<ul class="problems">{problems}</ul>' if problems else "",
            kpis_html(data),
            '<div class="grid">',
            _card("Firing alerts", alerts_html(data), wide=True),
            _card("Alert history", alert_history_html(data), wide=True),
            _card("Queues", queue_depth_chart(data), level_legend, queue_now_chart(data)),
            _card(
                "Throughput",
                throughput_chart(data),
                legend(
                    [("succeeded/s", "#16a34a"), ("failed/s", "#dc2626"), ("received/s", "#6b7280")]
                ),
            ),
            _card(
                "Latency",
                latency_chart(data, "runtime"),
                latency_chart(data, "wait"),
                legend([("p50", "#2563eb"), ("p95", "#d97706"), ("p99", "#dc2626")]),
            ),
            _card("Batch buffers", batch_chart(data), batch_history_chart(data)),
            _card(
                "Workers",
                worker_bars(data),
                legend(
                    [
                        ("memory", "#0891b2"),
                        ("cpu", "#4f46e5"),
                        ("warning", "#d97706"),
                        ("critical", "#dc2626"),
                    ]
                ),
                worker_history_chart(data, "memory_pct"),
                worker_history_chart(data, "cpu_pct"),
            ),
            _card("Tasks over time", task_charts(data)),
            _card(
                "Cache",
                cache_chart(data),
                legend([("hit rate", "#16a34a"), ("below the alert threshold", "#d97706")]),
            ),
            _card("Tasks", tasks_html(data), wide=True),
            "</div>",
        ]
    )


def render_page(
    data: dict[str, Any], refresh_s: int, request: Any = None, settings: Any = None
) -> str:
    """The whole overview page (HTML) for :func:`gather`'s data."""
    header = ranges(request, data["window_s"], data.get("covered_since"), data["now"])
    return page(
        "dashboard",
        render_board(data),
        request=request,
        active="/dashboard",
        settings=settings,
        refresh_s=refresh_s,
        header_extra=header,
    )


# --- route ------------------------------------------------------------------------------------

router = APIRouter()


def _thresholds(settings: Any) -> dict[str, float]:
    m = settings.monitoring
    return {
        "memory_warning_pct": m.alert_memory_warning_pct,
        "memory_critical_pct": m.alert_memory_critical_pct,
        "cpu_warning_pct": m.alert_cpu_warning_pct,
        "cpu_critical_pct": m.alert_cpu_critical_pct,
        "cache_hit_rate_pct": m.alert_cache_hit_rate_pct,
    }


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(
    request: Request,
    window: Annotated[int, Query(ge=60, le=30 * 86_400, description="Seconds of history.")] = 3600,
    refresh: Annotated[int, Query(ge=0, le=3600, description="Seconds; 0: off.")] = 5,
    fragment: Annotated[bool, Query(description="Only the board, for the refresh.")] = False,
) -> Response:
    """The overview page, reused for half the stats interval (one build per period however many
    browsers refresh)."""
    state = getattr(request.app.state, "taskyard", None)
    if state is None:
        return HTMLResponse("<p>the stats API has no store configured</p>", status_code=503)
    settings = state.runtime.settings

    def compute() -> bytes:
        data = gather(state.store, _thresholds(settings), float(window))
        data["covered_since"] = covered_since(state.store)
        body = render_board(data) if fragment else render_page(data, refresh, request, settings)
        if len(data["problems"]) > len(CHART_SERIES):
            raise StoreDown(body)
        return body.encode()

    response: Response
    try:
        response = await respond_page(request, ("dashboard", window, refresh, fragment), compute)
    except StoreDown as down:
        response = HTMLResponse(
            str(down),
            status_code=503,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": PAGE_POLICY},
        )
    return response


class StoreDown(Exception):
    """Every reading failed: the page (carrying the problems) is answered with 503, uncached."""
