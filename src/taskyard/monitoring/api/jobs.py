"""Job control over HTTP: cancel one task or many (admin token), and the job counters.

``POST /api/v1/tasks/{id}/cancel`` and ``POST /api/v1/tasks/cancel`` (ids or a filter) write
the durable cancel records of :mod:`taskyard.broker.control`; the console calls the same
functions. ``taskyard_job_events_total`` counts deduplicated, throttled, debounced and
cancelled calls per task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from taskyard.broker.control import jobs
from taskyard.broker.control.service import JobControl, control_of
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.access import principal_of
from taskyard.monitoring.api.state import API_PREFIX, ApiState
from taskyard.monitoring.api.users import Action

log = logging.getLogger(__name__)


def _control(state: ApiState) -> JobControl:
    return control_of(state.celery(), state.runtime)


def cancel_selection(control: JobControl, request: m.CancelRequest, by: str) -> dict[str, Any]:
    """Cancel what ``request`` selects; what was found and how many records are new."""
    ids = list(request.ids)
    found: list[jobs.Found] = []
    if request.name is not None or request.queue is not None or request.older_than_s is not None:
        found = control.find(request.name or "*", request.queue, request.older_than_s)
        ids += [f.task_id for f in found]
    if not ids:
        raise HTTPException(400, "nothing selected: give ids, or name/queue/older_than_s")
    cancelled = 0
    if not request.dry_run:
        cancelled = control.cancel(ids, by=by, terminate=request.terminate, grace_s=request.grace_s)
    return {
        "selected": len(dict.fromkeys(ids)),
        "cancelled": cancelled,
        "dry_run": request.dry_run,
        "found": [
            {"task_id": f.task_id, "name": f.name, "queue": f.queue, "where": f.where}
            for f in found[:1000]
        ],
    }


def _target(request: m.CancelRequest) -> str:
    if request.ids:
        return " ".join(request.ids[:20]) + (" ..." if len(request.ids) > 20 else "")
    return f"name={request.name} queue={request.queue} older_than_s={request.older_than_s}"


def jobs_router(state: ApiState) -> APIRouter:
    router = APIRouter(tags=["jobs"])
    admin = [Depends(state.auth.require(Action.CANCEL))]

    @router.post("/tasks/cancel", dependencies=admin, response_model=m.AdminResult)
    def cancel_many(http: Request, request: Annotated[m.CancelRequest, Body()]) -> m.AdminResult:
        """Cancel tasks by id or by filter (queued, delayed, reserved or running)."""
        who = principal_of(http)
        detail = cancel_selection(_control(state), request, by=f"api:{who.name}")
        if not request.dry_run:
            state.auth.record(
                who, "tasks.cancel", target=_target(request), count=detail["cancelled"]
            )
        log.info("stats API: %d task(s) cancelled", detail["cancelled"])
        return m.AdminResult(action="tasks.cancel", detail=detail)

    @router.post("/tasks/{task_id}/cancel", dependencies=admin, response_model=m.AdminResult)
    def cancel_one(
        http: Request,
        task_id: Annotated[str, Path(min_length=1, max_length=300)],
        terminate: Annotated[bool, Query()] = False,
        grace_s: Annotated[float | None, Query(ge=0)] = None,
    ) -> m.AdminResult:
        """Cancel one task wherever it is; ``terminate`` ends it if it runs on (prefork)."""
        who = principal_of(http)
        added = _control(state).cancel(
            [task_id], by=f"api:{who.name}", terminate=terminate, grace_s=grace_s
        )
        state.auth.record(
            who, "tasks.cancel", target=task_id, count=1, detail={"terminate": terminate}
        )
        return m.AdminResult(action="tasks.cancel", detail={"task_id": task_id, "new": added})

    return router


class JobEventsCollector(Collector):
    """``taskyard_job_events_total``, read at scrape time; unreachable Redis leaves it out."""

    def __init__(self, state: ApiState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "taskyard_job_events",
            "Job-control outcomes: deduplicated, throttled, debounced, cancelled calls.",
            labels=["name", "event"],
        )
        try:
            store = _control(self.state).store
            counts = jobs.counts(store.client, store.keys, store.keyprefix)
        except Exception:
            log.warning("metrics: job counts unreadable", exc_info=True)
            return
        for (name, event), n in sorted(counts.items()):
            family.add_metric([name, event], float(n))
        yield family


def install_jobs(api: FastAPI, state: ApiState) -> None:
    """Add the routes and the counter's collector (before ``/metrics`` is built)."""
    api.include_router(jobs_router(state), prefix=API_PREFIX)
    state.extras.setdefault("collectors", []).append(JobEventsCollector(state))
