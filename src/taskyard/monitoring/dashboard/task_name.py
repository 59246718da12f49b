"""``/dashboard/tasks/{name}``: what one task name does over time and why it fails.

:func:`gather_task_name` reads the store and the dead letters into a :class:`TaskNameView`;
:func:`render_task_name` is the pure seam tests render on sample data
(``templates/task_name.html``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.deadletters import DeadLetter
from taskyard.deadletters import Query as DeadQuery
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.dashboard.charts import Line, TimeChart, time_chart
from taskyard.monitoring.dashboard.layout import (
    FragmentQuery,
    RefreshQuery,
    Shell,
    Window,
    WindowQuery,
    flower_base,
    windowed,
)
from taskyard.monitoring.dashboard.rows import (
    TasksSnapshot,
    ThroughputSnapshot,
    snapshots,
    typed,
)
from taskyard.monitoring.dashboard.series_charts import SAMPLED_POINTS, task_rate_chart
from taskyard.monitoring.dashboard.templating import render

logger = logging.getLogger(__name__)

router = APIRouter()

#: Dead letters listed on a task name's page.
FAILURES_LISTED = 20


@dataclass(frozen=True)
class TaskNameView:
    """One task name: its charts, counters per queue, and its newest dead letters (or why
    they could not be read)."""

    name: str
    flower: str
    charts: list[TimeChart]
    runtime: TimeChart
    counters: list[m.TaskStats]
    failures: list[DeadLetter]
    failures_problem: str = ""


def dead_letters(state: ApiState, name: str) -> tuple[list[DeadLetter], str]:
    """Dead letters of task ``name``, newest first, or why there are none."""
    try:
        found = state.dead_letters().search(DeadQuery(state=None, name=name), limit=FAILURES_LISTED)
        return list(found), ""
    except Exception as exc:
        logger.warning("dashboard: reading dead letters failed", exc_info=True)
        return [], f"dead letters unavailable: {type(exc).__name__}: {exc}"


def runtime_lines(snaps: Sequence[ThroughputSnapshot], name: str) -> list[Line]:
    """Run time p50/p95/p99 of ``name``'s runs in each collection window (the highest over its
    queues); a window without a run of it has no point."""
    lines = []
    for key, color in (
        ("runtime_p50", "#2563eb"),
        ("runtime_p95", "#d97706"),
        ("runtime_p99", "#dc2626"),
    ):
        points: list[tuple[float, float | None]] = []
        for snap in snaps:
            values = [
                value
                for row in snap.tasks
                if row.name == name and (value := getattr(row, key)) is not None
            ]
            points.append((snap.at, max(values) if values else None))
        lines.append(Line(key.replace("runtime_", "run "), color, points))
    return lines


def gather_task_name(state: ApiState, name: str, window: Window) -> TaskNameView:
    start = window.now - window.seconds
    snaps = snapshots(
        TasksSnapshot, state.store.sample_series("tasks", start, window.now, SAMPLED_POINTS)
    )
    failures, problem = dead_letters(state, name)
    return TaskNameView(
        name=name,
        flower=flower_base(state.runtime.settings),
        charts=[
            task_rate_chart(
                f"{name}: succeeded per second",
                snaps,
                "succeeded",
                start=start,
                end=window.now,
                names=[name],
            ),
            task_rate_chart(
                f"{name}: failed per second",
                snaps,
                "failed",
                start=start,
                end=window.now,
                names=[name],
                empty="it did not fail in this window",
            ),
        ],
        runtime=time_chart(
            f"{name}: run time percentiles per collection window",
            runtime_lines(
                snapshots(
                    ThroughputSnapshot,
                    state.store.sample_series("throughput", start, window.now, SAMPLED_POINTS),
                ),
                name,
            ),
            start=start,
            end=window.now,
            unit="s",
        ),
        counters=[r for r in typed(m.TaskStats, state.store.tasks()) if r.name == name],
        failures=failures,
        failures_problem=problem,
    )


def render_task_name(view: TaskNameView, shell: Shell) -> str:
    """The task name's page (or its board) for ``view``."""
    return render("task_name.html", shell=shell, view=view)


@router.get("/dashboard/tasks/{name}", response_class=HTMLResponse, include_in_schema=False)
async def task_name_page(
    request: Request,
    name: Annotated[str, Path(max_length=300)],
    window: WindowQuery = 3600,
    refresh: RefreshQuery = 5,
    fragment: FragmentQuery = False,
) -> Response:
    """One task name: its throughput, failures and run time over time, its dead letters."""
    return await windowed(
        request,
        ("page:task-name", name),
        name,
        "/dashboard/tasks",
        lambda state, span, shell: render_task_name(gather_task_name(state, name, span), shell),
        window,
        refresh,
        fragment,
    )
