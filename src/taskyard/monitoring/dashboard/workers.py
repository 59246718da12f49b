"""``/dashboard/workers``: which worker or host is short of memory or CPU, and every worker now.

:func:`gather_workers` reads the store into a :class:`WorkersView`; :func:`render_workers` is the
pure seam tests render on sample data (``templates/workers.html``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.dashboard.charts import TimeChart
from taskyard.monitoring.dashboard.layout import (
    FragmentQuery,
    RefreshQuery,
    Shell,
    Window,
    WindowQuery,
    flower_base,
    windowed,
)
from taskyard.monitoring.dashboard.rows import Thresholds, WorkersSnapshot, snapshots, typed
from taskyard.monitoring.dashboard.series_charts import CHART_POINTS, Reading, worker_chart
from taskyard.monitoring.dashboard.templating import render

router = APIRouter()

#: The page's charts: heading, title, reading, per host (else per worker).
CHARTS: tuple[tuple[str, str, Reading, bool], ...] = (
    ("Memory per worker", "Memory per worker (percent of limit)", "memory", False),
    ("CPU per worker", "CPU per worker (percent)", "cpu", False),
    ("Memory per host", "Memory per host (highest of its workers, percent)", "memory", True),
    ("CPU per host", "CPU per host (highest of its workers, percent)", "cpu", True),
)


@dataclass(frozen=True)
class WorkersView:
    """The workers page: every worker now, and (heading, chart) per memory/CPU chart."""

    flower: str
    workers: list[m.WorkerStats]
    charts: list[tuple[str, TimeChart]]


def gather_workers(state: ApiState, window: Window) -> WorkersView:
    thresholds = Thresholds.of(state.runtime.settings)
    start = window.now - window.seconds
    snaps = snapshots(
        WorkersSnapshot, state.store.sample_series("workers", start, window.now, CHART_POINTS)
    )
    charts = [
        (
            heading,
            worker_chart(
                title,
                snaps,
                what,
                start=start,
                end=window.now,
                by_host=by_host,
                thresholds=[] if by_host else thresholds.markers(what),
            ),
        )
        for heading, title, what, by_host in CHARTS
    ]
    workers = typed(m.WorkerStats, state.store.workers())
    return WorkersView(flower_base(state.runtime.settings), workers, charts)


def render_workers(view: WorkersView, shell: Shell) -> str:
    """The workers page (or its board) for ``view``."""
    return render("workers.html", shell=shell, view=view)


@router.get("/dashboard/workers", response_class=HTMLResponse, include_in_schema=False)
async def workers_page(
    request: Request,
    window: WindowQuery = 3600,
    refresh: RefreshQuery = 5,
    fragment: FragmentQuery = False,
) -> Response:
    """Per-worker and per-host memory and CPU over time, and every worker now."""
    return await windowed(
        request,
        ("page:workers",),
        "workers",
        "/dashboard/workers",
        lambda state, span, shell: render_workers(gather_workers(state, span), shell),
        window,
        refresh,
        fragment,
    )
