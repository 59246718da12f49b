"""The dashboard's other pages: workers, task names, one task name, one task.

Each page answers one question: which worker or host is short of memory or CPU
(``/dashboard/workers``); which tasks run and fail, and how often (``/dashboard/tasks``); what one
task name does over time and why it fails, with tracebacks (``/dashboard/tasks/{name}``); what
happened to one task (``/dashboard/task/{id}``: its timeline from the task lookup, arguments,
traceback). Each links to Flower's own task and worker pages. Pages are rendered in a worker
thread and reused for ``api_cache_s``, like the API's answers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from html import escape
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.deadletters.entry import Query as DeadQuery
from taskyard.deadletters.store import RedisDeadLetterStore
from taskyard.monitoring.dashboard.charts import Line, clock, format_value, time_chart
from taskyard.monitoring.dashboard.layout import (
    card,
    covered_since,
    page,
    ranges,
    respond_page,
    table,
)
from taskyard.monitoring.dashboard.series_charts import (
    SAMPLED_POINTS,
    sampled_series,
    task_rate_chart,
    worker_chart,
)
from taskyard.monitoring.timeline import lookup

logger = logging.getLogger(__name__)

#: Snapshots drawn per chart (a chart is a few hundred pixels wide).
CHART_POINTS = 240
#: Dead letters listed on a task name's page.
FAILURES_LISTED = 20
#: Colours of the warning and critical threshold lines.
WARNING, CRITICAL = "#d97706", "#dc2626"

router = APIRouter()

WindowQuery = Annotated[int, Query(ge=60, le=30 * 86_400, description="Seconds of history.")]
RefreshQuery = Annotated[int, Query(ge=0, le=3600, description="Seconds; 0: off.")]
FragmentQuery = Annotated[bool, Query(description="Only the board, for the refresh.")]


def flower_link(settings: Any, path: str, text: str) -> str:
    """A link to a page of Flower (its task or worker page)."""
    from taskyard.monitoring.flower import flower_url

    href = flower_url(settings) + path.lstrip("/")
    return f'<a href="{escape(href)}" rel="noreferrer">{escape(text)}</a>'


def task_link(task_id: str) -> str:
    return f'<a href="/dashboard/task/{quote(task_id, safe="")}">{escape(task_id)}</a>'


def name_link(name: str) -> str:
    return f'<a href="/dashboard/tasks/{quote(name, safe="")}">{escape(name)}</a>'


def _when(at: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(at)))
    except (TypeError, ValueError):
        return "-"


def _series(state: Any, name: str, since: float) -> list[dict[str, Any]]:
    """A sample of the series' snapshots spread over the window (as the overview reads)."""
    points = SAMPLED_POINTS if name == "tasks" else CHART_POINTS
    return sampled_series(state.store, name, since, time.time(), points)


async def _respond(request: Request, key: Any, render: Callable[[], str]) -> Response:
    response: Response = await respond_page(request, key, lambda: render().encode())
    return response


def _shell(
    request: Request,
    title: str,
    body: str,
    active: str,
    window: float,
    now: float,
    refresh: int,
    fragment: bool,
) -> str:
    if fragment:
        return body
    state = request.app.state.taskyard
    header = ranges(request, window, covered_since(state.store), now)
    return page(
        title,
        body,
        request=request,
        active=active,
        settings=state.runtime.settings,
        refresh_s=refresh,
        header_extra=header,
    )


async def _windowed(
    request: Request,
    key: tuple[Any, ...],
    title: str,
    active: str,
    render_body: Callable[[Any, float, float], str],
    window: int,
    refresh: int,
    fragment: bool,
) -> Response:
    """A page over a window of history: ``render_body(state, window, now)`` in the shell, cached
    under ``key`` with the window, refresh and fragment."""
    state = request.app.state.taskyard

    def render() -> str:
        now = time.time()
        body = render_body(state, float(window), now)
        return _shell(request, title, body, active, float(window), now, refresh, fragment)

    return await _respond(request, (*key, window, refresh, fragment), render)


def _kv(pairs: list[tuple[str, str]]) -> str:
    """A definition list of (label, HTML) pairs."""
    return '<dl class="kv">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


# --- workers ------------------------------------------------------------------------------------


def render_workers(state: Any, window: float, now: float) -> str:
    settings = state.runtime.settings
    m = settings.monitoring
    snaps = _series(state, "workers", now - window)
    start = now - window
    memory = [(m.alert_memory_warning_pct, WARNING), (m.alert_memory_critical_pct, CRITICAL)]
    cpu = [(m.alert_cpu_warning_pct, WARNING), (m.alert_cpu_critical_pct, CRITICAL)]
    charts = [
        card(
            heading,
            worker_chart(
                title, snaps, key, start=start, end=now, by_host=by_host, thresholds=thresholds
            ),
        )
        for heading, title, key, by_host, thresholds in (
            (
                "Memory per worker",
                "Memory per worker (percent of limit)",
                "memory_pct",
                False,
                memory,
            ),
            ("CPU per worker", "CPU per worker (percent)", "cpu_pct", False, cpu),
            (
                "Memory per host",
                "Memory per host (highest of its workers, percent)",
                "memory_pct",
                True,
                [],
            ),
            ("CPU per host", "CPU per host (highest of its workers, percent)", "cpu_pct", True, []),
        )
    ]
    rows = []
    for w in state.store.workers():
        host = str(w.get("hostname", "?"))
        rows.append(
            [
                flower_link(settings, f"worker/{quote(host, safe='')}", host),
                escape(str(w.get("host") or host.rpartition("@")[2])),
                "yes" if w.get("alive") else '<b class="stale">NO</b>',
                escape(format_value(w.get("age_s"), "s")),
                escape(format_value(w.get("memory_pct"), "%")),
                escape(format_value(w.get("cpu_pct"), "%")),
                escape(str(w.get("state") or "-")),
                escape(",".join(str(q) for q in w.get("paused_queues") or []) or "-"),
            ]
        )
    listing = table(
        ["worker (Flower)", "host", "alive", "heartbeat age", "memory", "cpu", "state", "paused"],
        rows,
        table_id="workers",
        empty="no worker heartbeats",
    )
    return (
        '<div class="grid">' + card("Workers now", listing, wide=True) + "".join(charts) + "</div>"
    )


@router.get("/dashboard/workers", response_class=HTMLResponse, include_in_schema=False)
async def workers_page(
    request: Request,
    window: WindowQuery = 3600,
    refresh: RefreshQuery = 5,
    fragment: FragmentQuery = False,
) -> Response:
    """Per-worker and per-host memory and CPU over time, and every worker now."""
    return await _windowed(
        request,
        ("page:workers",),
        "workers",
        "/dashboard/workers",
        render_workers,
        window,
        refresh,
        fragment,
    )


# --- task names ---------------------------------------------------------------------------------


def _per_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = str(row.get("name", "?"))
        entry = out.setdefault(name, {"name": name, "queues": [], "runtime_p95": None})
        entry["queues"].append(str(row.get("queue", "")))
        for key in ("received", "succeeded", "failed", "retried", "deferred"):
            entry[key] = entry.get(key, 0) + int(row.get(key) or 0)
        p95 = row.get("runtime_p95")
        if p95 is not None and (entry["runtime_p95"] is None or p95 > entry["runtime_p95"]):
            entry["runtime_p95"] = p95
    return out


def render_tasks(state: Any, window: float, now: float) -> str:
    snaps = _series(state, "tasks", now - window)
    per_name = sorted(
        _per_name(state.store.tasks()).values(), key=lambda e: -(e["succeeded"] + e["failed"])
    )
    rows = [
        [
            name_link(e["name"]),
            escape(",".join(e["queues"])),
            str(e["succeeded"]),
            f'<b class="stale">{e["failed"]}</b>' if e["failed"] else "0",
            str(e["retried"]),
            str(e["deferred"]),
            escape(format_value(e["runtime_p95"], "s")),
        ]
        for e in per_name
    ]
    start = now - window
    return (
        '<div class="grid">'
        + card(
            "Succeeded per task",
            task_rate_chart(
                "Succeeded per task (per second)", snaps, "succeeded", start=start, end=now
            ),
        )
        + card(
            "Failed per task",
            task_rate_chart(
                "Failed per task (per second)",
                snaps,
                "failed",
                start=start,
                end=now,
                empty="no task failed in this window",
            ),
        )
        + card(
            "Task names",
            table(
                ["task", "queues", "succeeded", "failed", "retried", "deferred", "run p95"],
                rows,
                table_id="task-names",
                empty="no task has run yet",
            ),
            wide=True,
        )
        + "</div>"
    )


@router.get("/dashboard/tasks", response_class=HTMLResponse, include_in_schema=False)
async def tasks_page(
    request: Request,
    window: WindowQuery = 3600,
    refresh: RefreshQuery = 5,
    fragment: FragmentQuery = False,
) -> Response:
    """Throughput and failures per task name over time, and every task name's counters."""
    return await _windowed(
        request,
        ("page:tasks",),
        "tasks",
        "/dashboard/tasks",
        render_tasks,
        window,
        refresh,
        fragment,
    )


def dead_letters(runtime: Any, **query: Any) -> tuple[list[Any], str]:
    """Dead letters matching ``query`` from the dead-letter store, or why there are none."""
    try:
        store = RedisDeadLetterStore.for_runtime(runtime)
        return list(store.search(DeadQuery(state=None, **query), limit=FAILURES_LISTED)), ""
    except Exception as exc:
        logger.warning("dashboard: reading dead letters failed", exc_info=True)
        return [], f"dead letters unavailable: {type(exc).__name__}: {exc}"


def _failure_rows(settings: Any, entries: list[Any]) -> list[list[str]]:
    rows = []
    for e in entries:
        trace = (e.traceback or e.exception or e.detail or "").strip()
        rows.append(
            [
                escape(_when(e.last_at)),
                task_link(e.id),
                flower_link(settings, f"task/{quote(e.id, safe='')}", "Flower"),
                escape(e.reason),
                escape(e.state),
                f"<b>{escape(e.exception_type or '-')}</b> {escape(e.exception[:200])}"
                + (
                    f'<details><summary>traceback</summary><pre class="tb">{escape(trace)}</pre>'
                    "</details>"
                    if trace
                    else ""
                ),
            ]
        )
    return rows


def render_task_name(state: Any, name: str, window: float, now: float) -> str:
    settings = state.runtime.settings
    snaps = _series(state, "tasks", now - window)
    start = now - window
    runtime_lines = []
    for key, color in (
        ("runtime_p50", "#2563eb"),
        ("runtime_p95", "#d97706"),
        ("runtime_p99", "#dc2626"),
    ):
        points = []
        for snap in snaps:
            values = [
                row.get(key)
                for row in snap.get("tasks") or []
                if row.get("name") == name and row.get(key) is not None
            ]
            if "at" in snap:
                points.append((float(snap["at"]), max(values) if values else None))
        runtime_lines.append(Line(key.replace("runtime_", "run "), color, points))
    rows = [r for r in state.store.tasks() if r.get("name") == name]
    counters = [
        [
            escape(str(r.get("queue", ""))),
            *(
                str(int(r.get(k) or 0))
                for k in ("received", "started", "succeeded", "failed", "retried", "deferred")
            ),
            *(
                escape(format_value(r.get(k), "s"))
                for k in ("runtime_p50", "runtime_p95", "wait_p95")
            ),
        ]
        for r in rows
    ]
    entries, problem = dead_letters(state.runtime, name=name)
    failures = table(
        ["last failed (UTC)", "task", "", "reason", "state", "exception"],
        _failure_rows(settings, entries),
        table_id="failures",
        empty=problem or "no dead letter of this task",
    )
    return (
        f'<h2 id="task-name">{escape(name)}</h2><p>'
        + flower_link(settings, "tasks", "Flower's task list")
        + ' · <a href="/dashboard/dead">all dead letters</a></p><div class="grid">'
        + card(
            "Succeeded and failed",
            task_rate_chart(
                f"{name}: succeeded per second",
                snaps,
                "succeeded",
                start=start,
                end=now,
                names=[name],
            ),
            task_rate_chart(
                f"{name}: failed per second",
                snaps,
                "failed",
                start=start,
                end=now,
                names=[name],
                empty="it did not fail in this window",
            ),
        )
        + card(
            "Run time",
            time_chart(
                f"{name}: run time percentiles (since start)",
                runtime_lines,
                start=start,
                end=now,
                unit="s",
            ),
        )
        + card(
            "Counters per queue",
            table(
                [
                    "queue",
                    "received",
                    "started",
                    "succeeded",
                    "failed",
                    "retried",
                    "deferred",
                    "run p50",
                    "run p95",
                    "wait p95",
                ],
                counters,
                empty="no counters yet",
            ),
            wide=True,
        )
        + card("Recent failures, newest first", failures, wide=True)
        + "</div>"
    )


@router.get("/dashboard/tasks/{name}", response_class=HTMLResponse, include_in_schema=False)
async def task_name_page(
    request: Request,
    name: Annotated[str, Path(max_length=300)],
    window: WindowQuery = 3600,
    refresh: RefreshQuery = 5,
    fragment: FragmentQuery = False,
) -> Response:
    """One task name: its throughput, failures and run time over time, its dead letters."""
    return await _windowed(
        request,
        ("page:task-name", name),
        name,
        "/dashboard/tasks",
        lambda state, span, now: render_task_name(state, name, span, now),
        window,
        refresh,
        fragment,
    )


# --- one task -----------------------------------------------------------------------------------


def task_timeline(state: Any, task_id: str) -> tuple[dict[str, Any] | None, str]:
    """The task lookup's timeline of ``task_id``, or why there is none."""
    try:
        engine = getattr(state.store, "engine", None)
        return lookup(state.runtime, engine, task_id), ""
    except Exception as exc:
        logger.warning("dashboard: task lookup of %s failed", task_id, exc_info=True)
        return None, f"task lookup unavailable: {type(exc).__name__}: {exc}"


def _dead_entry(runtime: Any, task_id: str) -> Any:
    try:
        return RedisDeadLetterStore.for_runtime(runtime).get(task_id)
    except Exception:
        logger.warning("dashboard: dead letter %s unreadable", task_id, exc_info=True)
        return None


def render_task(state: Any, task_id: str) -> str:
    settings = state.runtime.settings
    found, problem = task_timeline(state, task_id)
    entry = _dead_entry(state.runtime, task_id)
    in_flower = flower_link(settings, f"task/{quote(task_id, safe='')}", "this task in Flower")
    if found is None and entry is None:
        why = problem or (
            "No event of this task is known (it may be older than the timeline "
            "retention, or was never sent)."
        )
        return (
            f'<h2 id="task-id">{escape(task_id)}</h2><p class="muted" id="not-found">'
            f"{escape(why)}</p><p>{in_flower}</p>"
        )
    known = found or {}
    name = known.get("name") or (entry.name if entry is not None else "")
    queue = known.get("queue") or (entry.queue if entry is not None else "") or "-"
    task_state = known.get("state") or (entry.state if entry is not None else "-")
    summary = [
        ("task", escape(task_id)),
        ("name", name_link(name) if name else "-"),
        ("queue", escape(queue)),
        ("state", f'<b id="task-state">{escape(str(task_state))}</b>'),
        ("Flower", in_flower),
    ]
    if found is not None:
        summary.append(("first seen", escape(_when(found["first_at"]) + " UTC")))
        summary.append(("last seen", escape(_when(found["last_at"]) + " UTC")))
    events = []
    for event in (found or {}).get("events", []):
        worker = str(event.get("worker") or "")
        at = float(event.get("at") or 0)
        events.append(
            [
                escape(f"{_when(at)}.{int(at % 1 * 1000):03d}"),
                escape(str(event.get("event", ""))),
                flower_link(settings, f"worker/{quote(worker, safe='')}", worker)
                if worker
                else "-",
                escape(str(event.get("detail") or "")),
            ]
        )
    parts = [
        f'<h2 id="task-id">{escape(task_id)}</h2>',
        _kv(summary),
        '<div class="grid">',
        card(
            "Timeline",
            table(
                ["at (UTC)", "event", "worker", "detail"],
                events,
                table_id="timeline",
                empty=problem or "no event recorded",
            ),
            wide=True,
        ),
    ]
    if entry is not None:
        trace = (entry.traceback or "").strip()
        details = [
            ("reason", escape(entry.reason)),
            ("args", f"<code>{escape(_pretty(entry.args))}</code>"),
            ("kwargs", f"<code>{escape(_pretty(entry.kwargs))}</code>"),
            ("deliveries", str(entry.deliveries)),
            ("attempts", str(entry.attempts)),
            (
                "exception",
                f"<b>{escape(entry.exception_type or '-')}</b> {escape(entry.exception)}",
            ),
        ]
        parts.append(
            card(
                "Dead letter",
                _kv(details)
                + (f'<pre class="tb" id="traceback">{escape(trace)}</pre>' if trace else ""),
                wide=True,
            )
        )
    else:
        result = (
            "not stored: no result backend is configured"
            if not settings.result_backend
            else "in the result backend"
        )
        parts.append(
            card(
                "Result",
                f'<p class="muted">{escape(result)}; it is not a dead letter.</p>',
                wide=True,
            )
        )
    parts.append("</div>")
    return "".join(parts)


def _pretty(raw: str) -> str:
    try:
        return json.dumps(json.loads(raw), indent=None, ensure_ascii=False)[:2000]
    except (ValueError, TypeError):
        return str(raw)[:2000]


@router.get("/dashboard/task/{task_id}", response_class=HTMLResponse, include_in_schema=False)
async def task_page(
    request: Request,
    task_id: Annotated[str, Path(max_length=200)],
    refresh: RefreshQuery = 0,
    fragment: FragmentQuery = False,
) -> Response:
    """One task: its timeline, arguments, and traceback when it died."""
    state = request.app.state.taskyard

    def render() -> str:
        now = time.time()
        body = render_task(state, task_id)
        if fragment:
            return body
        return page(
            f"task {task_id}",
            body,
            request=request,
            active="",
            settings=state.runtime.settings,
            refresh_s=refresh,
            header_extra=f'<span class="muted">at {clock(now)} UTC</span>',
        )

    return await _respond(request, ("page:task", task_id, refresh, fragment), render)
