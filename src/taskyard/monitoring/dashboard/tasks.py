"""``/dashboard/tasks``: which tasks run and fail, and how often, per task name; a search by task
id, a filter of the task-name table, and cancelling waiting tasks by filter.

:func:`gather_tasks` reads the store into a :class:`TasksView`; :func:`render_tasks` is the pure
seam tests render on sample data (``templates/tasks.html``). Cancelling by filter is the
dead-letter page's pattern: an operator or admin, the session's CSRF token, a first submit that
shows how many waiting tasks match (the API's dry run), a confirmed one that cancels them, and
an audit entry with the count. A filter must narrow: an empty one (every task) is refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from taskyard.broker.control.service import JobControl, control_of
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.jobs import cancel_selection
from taskyard.monitoring.api.query import Body
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.api.users import Action
from taskyard.monitoring.dashboard.charts import TimeChart
from taskyard.monitoring.dashboard.layout import (
    FragmentQuery,
    RefreshQuery,
    Shell,
    Window,
    WindowQuery,
    api_state,
    done_redirect,
    forget_pages,
    notice,
    page_response,
    shell,
    windowed,
)
from taskyard.monitoring.dashboard.rows import TasksSnapshot, snapshots, typed
from taskyard.monitoring.dashboard.series_charts import SAMPLED_POINTS, task_rate_chart
from taskyard.monitoring.dashboard.task import CancelControls
from taskyard.monitoring.dashboard.templating import render

router = APIRouter()

#: What the search takes as a task id: Celery's UUIDs and custom ids of letters, digits and
#: ``_ . : @ + = -`` (no "/", which no page path can hold; no space, no markup).
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}")
#: Characters of a filter field kept (the API's own limit), and of a refused search shown.
FIELD_CHARS = 300
SEARCH_SHOWN = 80
#: Matching tasks the confirm page lists (it counts them all).
FOUND_SHOWN = 20


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


def _field(values: Any, key: str) -> str:
    value = values.get(key)
    return value.strip()[:FIELD_CHARS] if isinstance(value, str) else ""


@dataclass(frozen=True)
class TasksFilter:
    """The task-name table's filter: a part of the name (any case) and a queue (exact)."""

    name: str = ""
    queue: str = ""

    @classmethod
    def of(cls, values: Any) -> TasksFilter:
        return cls(_field(values, "name"), _field(values, "queue"))

    @property
    def any(self) -> bool:
        return bool(self.name or self.queue)

    def keeps(self, row: m.TaskStats) -> bool:
        return self.name.lower() in row.name.lower() and (not self.queue or row.queue == self.queue)


@dataclass(frozen=True)
class CancelFilter:
    """Which waiting tasks a bulk cancel takes: a task name glob, a queue, sent more than
    ``older_than`` seconds ago; each given one must match, and one at least must narrow."""

    name: str = ""
    queue: str = ""
    #: As typed (the confirm form sends it back); :attr:`older_than_s` is its value.
    older_than: str = ""

    @classmethod
    def of(cls, values: Any) -> CancelFilter:
        return cls(_field(values, "name"), _field(values, "queue"), _field(values, "older_than_s"))

    @property
    def older_than_s(self) -> float | None:
        if not self.older_than:
            return None
        try:
            value = float(self.older_than)
        except ValueError:
            return math.nan
        return value if math.isfinite(value) else math.nan

    @property
    def problem(self) -> str:
        """Why this filter is refused ("" when it is not)."""
        older = self.older_than_s
        if older is not None and not older >= 0:
            return "older than: expected seconds (a number, 0 or more)"
        if not (self.name.strip("*") or self.queue or (older or 0) > 0):
            return (
                "Refused: this filter matches every waiting task. Give a task name glob "
                "(other than *), a queue, or an age in seconds."
            )
        return ""

    def request(self, dry_run: bool) -> m.CancelRequest:
        return m.CancelRequest(
            name=self.name or None,
            queue=self.queue or None,
            older_than_s=self.older_than_s,
            dry_run=dry_run,
        )

    def describe(self) -> str:
        pairs = (("name", self.name), ("queue", self.queue), ("older_than_s", self.older_than))
        return " ".join(f"{k}={v}" for k, v in pairs if v)


@dataclass(frozen=True)
class TasksView:
    names: list[TaskName]
    succeeded: TimeChart
    failed: TimeChart
    where: TasksFilter = field(default_factory=TasksFilter)
    controls: CancelControls = field(default_factory=CancelControls)
    #: The outcome of the last action, and a refused search.
    done: str = ""
    problem: str = ""


def gather_tasks(
    state: ApiState,
    window: Window,
    where: TasksFilter | None = None,
    controls: CancelControls | None = None,
    done: str = "",
    problem: str = "",
) -> TasksView:
    start = window.now - window.seconds
    snaps = snapshots(
        TasksSnapshot, state.store.sample_series("tasks", start, window.now, SAMPLED_POINTS)
    )
    where = where or TasksFilter()
    rows = [row for row in typed(m.TaskStats, state.store.tasks()) if where.keeps(row)]
    return TasksView(
        names=per_name(rows),
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
        where=where,
        controls=controls or CancelControls(),
        done=done,
        problem=problem,
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
    task: str = "",
    done: str = "",
) -> Response:
    """Throughput and failures per task name over time, and every task name's counters; a
    task id searched for goes to its page."""
    found = task.strip()
    if found and TASK_ID.fullmatch(found):
        return RedirectResponse(f"/dashboard/task/{quote(found, safe='')}", 303)
    problem = (
        f"Not a task id: {found[:SEARCH_SHOWN]!r}{'...' if len(found) > SEARCH_SHOWN else ''} "
        "(ids are letters, digits and _ . : @ + = -, at most 200)"
        if found
        else ""
    )
    where = TasksFilter.of(request.query_params)
    controls = CancelControls.of(request)
    # A Redis read: off the event loop, as the page build is.
    done = await anyio.to_thread.run_sync(notice, request, done) if done else ""
    return await windowed(
        request,
        # The forms' token is the session's: two sessions of one user share no page.
        ("page:tasks", where, done, controls.csrf),
        "tasks",
        "/dashboard/tasks",
        lambda state, span, shell: render_tasks(
            gather_tasks(state, span, where, controls, done, problem), shell
        ),
        window,
        refresh,
        fragment,
        status_code=400 if problem else 200,
    )


@router.post("/dashboard/tasks/cancel", include_in_schema=False)
async def tasks_cancel(request: Request) -> Response:
    """Cancel the waiting tasks a filter matches: the first submit shows how many (a dry run)
    and asks to confirm; the confirmed one cancels them and is audited."""
    state = api_state(request)
    principal = await state.auth.check(request, Action.CANCEL)
    form = await request.form()
    where = CancelFilter.of(form)
    page = shell(
        "cancel tasks", request=request, active="/dashboard/tasks", settings=state.runtime.settings
    )

    def confirm_page(status_code: int = 200, **context: Any) -> Response:
        context = {"count": 0, "found": [], "problem": "", **context}
        html = render(
            "tasks_confirm.html", shell=page, where=where, csrf=principal.csrf or "", **context
        )
        return page_response(request, Body(html.encode()), status_code)

    if where.problem:
        return confirm_page(400, problem=where.problem)
    control = control_of(state.celery(), state.runtime)
    by = f"dashboard:{principal.name}"
    if form.get("confirm") != "yes":
        detail = _select(control, where, by, dry_run=True)
        return confirm_page(count=detail["selected"], found=detail["found"][:FOUND_SHOWN])
    detail = _select(control, where, by, dry_run=False)
    cancelled, selected = detail["cancelled"], detail["selected"]
    state.auth.record(
        principal,
        "tasks.cancel",
        target=where.describe(),
        count=cancelled,
        via="dashboard",
        detail={"selected": selected},
    )
    forget_pages(state)
    message = (
        f"cancelled {cancelled} of {selected} waiting task(s) matching {where.describe()}"
        f" ({selected - cancelled} already cancelled)"
    )
    return done_redirect(request, principal, "/dashboard/tasks", message)


def _select(control: JobControl, where: CancelFilter, by: str, dry_run: bool) -> dict[str, Any]:
    """:func:`cancel_selection` of ``where``; a filter matching nothing selects none."""
    try:
        return cancel_selection(control, where.request(dry_run), by=by)
    except HTTPException as exc:
        if exc.status_code != 400:
            raise
        return {"selected": 0, "cancelled": 0, "dry_run": dry_run, "found": []}
