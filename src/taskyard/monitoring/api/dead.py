"""Dead letters and task lookup in the stats API (JSON routes only).

Reads: ``GET /api/v1/dead`` (search), ``GET /api/v1/dead/{id}``, ``GET /api/v1/tasks/{id}``
(the timeline from the history database), arguments redacted and withheld from viewers.
Writes, each in the audit trail: ``POST /api/v1/dead/replay`` (an operator) and
``POST /api/v1/dead/purge`` (an admin; the admin token is one). Their gauge is in
:mod:`taskyard.monitoring.metrics`, their page in :mod:`taskyard.monitoring.dashboard.dead`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field, field_validator

from taskyard.deadletters import Query as DeadQuery
from taskyard.deadletters.batches import batch_dead_letters, purge_batches, replay_batches
from taskyard.deadletters.replay import replay, replay_one
from taskyard.errors import TaskyardError
from taskyard.monitoring import timeline
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.access import principal_of
from taskyard.monitoring.api.query import TIME_FORMS, check_range, epoch_seconds, parse_time
from taskyard.monitoring.api.state import API_PREFIX, ApiState
from taskyard.monitoring.api.users import Action

log = logging.getLogger(__name__)

Reason = Literal["failed", "crashed", "poison", "expired"]


class DeadSelection(BaseModel):
    """Which dead letters a replay or purge takes: ids, a filter, or all (exactly one)."""

    ids: list[Annotated[str, Field(min_length=1, max_length=300)]] | None = Field(
        None, max_length=10_000, description="Entry ids (task ids)."
    )
    name: str | None = Field(None, max_length=300, description="Task name (exact).")
    queue: str | None = Field(None, max_length=200)
    reason: Reason | None = None
    exception: str | None = Field(None, max_length=300, description="Exception type.")
    since: float | None = Field(None, description=f"Died at or after: {TIME_FORMS}.")
    until: float | None = Field(None, description=f"Died at or before: {TIME_FORMS}.")
    all: bool = Field(False, description="Every dead letter (purge: replayed ones too).")
    batch: str | None = Field(
        None, max_length=400, description="NAME or NAME/ID: dead batches instead of tasks."
    )

    @field_validator("since", "until", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        # A string is an ISO 8601 timestamp or a number of seconds; numbers pass to pydantic.
        return epoch_seconds(value) if isinstance(value, str) else value

    def query(self, state: str | None = "dead") -> DeadQuery:
        return DeadQuery(
            name=self.name,
            queue=self.queue,
            reason=self.reason,
            exception_type=self.exception,
            since=self.since,
            until=self.until,
            state=state,
        )

    def describe(self) -> str:
        """The selection in one line, for the audit trail."""
        if self.ids:
            return "ids " + ",".join(self.ids[:20]) + (" ..." if len(self.ids) > 20 else "")
        if self.all:
            return "all"
        fields = ("name", "queue", "reason", "exception", "since", "until")
        return " ".join(f"{f}={getattr(self, f)}" for f in fields if getattr(self, f) is not None)

    def check(self) -> None:
        filtered = any(
            v is not None
            for v in (self.name, self.queue, self.reason, self.exception, self.since, self.until)
        )
        if self.batch is None and (bool(self.ids) + self.all + filtered) != 1:
            raise HTTPException(422, "give ids, filter fields or all=true (exactly one)")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise HTTPException(422, f"until ({self.until}) is before since ({self.since})")


def _raise(exc: TaskyardError, status: int = 400) -> None:
    raise HTTPException(status, str(exc)) from None


def dead_router(state: ApiState) -> APIRouter:
    """The read and admin routes of the dead letters and task lookup."""
    router = APIRouter(tags=["dead letters"])
    replayer = [Depends(state.auth.require(Action.REPLAY))]
    purger = [Depends(state.auth.require(Action.PURGE))]
    pattern = state.runtime.settings.redact_pattern

    @router.get("/dead", response_model=m.DeadLetterPage)
    def search(
        request: Request,
        name: str | None = None,
        queue: str | None = None,
        reason: Reason | None = None,
        exception: Annotated[str | None, Query(description="Exception type.")] = None,
        since: Annotated[str | None, Query(description=f"Died at or after: {TIME_FORMS}.")] = None,
        until: Annotated[str | None, Query(description=f"Died at or before: {TIME_FORMS}.")] = None,
        state_: Annotated[Literal["dead", "replayed", "all"], Query(alias="state")] = "dead",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
        batches: bool = True,
    ) -> dict[str, Any]:
        """Dead letters, newest first, with the dead batches beside them."""
        start, end = parse_time("since", since), parse_time("until", until)
        check_range(start, end)
        try:
            query = DeadQuery(
                name=name,
                queue=queue,
                reason=reason,
                exception_type=exception,
                since=start,
                until=end,
                state=None if state_ == "all" else state_,
            )
        except TaskyardError as exc:
            _raise(exc, 422)
        store = state.dead_letters()
        entries = store.search(query, limit=limit, offset=offset)
        plain = name is None and queue is None and exception is None
        return {
            "total": store.count(query),
            "limit": limit,
            "offset": offset,
            "entries": [
                e.redacted(pattern, show_arguments=state.auth.may_view_arguments(request)).to_dict()
                for e in entries
            ],
            "batches": batch_dead_letters(state.runtime) if batches and plain else [],
        }

    @router.get(
        "/dead/{entry_id}",
        response_model=m.DeadLetterEntry,
        responses={404: {"model": m.ErrorBody}},
    )
    def entry(
        request: Request, entry_id: Annotated[str, Path(min_length=1, max_length=300)]
    ) -> dict[str, Any]:
        """One dead letter in full (arguments redacted; withheld from viewers)."""
        found = state.dead_letters().get(entry_id)
        if found is None:
            raise HTTPException(404, f"no dead letter {entry_id!r}")
        return found.redacted(
            pattern, show_arguments=state.auth.may_view_arguments(request)
        ).to_dict()

    @router.get(
        "/tasks/{task_id}", response_model=m.TaskTimeline, responses={404: {"model": m.ErrorBody}}
    )
    def task(
        request: Request, task_id: Annotated[str, Path(min_length=1, max_length=300)]
    ) -> dict[str, Any]:
        """The timeline of one task (sent, received, started, ... succeeded, failed or dead)."""
        found = state.store.timeline(task_id)
        found = timeline.with_job_state(state.runtime, task_id, found)
        dead = state.dead_letters().get(task_id)
        if found is None and dead is None:
            raise HTTPException(404, f"no task {task_id!r} in the timelines or dead letters")
        return {
            **(found or {"task_id": task_id, "events": []}),
            "dead": dead.redacted(
                pattern, show_arguments=state.auth.may_view_arguments(request)
            ).to_dict()
            if dead
            else None,
        }

    @router.post("/dead/replay", dependencies=replayer, response_model=m.AdminResult)
    def replay_route(http: Request, selection: Annotated[DeadSelection, Body()]) -> m.AdminResult:
        """Send dead tasks again to their own level (each links back to its entry)."""
        selection.check()
        app = state.celery()
        store = state.dead_letters()
        try:
            if selection.batch is not None:
                refs = replay_batches(app, selection.batch)
                state.auth.record(
                    principal_of(http), "dead.replay", target=selection.batch, count=len(refs)
                )
                return m.AdminResult(action="dead.replay", detail={"batches": refs})
            if selection.ids:
                done = {i: replay_one(app, store, i) for i in selection.ids}
                report_detail: dict[str, Any] = {"replayed": done, "skipped": {}}
            else:
                report = replay(app, store, selection.query())
                report_detail = {"replayed": report.replayed, "skipped": report.skipped}
        except TaskyardError as exc:
            _raise(exc, 404 if "no dead letter" in str(exc) else 409)
        state.cache.clear()
        state.auth.record(
            principal_of(http),
            "dead.replay",
            target=selection.describe(),
            count=len(report_detail["replayed"]),
            detail={"skipped": len(report_detail["skipped"])},
        )
        log.info("stats API: %d dead letter(s) replayed", len(report_detail["replayed"]))
        return m.AdminResult(action="dead.replay", detail=report_detail)

    @router.post("/dead/purge", dependencies=purger, response_model=m.AdminResult)
    def purge_route(http: Request, selection: Annotated[DeadSelection, Body()]) -> m.AdminResult:
        """Delete dead letters for good."""
        selection.check()
        store = state.dead_letters()
        try:
            if selection.batch is not None:
                items = purge_batches(state.runtime, selection.batch)
                state.auth.record(
                    principal_of(http), "dead.purge", target=selection.batch, count=items
                )
                return m.AdminResult(action="dead.purge", detail={"batch_items": items})
            if selection.ids:
                purged = store.delete(list(selection.ids))
            else:
                purged = store.purge(selection.query(None if selection.all else "dead"))
        except TaskyardError as exc:
            _raise(exc)
        state.cache.clear()
        state.auth.record(
            principal_of(http), "dead.purge", target=selection.describe(), count=purged
        )
        log.info("stats API: %d dead letter(s) purged", purged)
        return m.AdminResult(action="dead.purge", detail={"purged": purged})

    return router


def install_dead(api: FastAPI, state: ApiState) -> None:
    """Add the dead-letter and task-lookup routes under the API prefix."""
    api.include_router(dead_router(state), prefix=API_PREFIX)
