"""``/dashboard/tasks``: which tasks run and fail, and how often, per task name.

:func:`gather_tasks` reads the store into a :class:`TasksView`; :func:`render_tasks` is the pure
seam tests render on sample data (``templates/tasks.html``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    windowed,
)
from taskyard.monitoring.dashboard.rows import TasksSnapshot, snapshots, typed
from taskyard.monitoring.dashboard.series_charts import SAMPLED_POINTS, task_rate_chart
from taskyard.monitoring.dashboard.templating import render

router = APIRouter()


@dataclass
class TaskName:
    """One task name's counters summed over its queues, and its highest run p95."""

    name: str
    queues: list[str] = field(default_factory=list)
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    runtime_p95: float | None = None


def per_name(rows: list[m.TaskStats]) -> list[TaskName]:
    """Task names, busiest first, from the per (name, queue) rows."""
    out: dict[str, TaskName] = {}
    for row in rows:
        entry = out.setdefault(row.name, TaskName(row.name))
        entry.queues.append(row.queue)
        entry.received += row.received
        entry.succeeded += row.succeeded
        entry.failed += row.failed
        entry.retried += row.retried
        entry.deferred += row.deferred
        p95 = row.runtime_p95
        if p95 is not None and (entry.runtime_p95 is None or p95 > entry.runtime_p95):
            entry.runtime_p95 = p95
    return sorted(out.values(), key=lambda e: -(e.succeeded + e.failed))


@dataclass(frozen=True)
class TasksView:
    names: list[TaskName]
    succeeded: TimeChart
    failed: TimeChart


def gather_tasks(state: ApiState, window: Window) -> TasksView:
    start = window.now - window.seconds
    snaps = snapshots(
        TasksSnapshot, state.store.sample_series("tasks", start, window.now, SAMPLED_POINTS)
    )
    return TasksView(
        names=per_name(typed(m.TaskStats, state.store.tasks())),
        succeeded=task_rate_chart(
            "Succeeded per task (per second)", snaps, "succeeded", start=start, end=window.now
        ),
        failed=task_rate_chart(
            "Failed per task (per second)",
            snaps,
            "failed",
            start=start,
            end=window.now,
            empty="no task failed in this window",
        ),
    )


def render_tasks(view: TasksView, shell: Shell) -> str:
    """The task names page (or its board) for ``view``."""
    return render("tasks.html", shell=shell, view=view)


@router.get("/dashboard/tasks", response_class=HTMLResponse, include_in_schema=False)
async def tasks_page(
    request: Request,
    window: WindowQuery = 3600,
    refresh: RefreshQuery = 5,
    fragment: FragmentQuery = False,
) -> Response:
    """Throughput and failures per task name over time, and every task name's counters."""
    return await windowed(
        request,
        ("page:tasks",),
        "tasks",
        "/dashboard/tasks",
        lambda state, span, shell: render_tasks(gather_tasks(state, span), shell),
        window,
        refresh,
        fragment,
    )
