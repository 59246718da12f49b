"""``/dashboard/flow``: limits, pauses and held messages, and an operator's levers on them.

What ``taskyard limits show`` and ``taskyard paused`` print, on a page: each limited task
(configured, running now, started in the last minute, waiting), what is paused by which keys
since when, and the messages held back with their reason. An operator pauses and resumes a
queue or task glob for a key and changes a task's rate or concurrency from here (CSRF-checked
forms, each change in the audit trail), as through ``/api/v1/admin/flow``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.errors import TaskyardError
from taskyard.flow import FlowStore, store_for
from taskyard.monitoring.api.query import Body
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.api.users import Action
from taskyard.monitoring.dashboard.layout import (
    Shell,
    api_state,
    done_redirect,
    notice,
    page_response,
    session_principal,
    shell,
)
from taskyard.monitoring.dashboard.templating import render

logger = logging.getLogger(__name__)

router = APIRouter()


@dataclass(frozen=True)
class FlowView:
    limits: list[dict[str, Any]]
    paused: list[dict[str, Any]]
    held: list[dict[str, Any]]


@dataclass(frozen=True)
class FlowControls:
    """The asking user's CSRF token when they may change flow control from the page."""

    csrf: str = ""

    @classmethod
    def of(cls, request: Request | None) -> FlowControls:
        principal = session_principal(request)
        if principal is None or principal.csrf is None:
            return cls()
        return cls(principal.csrf if principal.may(Action.PAUSE) else "")


def _store(state: ApiState) -> FlowStore:
    return store_for(state.runtime, state.celery_app)


def gather_flow(store: FlowStore) -> FlowView:
    return FlowView(store.status(), store.pauses(), store.held())


def render_flow(view: FlowView, shell: Shell, controls: FlowControls, done: str = "") -> str:
    return render("flow.html", shell=shell, view=view, controls=controls, done=done)


@router.get("/dashboard/flow", response_class=HTMLResponse, include_in_schema=False)
def flow_page(request: Request, done: str = "") -> Response:
    state = api_state(request)
    settings = state.runtime.settings
    page = shell("flow control", request=request, active="/dashboard/flow", settings=settings)
    try:
        view = gather_flow(_store(state))
    except Exception as exc:
        logger.warning("flow page: flow state unreadable", exc_info=True)
        body = render("unavailable.html", shell=page, what="flow control", error=str(exc))
        return page_response(request, Body(body.encode()), 503)
    html = render_flow(view, page, FlowControls.of(request), notice(request, done))
    return page_response(request, Body(html.encode()))


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value.strip()[:200] or None if isinstance(value, str) else None


@router.post("/dashboard/flow/action", include_in_schema=False)
async def flow_action(request: Request) -> Response:
    """Pause, resume, or set a task's limits; audited; back to the page with what was done."""
    state = api_state(request)
    form = await request.form()
    op = form.get("op")
    action = Action.LIMITS if op == "limits" else Action.PAUSE
    principal = await state.auth.check(request, action)
    store = _store(state)
    queue, task, key = _field(form, "queue"), _field(form, "task"), _field(form, "key")
    try:
        if op == "pause":
            store.pause(queue=queue, task=task, key=key or "dashboard")
            message = f"paused {queue or task} for key {key or 'dashboard'}"
        elif op == "resume":
            left = store.resume(
                queue=queue, task=task, key=key or "dashboard", all_keys=form.get("all") == "1"
            )
            message = f"resumed {queue or task}" + (
                f"; still paused by {', '.join(left)}" if left else ""
            )
        elif op == "limits" and task:
            rate, concurrency = _field(form, "rate"), _field(form, "concurrency")
            store.set_limits(
                task,
                rate=rate,
                concurrency=int(concurrency) if concurrency is not None else None,
            )
            message = (
                f"limits of {task}: rate {rate or 'kept'}, concurrency {concurrency or 'kept'}"
            )
        else:
            raise HTTPException(422, f"op={op!r}: expected pause, resume or limits (with a task)")
    except (TaskyardError, ValueError) as exc:
        raise HTTPException(422, str(exc)) from None
    state.cache.clear()
    state.auth.record(
        principal,
        f"flow.{op}",
        target=str(queue or task or ""),
        via="dashboard",
        detail={"key": key, "rate": form.get("rate"), "concurrency": form.get("concurrency")},
    )
    return done_redirect(request, principal, "/dashboard/flow", message)
