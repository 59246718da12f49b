"""The dashboard's overview at ``/dashboard``: queues, throughput, latency, workers, alerts.

:func:`gather` reads the stats store into an :class:`OverviewData` of typed rows (the JSON API's
models); :func:`render_page` and :func:`render_board` turn it into HTML through
``templates/overview.html`` and are pure, so they are tested on sample data. Bars are
server-rendered SVG with a hover title on each; time charts are drawn by the vendored uPlot,
whose legend shows every line's value at the hovered time. The page loads nothing from elsewhere
(works offline); ``dashboard.js`` re-fetches the board every ``refresh`` seconds, and without
JavaScript a ``<meta refresh>`` reloads the page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.config import Settings
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.query import Body
from taskyard.monitoring.api.state import StatsSource
from taskyard.monitoring.dashboard.charts import (
    Bar,
    BarChart,
    Line,
    TimeChart,
    bar_chart,
    clock,
    duration,
    format_value,
    time_chart,
)
from taskyard.monitoring.dashboard.layout import (
    Shell,
    Window,
    api_state,
    covered_since,
    page_response,
    respond_page,
    shell,
)
from taskyard.monitoring.dashboard.rows import (
    BatchesSnapshot,
    LatencySnapshot,
    QueuesSnapshot,
    Row,
    Series,
    Snapshot,
    Thresholds,
    series_of,
    typed,
)
from taskyard.monitoring.dashboard.series_charts import (
    CHART_POINTS,
    SAMPLED_POINTS,
    Reading,
    task_rate_chart,
    worker_chart,
)
from taskyard.monitoring.dashboard.templating import render
from taskyard.routing.levels import LEVEL_NAMES

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=Snapshot)

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
SAMPLED_SERIES = ("tasks",)
#: Most snapshots read per series: series_length's default, 2 h at the default 10 s.
MAX_POINTS = 720
#: Task names in the overview's table (the busiest).
TASKS_LISTED = 12
#: Alert changes in the overview's history table.
CHANGES_LISTED = 15
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
_SEVERITY_COLORS = {"critical": "#dc2626", "warning": "#d97706"}


@dataclass
class OverviewData:
    """Everything the overview shows: the store's rows as the API's models, and the series'
    snapshots (newest first) as the stats collection wrote them."""

    now: float
    window_s: float
    thresholds: Thresholds = field(default_factory=Thresholds)
    problems: list[str] = field(default_factory=list)
    queues: list[m.QueueStats] = field(default_factory=list)
    workers: list[m.WorkerStats] = field(default_factory=list)
    tasks: list[m.TaskStats] = field(default_factory=list)
    batches: list[m.BatchStats] = field(default_factory=list)
    alerts: list[m.Alert] = field(default_factory=list)
    alert_changes: list[m.AlertChange] = field(default_factory=list)
    cache: list[m.CacheStats] = field(default_factory=list)
    series: Series = field(default_factory=Series)
    covered_since: float | None = None

    @property
    def start(self) -> float:
        return self.now - self.window_s


def _safe(read: Callable[[], Any], default: Any, what: str, problems: list[str]) -> Any:
    """One store reading; a failure leaves that section empty and is named on the page."""
    try:
        return read()
    except Exception as exc:
        logger.warning("dashboard: reading %s failed", what, exc_info=True)
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return default


def gather(
    store: StatsSource, thresholds: Thresholds, window_s: float, now: float | None = None
) -> OverviewData:
    """Everything the page shows, read from a stats store."""
    now = time.time() if now is None else now
    problems: list[str] = []
    since = now - window_s

    def read(what: str, model: type[Row], rows: Callable[[], list[dict[str, Any]]]) -> list[Row]:
        found: list[Row] = _safe(lambda: typed(model, rows()), [], what, problems)
        return found

    data = OverviewData(
        now=now,
        window_s=window_s,
        thresholds=thresholds,
        problems=problems,
        queues=read("queue depths", m.QueueStats, store.queues),
        workers=read("workers", m.WorkerStats, store.workers),
        tasks=read("task stats", m.TaskStats, store.tasks),
        batches=read("batch buffers", m.BatchStats, store.batches),
        alerts=read("alerts", m.Alert, store.alerts),
        alert_changes=read(
            "alert history", m.AlertChange, partial(store.alert_changes, CHANGES_LISTED)
        ),
        cache=read("cache", m.CacheStats, store.cache),
    )
    # A chart is a few hundred pixels wide: a sample spread over the window draws the same
    # lines as every snapshot, for a fraction of the reading and rendering.
    raw = {
        name: _safe(
            partial(
                store.sample_series,
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
    data.series = _safe(partial(series_of, raw), Series(), "history snapshots", problems)
    return data


# --- charts ---------------------------------------------------------------------------------


def _points(
    snapshots: Sequence[S], pick: Callable[[S], float | None]
) -> list[tuple[float, float | None]]:
    return [(snap.at, pick(snap)) for snap in snapshots]


def queue_depth_chart(data: OverviewData) -> TimeChart:
    snaps = data.series.queues
    lines = [
        Line(level, LEVEL_COLORS[level], _points(snaps, partial(QueuesSnapshot.depth, level=level)))
        for level in LEVEL_NAMES
    ]
    return time_chart(
        "Queue depth per level (messages)", lines, start=data.start, end=data.now, unit="msg"
    )


def queue_now_chart(data: OverviewData) -> BarChart:
    bars = []
    for q in data.queues:
        # Over AMQP only ready messages are visible: say so rather than show "0 reserved".
        reserved = f"{q.reserved} reserved" if q.reserved_known else "reserved unknown"
        oldest = (
            f", oldest {format_value(q.oldest_ready_age_s, 's')}"
            if q.oldest_ready_age_s is not None
            else ""
        )
        bars.append(
            Bar(
                q.queue,
                [
                    (float(q.ready), LEVEL_COLORS.get(q.queue, "#6b7280"), "ready"),
                    (float(q.reserved), "#9ca3af", "reserved"),
                ],
                note=f"{q.depth} ({reserved}{oldest})",
            )
        )
    return bar_chart(
        "Queue depth now: ready and reserved", bars, unit="msg", empty="queue depths unavailable"
    )


def throughput_chart(data: OverviewData) -> TimeChart:
    snaps = data.series.throughput
    lines = [
        Line("succeeded/s", "#16a34a", _points(snaps, lambda s: s.succeeded_per_s)),
        Line("failed/s", "#dc2626", _points(snaps, lambda s: s.failed_per_s)),
        Line("received/s", "#6b7280", _points(snaps, lambda s: s.received_per_s), dashed=True),
    ]
    return time_chart(
        "Throughput (tasks per second)", lines, start=data.start, end=data.now, unit="/s"
    )


def latency_chart(data: OverviewData, kind: Literal["runtime", "wait"]) -> TimeChart:
    snaps = data.series.latency
    picks: dict[str, Callable[[LatencySnapshot], float | None]] = (
        {
            "p50": lambda s: s.runtime_p50,
            "p95": lambda s: s.runtime_p95,
            "p99": lambda s: s.runtime_p99,
        }
        if kind == "runtime"
        else {"p50": lambda s: s.wait_p50, "p95": lambda s: s.wait_p95, "p99": lambda s: s.wait_p99}
    )
    colors = {"p50": "#2563eb", "p95": "#d97706", "p99": "#dc2626"}
    lines = [Line(f"{kind} {p}", colors[p], _points(snaps, pick)) for p, pick in picks.items()]
    title = "Run time percentiles" if kind == "runtime" else "Queue wait percentiles"
    return time_chart(title, lines, start=data.start, end=data.now, unit="s")


def batch_chart(data: OverviewData) -> BarChart:
    bars = []
    for b in data.batches:
        note = f"{b.buffered} buffered, {b.in_flight_items} in flight"
        if b.dead:
            note += f", {b.dead} dead"
        if b.oldest_age_s is not None and b.buffered:
            note += f", oldest {format_value(b.oldest_age_s, 's')}"
        bars.append(
            Bar(
                b.batch_name,
                [
                    (float(b.buffered), "#9333ea", "buffered"),
                    (float(b.in_flight_items), "#c4b5fd", "in flight"),
                ],
                note=note,
            )
        )
    return bar_chart("Batch buffers now (items)", bars, unit="items", empty="no batch buffers")


def batch_history_chart(data: OverviewData) -> TimeChart:
    snaps = data.series.batches
    names = list(dict.fromkeys(b.batch_name for snap in snaps for b in snap.batches))

    def buffered(snap: BatchesSnapshot, name: str) -> float | None:
        return float(sum(b.buffered for b in snap.batches if b.batch_name == name))

    lines = [
        Line(name, _PALETTE[i % len(_PALETTE)], _points(snaps, partial(buffered, name=name)))
        for i, name in enumerate(names[: len(_PALETTE)])
    ]
    return time_chart(
        "Buffered batch items over time",
        lines,
        start=data.start,
        end=data.now,
        unit="items",
        empty="no batch buffers yet",
    )


def worker_bars(data: OverviewData) -> BarChart:
    bars = []
    for w in data.workers:
        state = "alive" if w.alive else f"silent {format_value(w.age_s, 's')}"
        for what, color, value in (
            ("memory", "#0891b2", w.memory_pct),
            ("cpu", "#4f46e5", w.cpu_pct),
        ):
            note = f"{format_value(value, '%')} · {state}"
            if w.state:
                note += f" · {w.state}"
            if what == "memory" and w.paused_queues:
                note += " · paused " + ",".join(w.paused_queues)
            bars.append(
                Bar(
                    f"{w.hostname} {what}",
                    [(value or 0.0, color, what)],
                    note=note,
                    markers=data.thresholds.markers(what),
                )
            )
    return bar_chart(
        "Worker resources (percent of limit)",
        bars,
        unit="%",
        maximum=100.0,
        empty="no worker heartbeats",
    )


def cache_chart(data: OverviewData) -> BarChart:
    limit = data.thresholds.cache_hit_rate_pct
    bars = []
    for c in data.cache:
        rate = c.hit_rate_pct
        color = "#16a34a" if rate is None or rate >= limit else "#d97706"
        bars.append(
            Bar(
                c.namespace,
                [(rate or 0.0, color, "hit rate")],
                note=f"{format_value(rate, '%')} of {c.hits + c.misses} lookups",
                markers=[(limit, "#d97706")],
            )
        )
    return bar_chart(
        "Cache hit rate (percent)", bars, unit="%", maximum=100.0, empty="no cache lookups yet"
    )


def worker_history_chart(data: OverviewData, what: Reading = "memory") -> TimeChart:
    """One line per worker of its memory or CPU over time."""
    title = "Memory" if what == "memory" else "CPU"
    return worker_chart(
        f"{title} per worker (percent of limit)",
        data.series.workers,
        what,
        start=data.start,
        end=data.now,
        thresholds=data.thresholds.markers(what),
    )


def task_charts(data: OverviewData) -> list[TimeChart]:
    """Succeeded and failed per second, one line per task name (the busiest)."""
    snaps = data.series.tasks
    return [
        task_rate_chart(
            "Succeeded per task (per second)", snaps, "succeeded", start=data.start, end=data.now
        ),
        task_rate_chart(
            "Failed per task (per second)",
            snaps,
            "failed",
            start=data.start,
            end=data.now,
            empty="no task failed in this window",
        ),
    ]


# --- the board ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kpi:
    label: str
    value: str
    cls: str = ""


@dataclass(frozen=True)
class AlertChangeRow:
    """One line of the alert history: what changed, in words, and its colour."""

    at: float
    color: str
    what: str
    alertname: str
    summary: str


@dataclass(frozen=True)
class Board:
    """What ``templates/overview.html`` draws, every chart computed."""

    data: OverviewData
    coverage: str
    kpis: list[Kpi]
    firing: list[m.Alert]
    changes: list[AlertChangeRow]
    tasks: list[m.TaskStats]
    charts: dict[str, BarChart | TimeChart | list[TimeChart]]
    level_colors: dict[str, str]
    severity_colors: dict[str, str]


def kpis(data: OverviewData) -> list[Kpi]:
    latest = data.series.throughput[0] if data.series.throughput else None
    critical = sum(1 for a in data.alerts if a.severity == "critical")
    alive = sum(1 for w in data.workers if w.alive)
    return [
        Kpi("queued", str(sum(q.depth for q in data.queues))),
        Kpi("workers alive", f"{alive}/{len(data.workers)}"),
        Kpi("tasks/s", format_value((latest.per_s if latest else None) or 0.0)),
        Kpi("failed/s", format_value((latest.failed_per_s if latest else None) or 0.0)),
        Kpi(
            "alerts firing",
            str(len(data.alerts)),
            "bad" if critical else "warn" if data.alerts else "",
        ),
    ]


def alert_change_rows(data: OverviewData) -> list[AlertChangeRow]:
    """The latest alert state changes: when each alert fired and resolved."""
    rows = []
    for c in data.alert_changes[:CHANGES_LISTED]:
        severity = c.severity or ""
        resolved = c.state == "resolved"
        color = "#16a34a" if resolved else _SEVERITY_COLORS.get(severity, "#6b7280")
        what = "resolved" if resolved else f"{severity} firing"
        if resolved and c.since is not None:
            what += f" after {duration(max(0.0, c.at - c.since))}"
        rows.append(AlertChangeRow(c.at, color, what, c.alertname, c.summary))
    return rows


def coverage_note(data: OverviewData) -> str:
    """Says so when a series hit the point limit before reaching the window's start."""
    starts = [snaps[-1].at for snaps in data.series.all() if len(snaps) >= MAX_POINTS]
    if not starts or max(starts) <= data.start:
        return ""
    return f" · charts show the newest {MAX_POINTS} snapshots (since {clock(max(starts))} UTC)"


def board(data: OverviewData) -> Board:
    """Every part of the overview's board, from :func:`gather`'s data."""
    busiest = sorted(data.tasks, key=lambda t: -(t.succeeded + t.failed))[:TASKS_LISTED]
    return Board(
        data=data,
        coverage=coverage_note(data),
        kpis=kpis(data),
        firing=[a for a in data.alerts if a.state == "firing"],
        changes=alert_change_rows(data),
        tasks=busiest,
        charts={
            "queue_depth": queue_depth_chart(data),
            "queue_now": queue_now_chart(data),
            "throughput": throughput_chart(data),
            "runtime": latency_chart(data, "runtime"),
            "wait": latency_chart(data, "wait"),
            "batch_now": batch_chart(data),
            "batch_history": batch_history_chart(data),
            "worker_bars": worker_bars(data),
            "memory": worker_history_chart(data, "memory"),
            "cpu": worker_history_chart(data, "cpu"),
            "tasks": task_charts(data),
            "cache": cache_chart(data),
        },
        level_colors=LEVEL_COLORS,
        severity_colors=_SEVERITY_COLORS,
    )


def render_board(data: OverviewData) -> str:
    """The refreshable part of the page: KPIs, charts, alerts, task table."""
    return render("overview.html", shell=Shell("dashboard", fragment=True), board=board(data))


def render_page(
    data: OverviewData,
    refresh_s: int,
    request: Request | None = None,
    settings: Settings | None = None,
) -> str:
    """The whole overview page (HTML) for :func:`gather`'s data."""
    window = Window(
        data.window_s,
        data.now,
        data.covered_since,
        dict(request.query_params) if request is not None else {},
    )
    page = shell(
        "dashboard",
        request=request,
        active="/dashboard",
        settings=settings,
        refresh_s=refresh_s,
        window=window,
    )
    return render("overview.html", shell=page, board=board(data))


# --- route ------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(
    request: Request,
    window: Annotated[int, Query(ge=60, le=30 * 86_400, description="Seconds of history.")] = 3600,
    refresh: Annotated[int, Query(ge=0, le=3600, description="Seconds; 0: off.")] = 5,
    fragment: Annotated[bool, Query(description="Only the board, for the refresh.")] = False,
) -> Response:
    """The overview page, reused for half the stats interval (one build per period however many
    browsers refresh)."""
    state = api_state(request)
    settings = state.runtime.settings

    def compute() -> str:
        data = gather(state.store, Thresholds.of(settings), float(window))
        if fragment:
            body = render_board(data)
        else:
            data.covered_since = covered_since(state.store)
            body = render_page(data, refresh, request, settings)
        if len(data.problems) > len(CHART_SERIES):
            raise StoreDown(body)
        return body

    try:
        return await respond_page(request, ("dashboard", window, refresh, fragment), compute)
    except StoreDown as down:
        return page_response(request, Body(str(down).encode()), 503)


class StoreDown(Exception):
    """Every reading failed: the page (carrying the problems) is answered with 503, uncached."""
