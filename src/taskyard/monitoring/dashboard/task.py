"""``/dashboard/task/{id}``: what happened to one task (its timeline, arguments, traceback).

:func:`gather_task` reads the task lookup and the dead letters into a :class:`TaskView`;
:func:`render_task` is the pure seam tests render on sample data (``templates/task.html``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.deadletters import DeadLetter
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.dashboard.charts import clock
from taskyard.monitoring.dashboard.layout import (
    FragmentQuery,
    RefreshQuery,
    Shell,
    api_state,
    flower_base,
    respond_page,
    shell,
)
from taskyard.monitoring.dashboard.templating import render
from taskyard.monitoring.timeline import with_job_state as job_state

logger = logging.getLogger(__name__)

router = APIRouter()

#: Characters of the arguments shown (they are capped when recorded, too).
ARGS_SHOWN = 2000


@dataclass(frozen=True)
class TaskView:
    """One task: its timeline (None when unknown or unreadable: ``problem`` says which), its dead
    letter if it died, and where its result is."""

    task_id: str
    flower: str
    timeline: m.TaskTimeline | None
    dead: DeadLetter | None
    problem: str = ""
    result_note: str = ""

    @property
    def name(self) -> str:
        known = self.timeline.name if self.timeline is not None else None
        return known or (self.dead.name if self.dead is not None else "")

    @property
    def queue(self) -> str:
        known = self.timeline.queue if self.timeline is not None else None
        return known or (self.dead.queue if self.dead is not None else "") or "-"

    @property
    def state(self) -> str:
        known = self.timeline.state if self.timeline is not None else None
        return known or (self.dead.state if self.dead is not None else "-")

    @property
    def args(self) -> str:
        return pretty(self.dead.args) if self.dead is not None else ""

    @property
    def kwargs(self) -> str:
        return pretty(self.dead.kwargs) if self.dead is not None else ""


def pretty(raw: str) -> str:
    """Recorded JSON arguments on one line, non-ASCII kept, capped."""
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)[:ARGS_SHOWN]
    except (ValueError, TypeError):
        return str(raw)[:ARGS_SHOWN]


def gather_task(state: ApiState, task_id: str, show_arguments: bool = True) -> TaskView:
    settings = state.runtime.settings
    timeline: m.TaskTimeline | None = None
    problem = ""
    try:
        found = state.store.timeline(task_id)
        # Its cancel record and last progress report (job control), when it has them.
        found = job_state(state.runtime, task_id, found)
        timeline = m.TaskTimeline.model_validate(found) if found is not None else None
    except Exception as exc:
        logger.warning("dashboard: task lookup of %s failed", task_id, exc_info=True)
        problem = f"task lookup unavailable: {type(exc).__name__}: {exc}"
    try:
        dead = state.dead_letters().get(task_id)
        if dead is not None:
            dead = dead.redacted(settings.redact_pattern, show_arguments=show_arguments)
    except Exception:
        logger.warning("dashboard: dead letter %s unreadable", task_id, exc_info=True)
        dead = None
    result = (
        "not stored: no result backend is configured"
        if not settings.result_backend
        else "in the result backend"
    )
    return TaskView(task_id, flower_base(settings), timeline, dead, problem, result)


def render_task(view: TaskView, shell: Shell) -> str:
    """The task's page (or its board) for ``view``."""
    return render("task.html", shell=shell, view=view)


@router.get("/dashboard/task/{task_id}", response_class=HTMLResponse, include_in_schema=False)
async def task_page(
    request: Request,
    task_id: Annotated[str, Path(max_length=200)],
    refresh: RefreshQuery = 0,
    fragment: FragmentQuery = False,
) -> Response:
    """One task: its timeline, arguments, and traceback when it died."""
    state = api_state(request)

    def compute() -> str:
        page = shell(
            f"task {task_id}",
            request=request,
            active="",
            settings=state.runtime.settings,
            refresh_s=refresh,
            note=f"at {clock(time.time())} UTC",
            fragment=fragment,
        )
        return render_task(
            gather_task(state, task_id, state.auth.may_view_arguments(request)), page
        )

    return await respond_page(request, ("page:task", task_id, refresh, fragment), compute)
