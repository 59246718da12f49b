"""The dashboard at ``/dashboard``: one server-rendered HTML page of SVG charts.

:func:`gather` reads the stats store; :func:`render_page` turns those plain dicts into HTML and is
pure, so it is tested on sample data. The page has no external resource at all (works offline);
a ten-line inline script re-fetches the board every ``refresh`` seconds, and without JavaScript a
``<meta refresh>`` reloads the page instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from html import escape
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from taskyard.monitoring.http.charts import (
    Bar,
    Line,
    bar_chart,
    clock,
    duration,
    format_value,
    legend,
    time_chart,
)
from taskyard.routing.levels import LEVEL_NAMES

logger = logging.getLogger(__name__)

#: Color per level, most urgent first: red, orange, blue, green, purple.
LEVEL_COLORS = {"critical": "#dc2626", "high": "#ea580c", "normal": "#2563eb",
                "low": "#16a34a", "batch": "#9333ea"}
#: Series the charts draw over time.
CHART_SERIES = ("queues", "throughput", "latency", "batches", "workers")
#: Most snapshots read per series: series_length's default, 2 h at the default 10 s.
MAX_POINTS = 720
WINDOWS = ((900, "15 min"), (3600, "1 h"), (6 * 3600, "6 h"), (24 * 3600, "24 h"))
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
_SEVERITY_COLORS = {"critical": "#dc2626", "warning": "#d97706"}


def _safe(read: Callable[[], Any], default: Any, what: str, problems: list[str]) -> Any:
    """One store reading; a failure leaves that section empty and is named on the page."""
    try:
        return read()
    except Exception as exc:
        logger.warning("dashboard: reading %s failed", what, exc_info=True)
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return default


def gather(store: Any, thresholds: dict[str, float], window_s: float,
           now: float | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain dicts, read from a StatsStore."""
    now = time.time() if now is None else now
    problems: list[str] = []
    since = now - window_s
    data: dict[str, Any] = {
        "now": now, "window_s": window_s, "thresholds": thresholds, "problems": problems,
        "queues": _safe(store.queues, [], "queue depths", problems),
        "workers": _safe(store.workers, [], "workers", problems),
        "tasks": _safe(store.tasks, [], "task stats", problems),
        "batches": _safe(store.batches, [], "batch buffers", problems),
        "alerts": _safe(store.alerts, [], "alerts", problems),
        "alert_changes": _safe(getattr(store, "alert_changes", lambda: []), [],
                               "alert history", problems),
        "cache": _safe(store.cache, [], "cache", problems),
    }
    data["series"] = {
        name: _safe(partial(store.series, name, since, None, MAX_POINTS, 0), [],
                    f"{name} history", problems)
        for name in CHART_SERIES
    }
    return data


# --- charts from snapshots -----------------------------------------------------------------------

def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _points(snapshots: Sequence[dict[str, Any]],
            pick: Callable[[dict[str, Any]], Any]) -> list[tuple[float, float | None]]:
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
    lines = [Line(level, LEVEL_COLORS[level], _points(snaps, partial(_depth, level=level)))
             for level in LEVEL_NAMES]
    return time_chart("Queue depth per level (messages)", lines,
                      start=data["now"] - data["window_s"], end=data["now"], unit="msg")


def queue_now_chart(data: dict[str, Any]) -> str:
    bars = []
    for q in data["queues"]:
        # Over AMQP only ready messages are visible: say so rather than show "0 reserved".
        reserved = (f"{q.get('reserved', 0)} reserved" if q.get("reserved_known", True)
                    else "reserved unknown")
        bars.append(Bar(q["queue"], [(float(q.get("ready", 0)),
                                      LEVEL_COLORS.get(q["queue"], "#6b7280"), "ready"),
                                     (float(q.get("reserved", 0)), "#9ca3af", "reserved")],
                        note=f"{q.get('depth', 0)} ({reserved})"))
    return bar_chart("Queue depth now: ready and reserved", bars, unit="msg",
                     empty="queue depths unavailable")


def throughput_chart(data: dict[str, Any]) -> str:
    snaps = data["series"].get("throughput", [])
    lines = [Line("succeeded/s", "#16a34a", _points(snaps, lambda s: s.get("succeeded_per_s"))),
             Line("failed/s", "#dc2626", _points(snaps, lambda s: s.get("failed_per_s"))),
             Line("received/s", "#6b7280", _points(snaps, lambda s: s.get("received_per_s")),
                  dashed=True)]
    return time_chart("Throughput (tasks per second)", lines,
                      start=data["now"] - data["window_s"], end=data["now"], unit="/s")


def latency_chart(data: dict[str, Any], kind: str) -> str:
    snaps = data["series"].get("latency", [])
    colors = {"p50": "#2563eb", "p95": "#d97706", "p99": "#dc2626"}
    lines = [Line(f"{kind} {p}", color, _points(snaps, partial(_get, key=f"{kind}_{p}")))
             for p, color in colors.items()]
    title = "Run time percentiles" if kind == "runtime" else "Queue wait percentiles"
    return time_chart(title, lines, start=data["now"] - data["window_s"], end=data["now"],
                      unit="s")


def _in_flight_items(b: dict[str, Any]) -> float:
    """Items of claimed, unfinished batches: the batching package's field, or the store's."""
    return float(b.get("in_flight_items", b.get("inflight")) or 0)


def batch_chart(data: dict[str, Any]) -> str:
    bars = []
    for b in data["batches"]:
        group = b.get("group")
        name = str(b.get("batch_name", "?")) + (f" [{group}]" if isinstance(group, str)
                                                and group else "")
        buffered, flying = float(b.get("buffered") or 0), _in_flight_items(b)
        note = f"{buffered:.0f} buffered, {flying:.0f} in flight"
        if b.get("dead"):
            note += f", {b['dead']} dead"
        age = _num(b.get("oldest_age_s"))
        if age is not None and buffered:
            note += f", oldest {format_value(age, 's')}"
        bars.append(Bar(name, [(buffered, "#9333ea", "buffered"),
                               (flying, "#c4b5fd", "in flight")], note=note))
    return bar_chart("Batch buffers now (items)", bars, unit="items", empty="no batch buffers")


def batch_history_chart(data: dict[str, Any]) -> str:
    snaps = data["series"].get("batches", [])
    names: list[str] = []
    for snap in snaps:
        for b in snap.get("batches") or []:
            if b.get("batch_name") not in names:
                names.append(str(b.get("batch_name")))

    def buffered(snap: dict[str, Any], name: str) -> float:
        return sum(float(b.get("buffered") or 0) for b in snap.get("batches") or []
                   if b.get("batch_name") == name)

    lines = [Line(name, _PALETTE[i % len(_PALETTE)],
                  _points(snaps, partial(buffered, name=name)))
             for i, name in enumerate(names[:len(_PALETTE)])]
    return time_chart("Buffered batch items over time", lines, start=data["now"] - data["window_s"],
                      end=data["now"], unit="items", empty="no batch buffers yet")


def worker_chart(data: dict[str, Any]) -> str:
    t = data["thresholds"]
    bars = []
    for w in data["workers"]:
        host = str(w.get("hostname", "?"))
        state = "alive" if w.get("alive") else f"silent {format_value(_num(w.get('age_s')), 's')}"
        for what, color in (("memory", "#0891b2"), ("cpu", "#4f46e5")):
            value = _num(w.get(f"{what}_pct"))
            markers = [(t.get(f"{what}_warning_pct", 80.0), "#d97706"),
                       (t.get(f"{what}_critical_pct", 90.0), "#dc2626")]
            note = f"{format_value(value, '%')} · {state}"
            if w.get("state"):
                note += f" · {w['state']}"
            if what == "memory" and w.get("paused_queues"):
                note += " · paused " + ",".join(str(q) for q in w["paused_queues"])
            bars.append(Bar(f"{host} {what}", [(value or 0.0, color, what)], note=note,
                            markers=markers))
    return bar_chart("Worker resources (percent of limit)", bars, unit="%", maximum=100.0,
                     empty="no worker heartbeats")


def cache_chart(data: dict[str, Any]) -> str:
    limit = data["thresholds"].get("cache_hit_rate_pct", 50.0)
    bars = []
    for c in data.get("cache", []):
        rate = _num(c.get("hit_rate_pct"))
        hits, misses = int(c.get("hits") or 0), int(c.get("misses") or 0)
        color = "#16a34a" if rate is None or rate >= limit else "#d97706"
        bars.append(Bar(str(c.get("namespace", "?")), [(rate or 0.0, color, "hit rate")],
                        note=f"{format_value(rate, '%')} of {hits + misses} lookups",
                        markers=[(limit, "#d97706")]))
    return bar_chart("Cache hit rate (percent)", bars, unit="%", maximum=100.0,
                     empty="no cache lookups yet")


def worker_history_chart(data: dict[str, Any]) -> str:
    snaps = data["series"].get("workers", [])

    def peak(snap: dict[str, Any], key: str) -> float | None:
        values = [_num(w.get(key)) for w in snap.get("workers") or [] if w.get("alive", True)]
        present = [v for v in values if v is not None]
        return max(present) if present else None

    lines = [Line("max memory %", "#0891b2", _points(snaps, lambda s: peak(s, "memory_pct"))),
             Line("max cpu %", "#4f46e5", _points(snaps, lambda s: peak(s, "cpu_pct")))]
    t = data["thresholds"]
    return time_chart("Worker resources over time", lines, start=data["now"] - data["window_s"],
                      end=data["now"], unit="%",
                      thresholds=[(t.get("memory_warning_pct", 80.0), "#d97706"),
                                  (t.get("memory_critical_pct", 90.0), "#dc2626")])


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
            f'({_age(data["now"], a.get("since"))})</span>'
            f'<div>{escape(str(a.get("summary", "")))}</div></li>')
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
            f'<td>{escape(str(c.get("summary", "")))}</td></tr>')
    return ('<table class="tasks" id="alert-history"><thead><tr><th>at (UTC)</th><th>change</th>'
            f'<th>alert</th><th>summary</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def tasks_html(data: dict[str, Any], limit: int = 12) -> str:
    rows = sorted(data["tasks"], key=lambda t: -(int(t.get("succeeded") or 0)
                                                  + int(t.get("failed") or 0)))[:limit]
    if not rows:
        return '<p class="muted">No task has run yet.</p>'
    head = ("task", "queue", "succeeded", "failed", "retried", "deferred", "run p50", "run p95",
            "run p99", "wait p95")
    body = "".join(
        "<tr>" + f'<td class="name">{escape(str(t.get("name", "?")))}</td>'
        f'<td><i class="dot" style="background:{LEVEL_COLORS.get(str(t.get("queue")), "#999")}">'
        f'</i>{escape(str(t.get("queue", "")))}</td>'
        + "".join(f'<td class="n">{int(t.get(k) or 0)}</td>'
                  for k in ("succeeded", "failed", "retried", "deferred"))
        + "".join(f'<td class="n">{format_value(_num(t.get(k)), "s")}</td>'
                  for k in ("runtime_p50", "runtime_p95", "runtime_p99", "wait_p95"))
        + "</tr>" for t in rows)
    return (f'<table class="tasks"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>'
            f"</thead><tbody>{body}</tbody></table>")


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
    return '<div class="kpis">' + "".join(
        f'<div class="kpi {cls}"><span>{escape(label)}</span><b>{escape(value)}</b></div>'
        for label, value, cls in items) + "</div>"


def _card(title: str, *parts: str, wide: bool = False) -> str:
    return (f'<section class="card{" wide" if wide else ""}"><h2>{escape(title)}</h2>'
            f'{"".join(parts)}</section>')


def coverage_note(data: dict[str, Any]) -> str:
    """Says so when a series hit the point limit before reaching the window's start."""
    starts = [float(snaps[-1]["at"]) for snaps in data["series"].values()
              if len(snaps) >= MAX_POINTS and snaps and "at" in snaps[-1]]
    if not starts or max(starts) <= data["now"] - data["window_s"]:
        return ""
    return (f" · charts show the newest {MAX_POINTS} snapshots (since "
            f"{clock(max(starts))} UTC)")


def render_board(data: dict[str, Any]) -> str:
    """The refreshable part of the page: KPIs, charts, alerts, task table."""
    problems = "".join(f"<li>{escape(p)}</li>" for p in data["problems"])
    level_legend = legend([(lv, LEVEL_COLORS[lv]) for lv in LEVEL_NAMES])
    return "".join([
        f'<p class="muted">updated {clock(data["now"])} UTC · window '
        f'{duration(data["window_s"])}{coverage_note(data)}</p>',
        f'<ul class="problems">{problems}</ul>' if problems else "",
        kpis_html(data),
        '<div class="grid">',
        _card("Firing alerts", alerts_html(data), wide=True),
        _card("Alert history", alert_history_html(data), wide=True),
        _card("Queues", queue_depth_chart(data), level_legend, queue_now_chart(data)),
        _card("Throughput", throughput_chart(data),
              legend([("succeeded/s", "#16a34a"), ("failed/s", "#dc2626"),
                      ("received/s", "#6b7280")])),
        _card("Latency", latency_chart(data, "runtime"), latency_chart(data, "wait"),
              legend([("p50", "#2563eb"), ("p95", "#d97706"), ("p99", "#dc2626")])),
        _card("Batch buffers", batch_chart(data), batch_history_chart(data)),
        _card("Workers", worker_chart(data), worker_history_chart(data),
              legend([("memory", "#0891b2"), ("cpu", "#4f46e5"), ("warning", "#d97706"),
                      ("critical", "#dc2626")])),
        _card("Cache", cache_chart(data),
              legend([("hit rate", "#16a34a"), ("below the alert threshold", "#d97706")])),
        _card("Tasks", tasks_html(data), wide=True),
        "</div>",
    ])


_CSS = """
body{font:14px system-ui,sans-serif;margin:0;background:#f3f4f6;color:#111827}
header{background:#111827;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header h1{font-size:18px;margin:0}header a{color:#93c5fd;margin-right:8px}
main{padding:12px 20px}.muted{color:#6b7280}.grid{display:grid;gap:12px;
grid-template-columns:repeat(auto-fill,minmax(590px,1fr))}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px #0002}
.card.wide{grid-column:1/-1}.card h2{font-size:15px;margin:2px 0 8px}
.kpis{display:flex;gap:12px;margin:8px 0 12px;flex-wrap:wrap}
.kpi{background:#fff;border-radius:8px;padding:8px 16px;min-width:110px;box-shadow:0 1px 2px #0002}
.kpi span{display:block;color:#6b7280;font-size:12px}.kpi b{font-size:22px}
.kpi.warn b{color:#d97706}.kpi.bad b{color:#dc2626}
.legend{display:flex;gap:14px;font-size:12px;margin:2px 0 8px 52px;flex-wrap:wrap}
.legend i,.dot{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.alerts{list-style:none;padding:0;margin:0}
.alert{border-left:4px solid;padding:4px 10px;margin:4px 0;background:#fef2f2}
.alert.warning{background:#fffbeb}.ok{color:#16a34a;font-weight:600}
.problems{color:#b91c1c}table.tasks{border-collapse:collapse;width:100%;font-size:13px}
.tasks th,.tasks td{padding:3px 8px;border-bottom:1px solid #e5e7eb;text-align:left}
.tasks td.n{text-align:right;font-variant-numeric:tabular-nums}.stale{color:#b91c1c}
"""

_SCRIPT = """
(function(){var s=%d;if(!s)return;setInterval(function(){
var u=new URL(location.href);u.searchParams.set('fragment','1');
fetch(u).then(function(r){if(!r.ok)throw r.status;return r.text()}).then(function(t){
document.getElementById('board').innerHTML=t;document.getElementById('stale').textContent=''})
.catch(function(e){document.getElementById('stale').textContent='refresh failed ('+e+')'})
},s*1000)})();
"""


def render_page(data: dict[str, Any], refresh_s: int) -> str:
    """The whole dashboard page (HTML) for :func:`gather`'s data."""
    windows = " ".join(f'<a href="?window={seconds}&amp;refresh={refresh_s}">{label}</a>'
                       for seconds, label in WINDOWS)
    fallback = (f'<noscript><meta http-equiv="refresh" content="{refresh_s}"></noscript>'
                if refresh_s else "")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>taskyard dashboard</title>{fallback}<style>{_CSS}</style></head><body>"
        f'<header><h1>taskyard</h1><nav>{windows}</nav>'
        f'<span class="muted">auto-refresh {refresh_s or "off"}{" s" if refresh_s else ""}'
        '</span><span id="stale" class="stale"></span></header>'
        f'<main id="board">{render_board(data)}</main>'
        f"<script>{_SCRIPT % refresh_s}</script></body></html>"
    )


# --- route ------------------------------------------------------------------------------------

router = APIRouter()


def _thresholds(settings: Any) -> dict[str, float]:
    m = settings.monitoring
    return {"memory_warning_pct": m.alert_memory_warning_pct,
            "memory_critical_pct": m.alert_memory_critical_pct,
            "cpu_warning_pct": m.alert_cpu_warning_pct,
            "cpu_critical_pct": m.alert_cpu_critical_pct,
            "cache_hit_rate_pct": m.alert_cache_hit_rate_pct}


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard(
    request: Request,
    window: Annotated[int, Query(ge=60, le=30 * 86_400, description="Seconds of history.")] = 3600,
    refresh: Annotated[int, Query(ge=0, le=3600, description="Seconds; 0: off.")] = 5,
    fragment: Annotated[bool, Query(description="Only the board, for the refresh.")] = False,
) -> HTMLResponse:
    """The dashboard page (runs in the thread pool: the store does blocking I/O)."""
    state = getattr(request.app.state, "taskyard", None)
    if state is None:
        return HTMLResponse("<p>the stats API has no store configured</p>", status_code=503)
    data = gather(state.store, _thresholds(state.runtime.settings), float(window))
    status = 503 if len(data["problems"]) > len(CHART_SERIES) else 200
    body = render_board(data) if fragment else render_page(data, refresh)
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
