"""Dead letters and task lookup in the stats API, their gauge in ``/metrics``, their page.

Reads: ``GET /api/v1/dead`` (search), ``GET /api/v1/dead/{id}``, ``GET /api/v1/tasks/{id}``
(the timeline from the history database). Writes, behind the admin token like every admin
route: ``POST /api/v1/dead/replay`` and ``POST /api/v1/dead/purge``. The gauge
``taskyard_dead_tasks{queue_name,name,reason}`` counts entries waiting in state "dead"; dead
batches stay in ``taskyard_batch_dead_batches``. The page is ``/dashboard/dead``.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field, field_validator

from taskyard.deadletters import DeadLetterStore, RedisDeadLetterStore
from taskyard.deadletters import Query as DeadQuery
from taskyard.deadletters.batches import batch_dead_letters, purge_batches, replay_batches
from taskyard.deadletters.replay import replay, replay_one
from taskyard.errors import TaskyardError
from taskyard.monitoring import history, timeline
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.query import TIME_FORMS, check_range, epoch_seconds, parse_time
from taskyard.monitoring.api.state import API_PREFIX, ApiState

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

    def check(self) -> None:
        filtered = any(
            v is not None
            for v in (self.name, self.queue, self.reason, self.exception, self.since, self.until)
        )
        if self.batch is None and (bool(self.ids) + self.all + filtered) != 1:
            raise HTTPException(422, "give ids, filter fields or all=true (exactly one)")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise HTTPException(422, f"until ({self.until}) is before since ({self.since})")


def dead_store(state: ApiState) -> DeadLetterStore:
    store = state.extras.get("dead_store")
    if store is None:
        store = state.extras["dead_store"] = RedisDeadLetterStore.for_runtime(state.runtime)
    return store


class DeadLetterCollector(Collector):
    """``taskyard_dead_tasks``, read at scrape time; an unreachable store leaves it out."""

    def __init__(self, counts: Callable[[], dict[tuple[str, str, str], int]]) -> None:
        self.counts = counts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "taskyard_dead_tasks",
            "Dead letters waiting for an operator (state dead).",
            labels=["queue_name", "name", "reason"],
        )
        try:
            counts = self.counts()
        except Exception:
            log.warning("metrics: dead-letter counts unreadable", exc_info=True)
            return
        for (queue, name, reason), n in sorted(counts.items()):
            family.add_metric([queue, name, reason], float(n))
        yield family


def _raise(exc: TaskyardError, status: int = 400) -> None:
    raise HTTPException(status, str(exc)) from None


def dead_router(state: ApiState) -> APIRouter:
    """The read and admin routes of the dead letters and task lookup."""
    router = APIRouter(tags=["dead letters"])
    admin = [Depends(state.auth)]

    @router.get("/dead", response_model=m.DeadLetterPage)
    def search(
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
        store = dead_store(state)
        entries = store.search(query, limit=limit, offset=offset)
        plain = name is None and queue is None and exception is None
        return {
            "total": store.count(query),
            "limit": limit,
            "offset": offset,
            "entries": [e.to_dict() for e in entries],
            "batches": batch_dead_letters(state.runtime) if batches and plain else [],
        }

    @router.get(
        "/dead/{entry_id}",
        response_model=m.DeadLetterEntry,
        responses={404: {"model": m.ErrorBody}},
    )
    def entry(entry_id: Annotated[str, Path(min_length=1, max_length=300)]) -> dict[str, Any]:
        """One dead letter in full."""
        found = dead_store(state).get(entry_id)
        if found is None:
            raise HTTPException(404, f"no dead letter {entry_id!r}")
        return found.to_dict()

    @router.get(
        "/tasks/{task_id}", response_model=m.TaskTimeline, responses={404: {"model": m.ErrorBody}}
    )
    def task(task_id: Annotated[str, Path(min_length=1, max_length=300)]) -> dict[str, Any]:
        """The timeline of one task (sent, received, started, ... succeeded, failed or dead)."""
        engine = history.engine_for(state.runtime.settings.effective_history_url)
        found = timeline.lookup(state.runtime, engine, task_id)
        found = timeline.with_job_state(state.runtime, task_id, found)
        dead = dead_store(state).get(task_id)
        if found is None and dead is None:
            raise HTTPException(404, f"no task {task_id!r} in the timelines or dead letters")
        return {
            **(found or {"task_id": task_id, "events": []}),
            "dead": dead.to_dict() if dead else None,
        }

    @router.post("/dead/replay", dependencies=admin, response_model=m.AdminResult)
    def replay_route(selection: Annotated[DeadSelection, Body()]) -> m.AdminResult:
        """Send dead tasks again to their own level (each links back to its entry)."""
        selection.check()
        app = state.celery()
        store = dead_store(state)
        try:
            if selection.batch is not None:
                refs = replay_batches(app, selection.batch)
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
        log.info("stats API: %d dead letter(s) replayed", len(report_detail["replayed"]))
        return m.AdminResult(action="dead.replay", detail=report_detail)

    @router.post("/dead/purge", dependencies=admin, response_model=m.AdminResult)
    def purge_route(selection: Annotated[DeadSelection, Body()]) -> m.AdminResult:
        """Delete dead letters for good."""
        selection.check()
        store = dead_store(state)
        try:
            if selection.batch is not None:
                items = purge_batches(state.runtime, selection.batch)
                return m.AdminResult(action="dead.purge", detail={"batch_items": items})
            if selection.ids:
                purged = store.delete(list(selection.ids))
            else:
                purged = store.purge(selection.query(None if selection.all else "dead"))
        except TaskyardError as exc:
            _raise(exc)
        state.cache.clear()
        log.info("stats API: %d dead letter(s) purged", purged)
        return m.AdminResult(action="dead.purge", detail={"purged": purged})

    return router


# --- the page -----------------------------------------------------------------------------------


def render_dead_page(
    store: DeadLetterStore,
    batches: list[dict[str, Any]],
    *,
    request: Any,
    settings: Any,
    limit: int = 100,
) -> str:
    """The dead-letters page: counts per queue, task and reason, the newest entries, batches."""
    from taskyard.monitoring.dashboard.layout import card, page, table
    from taskyard.monitoring.dashboard.pages import name_link, task_link

    def when(at: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) if at else "-"

    counts = store.counts()
    by_key = [
        [html.escape(q or "-"), name_link(n) if n else "-", html.escape(r), str(c)]
        for (q, n, r), c in sorted(counts.items(), key=lambda kv: -kv[1])
    ]
    entries = store.search(limit=limit)
    newest = [
        [
            when(e.last_at),
            task_link(e.id),
            name_link(e.name) if e.name else "-",
            html.escape(e.queue or "-"),
            html.escape(e.reason),
            f"<b>{html.escape(e.exception_type or '-')}</b> "
            f"{html.escape((e.exception or e.detail)[:160])}",
            str(e.deliveries),
            str(e.attempts),
        ]
        for e in entries
    ]
    dead_batches = [
        [
            html.escape(b["id"]),
            html.escape(b["reason"]),
            str(b["size"]),
            str(b["attempts"]),
            html.escape(b["error"][:160]),
        ]
        for b in batches
    ]
    body = (
        f'<p class="muted">{sum(counts.values())} dead tasks, {len(batches)} dead batches. '
        "Replay or purge: <code>taskyard dead replay|purge</code>, or POST "
        "<code>/api/v1/dead/replay|purge</code> with the admin token.</p>"
        '<div class="grid">'
        + card(
            "By queue, task and reason",
            table(["queue", "task", "reason", "entries"], by_key, empty="no dead tasks"),
        )
        + card(
            "Dead batches",
            table(
                ["batch", "reason", "items", "attempts", "error"],
                dead_batches,
                empty="no dead batches",
            ),
        )
        + card(
            f"Newest {len(entries)}",
            table(
                [
                    "died (UTC)",
                    "id",
                    "task",
                    "queue",
                    "reason",
                    "exception",
                    "deliveries",
                    "attempts",
                ],
                newest,
                table_id="dead",
                empty="no dead tasks",
            ),
            wide=True,
        )
        + "</div>"
    )
    return page("dead letters", body, request=request, active="/dashboard/dead", settings=settings)


def install_dead(api: FastAPI, state: ApiState) -> None:
    """Add the routes, the page and the gauge's collector (before ``/metrics`` is built)."""
    api.include_router(dead_router(state), prefix=API_PREFIX)
    counts = getattr(state.store, "dead_counts", None)
    if counts is None:

        def counts() -> dict[tuple[str, str, str], int]:
            return dead_store(state).counts()

    state.extras.setdefault("collectors", []).append(DeadLetterCollector(counts))

    @api.get("/dashboard/dead", response_class=HTMLResponse, include_in_schema=False)
    def dead_page(request: Request) -> HTMLResponse:
        """The dead-letters page (thread pool: the store does blocking I/O)."""
        try:
            body = render_dead_page(
                dead_store(state),
                batch_dead_letters(state.runtime),
                request=request,
                settings=state.runtime.settings,
            )
        except Exception as exc:
            log.warning("dead-letters page: store unreadable", exc_info=True)
            return HTMLResponse(
                f"<p>dead letters unavailable: {html.escape(str(exc))}</p>", status_code=503
            )
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})
