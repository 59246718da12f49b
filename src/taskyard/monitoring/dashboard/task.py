"""``/dashboard/task/{id}``: what happened to one task (its timeline, arguments, traceback), and
its cancel form.

:func:`gather_task` reads the task lookup and the dead letters into a :class:`TaskView`;
:func:`render_task` is the pure seam tests render on sample data (``templates/task.html``).
Cancelling is the dead-letter page's pattern: a logged-in operator or admin, the session's CSRF
token in the form, an audit entry; the cancel record then shows on the page.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from taskyard.broker.control.service import control_of
from taskyard.deadletters import DeadLetter
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.api.users import Action
from taskyard.monitoring.dashboard.charts import clock
from taskyard.monitoring.dashboard.layout import (
    FragmentQuery,
    RefreshQuery,
    Shell,
    api_state,
    flower_base,
    forget_pages,
    respond_page,
    session_principal,
    shell,
)
from taskyard.monitoring.dashboard.templating import render
from taskyard.monitoring.timeline import with_job_state as job_state

logger = logging.getLogger(__name__)

router = APIRouter()

#: Characters of the arguments shown (they are capped when recorded, too).
ARGS_SHOWN = 2000
#: States of a task that is done: nothing left to cancel (timeline.summarize's last steps).
FINISHED = ("succeeded", "failed", "revoked", "dead", "cancelled")
#: Longest grace before a terminate the form accepts (s); the API and CLI take any.
MAX_GRACE_S = 86_400.0


@dataclass(frozen=True)
class CancelControls:
    """Whether the asking user may cancel from the page, and the token their forms carry."""

    csrf: str = ""
    can_cancel: bool = False
    #: Why nothing can be cancelled from here, when nothing can.
    why_not: str = ""

    @classmethod
    def of(cls, request: Request | None) -> CancelControls:
        principal = session_principal(request)
        if principal is None or principal.csrf is None:
            return cls(
                why_not="To cancel from this page, log in as an operator or admin "
                "(taskyard users add NAME --role operator); or use taskyard cancel."
            )
        return cls(principal.csrf, principal.may(Action.CANCEL))


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
    controls: CancelControls = field(default_factory=CancelControls)

    @property
    def finished(self) -> bool:
        """Whether the task is done (unknown tasks are not: they may wait in a queue)."""
        if self.dead is not None:
            return True
        return self.timeline is not None and self.timeline.state in FINISHED

    @property
    def cancellable(self) -> bool:
        """Whether the page offers the cancel form (a cooperative cancel not yet seen by a
        worker may still be upgraded to terminate)."""
        return self.controls.can_cancel and not self.finished

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


def gather_task(
    state: ApiState,
    task_id: str,
    show_arguments: bool = True,
    controls: CancelControls | None = None,
) -> TaskView:
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
    controls = controls or CancelControls()
    return TaskView(task_id, flower_base(settings), timeline, dead, problem, result, controls)


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
    controls = CancelControls.of(request)

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
            gather_task(state, task_id, state.auth.may_view_arguments(request), controls), page
        )

    # The form's token is the session's: two sessions of one user share no page.
    key = ("page:task", task_id, refresh, fragment, controls.csrf)
    return await respond_page(request, key, compute)


@router.post("/dashboard/task/{task_id}/cancel", include_in_schema=False)
async def task_cancel(
    request: Request, task_id: Annotated[str, Path(min_length=1, max_length=200)]
) -> Response:
    """Cancel one task wherever it is (queued, delayed, reserved, running), audited; back to
    its page, which shows the cancel record."""
    state = api_state(request)
    principal = await state.auth.check(request, Action.CANCEL)
    form = await request.form()
    terminate = form.get("terminate") == "yes"
    grace_s = _grace(form.get("grace_s"))
    added = control_of(state.celery(), state.runtime).cancel(
        [task_id], by=f"dashboard:{principal.name}", terminate=terminate, grace_s=grace_s
    )
    state.auth.record(
        principal,
        "tasks.cancel",
        target=task_id,
        count=1,
        via="dashboard",
        detail={"terminate": terminate, "grace_s": grace_s, "new": added},
    )
    forget_pages(state)
    return RedirectResponse(f"/dashboard/task/{quote(task_id, safe='')}", 303)


def _grace(raw: object) -> float | None:
    """The form's grace seconds: blank for the configured default, else 0 to a day."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        value = float(raw.strip()[:30])
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_GRACE_S:
        detail = f"grace_s={raw[:30]!r}: expected seconds from 0 to {MAX_GRACE_S:g}"
        raise HTTPException(422, detail)
    return value
