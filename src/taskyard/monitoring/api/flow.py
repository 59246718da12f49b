"""Flow control in the stats API: JSON routes behind the admin token (show and change limits,
pause and resume) and the Prometheus collector of limits, pauses and held messages.

The operator console calls these routes; the functions behind them are taskyard.flow's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Request
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from taskyard.errors import ConfigurationError
from taskyard.flow import FlowStore, store_for
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.access import principal_of
from taskyard.monitoring.api.state import API_PREFIX, ApiState

log = logging.getLogger(__name__)

_NAME = Annotated[str, Path(min_length=1, max_length=200)]


class LimitChange(BaseModel):
    """New limits of one task; a field left out keeps its value, "none"/0 removes it."""

    rate: str | None = Field(None, max_length=40, description='"10/s", "600/m", "5/h" or "none".')
    concurrency: int | None = Field(None, ge=0, description="At most this many at once; 0: off.")
    weights: dict[str, int] | None = Field(
        None, max_length=1000, description="Fair-share weight per partition value."
    )


class PauseChange(BaseModel):
    """A queue, or a task name/glob, and the key on whose behalf it is paused or resumed."""

    queue: str | None = Field(None, min_length=1, max_length=200)
    task: str | None = Field(None, min_length=1, max_length=200)
    key: str = Field("default", min_length=1, max_length=200)
    all_keys: bool = Field(False, description="resume only: withdraw every key's pause.")


class FlowOverview(BaseModel):
    """Limits with their state, pauses with their keys, held messages with their reasons."""

    limits: Any = Field(description="Per task: configured limits, running, started, waiting.")
    paused: Any = Field(description="Paused queues and task globs, by which keys, since when.")
    held: Any = Field(description="Messages held back, per queue, task and reason.")


def flow_overview(store: FlowStore) -> dict[str, Any]:
    """Limits with their state, pauses and held messages (the GET route's body)."""
    return {"limits": store.status(), "paused": store.pauses(), "held": store.held()}


def flow_router(state: ApiState, store: Callable[[], FlowStore]) -> APIRouter:
    """Routes under ``/admin/flow``, every one requiring the admin token."""
    router = APIRouter(
        prefix="/admin/flow", tags=["admin", "flow"], dependencies=[Depends(state.auth)]
    )

    def act(
        http: Request, action: str, detail: dict[str, Any], call: Callable[[], Any]
    ) -> m.AdminResult:
        try:
            call()
        except ConfigurationError as exc:
            raise HTTPException(422, str(exc)) from None
        state.cache.clear()
        target = str(detail.get("task") or detail.get("queue") or detail.get("task_name") or "")
        state.auth.record(principal_of(http), action, target=target, detail=detail)
        log.info("stats API: %s %s", action, detail)
        return m.AdminResult(action=action, detail={**detail, **flow_overview(store())})

    @router.get("", response_model=FlowOverview)
    def show_flow() -> dict[str, Any]:
        """Each limit (configured, running, started in the last minute, waiting), what is
        paused by which keys, and the held messages with the reason they wait."""
        return flow_overview(store())

    @router.post("/limits/{task_name}", response_model=m.AdminResult)
    def set_limits(
        http: Request, task_name: _NAME, change: Annotated[LimitChange, Body()]
    ) -> m.AdminResult:
        """Change a task's limits at run time (workers apply it within about a second)."""

        def call() -> None:
            if change.rate is not None or change.concurrency is not None:
                store().set_limits(task_name, rate=change.rate, concurrency=change.concurrency)
            for value, weight in (change.weights or {}).items():
                store().set_weight(task_name, value, weight)

        return act(http, "flow.limits.set", {"task": task_name}, call)

    @router.post("/limits/{task_name}/clear", response_model=m.AdminResult)
    def clear_limits(http: Request, task_name: _NAME) -> m.AdminResult:
        """Run the task without rate or concurrency limit until set or reset."""
        return act(
            http, "flow.limits.clear", {"task": task_name}, lambda: store().clear_limits(task_name)
        )

    @router.post("/limits/{task_name}/reset", response_model=m.AdminResult)
    def reset_limits(http: Request, task_name: _NAME) -> m.AdminResult:
        """Drop the run-time changes: back to the decorator's limits."""
        return act(
            http, "flow.limits.reset", {"task": task_name}, lambda: store().reset_limits(task_name)
        )

    @router.post("/pause", response_model=m.AdminResult)
    def pause(http: Request, change: Annotated[PauseChange, Body()]) -> m.AdminResult:
        """Pause a queue or the tasks matching a glob, durably, on behalf of ``key``."""
        return act(
            http,
            "flow.pause",
            {"queue": change.queue, "task": change.task, "key": change.key},
            lambda: store().pause(queue=change.queue, task=change.task, key=change.key),
        )

    @router.post("/resume", response_model=m.AdminResult)
    def resume(http: Request, change: Annotated[PauseChange, Body()]) -> m.AdminResult:
        """Withdraw ``key``'s pause (or every key's); it runs again once no key is left."""
        return act(
            http,
            "flow.resume",
            {"queue": change.queue, "task": change.task, "key": change.key},
            lambda: store().resume(
                queue=change.queue, task=change.task, key=change.key, all_keys=change.all_keys
            ),
        )

    return router


class FlowCollector(Collector):
    """taskyard_flow_* gauges, read from the broker's Redis at scrape time."""

    def __init__(self, store: Callable[[], FlowStore]) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        store = self.store()
        try:
            status = store.status()
            pauses = store.pauses()
            held = store.held()
        except Exception:
            log.warning("flow metrics: cannot read the broker's Redis", exc_info=True)
            return
        limit = GaugeMetricFamily(
            "taskyard_flow_limit",
            "Configured cluster-wide limit of a task (kind: rate_per_second, concurrency).",
            labels=["name", "kind"],
        )
        running = GaugeMetricFamily(
            "taskyard_flow_running",
            "Concurrency slots held now (tasks reserved or running).",
            labels=["name"],
        )
        started = GaugeMetricFamily(
            "taskyard_flow_started_last_minute",
            "Reservations of a limited task in the last minute.",
            labels=["name"],
        )
        waiting = GaugeMetricFamily(
            "taskyard_flow_waiting",
            "Messages held back by flow control, by task.",
            labels=["name"],
        )
        for row in status:
            if row["rate"]:
                n, _, unit = row["rate"].partition("/")
                per = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit, 1.0)
                limit.add_metric([row["task"], "rate_per_second"], int(n) / per)
            if row["concurrency"]:
                limit.add_metric([row["task"], "concurrency"], row["concurrency"])
            running.add_metric([row["task"]], row["running"])
            started.add_metric([row["task"]], row["started_last_minute"])
            waiting.add_metric([row["task"]], row["waiting"])
        paused = GaugeMetricFamily(
            "taskyard_flow_paused",
            "1 for each paused queue or task glob; keys: how many keys hold the pause.",
            labels=["kind", "name"],
        )
        for pause in pauses:
            paused.add_metric([pause["kind"], pause["name"]], len(pause["keys"]))
        held_family = GaugeMetricFamily(
            "taskyard_flow_held",
            "Messages held back, by queue, task and reason (queue_paused, task_paused, "
            "concurrency, rate, turn); they count in the queue's depth.",
            labels=["queue_name", "name", "reason"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        for entry in held:
            label = (entry["queue"], entry["task"], str(entry["reason"]))
            totals[label] = totals.get(label, 0) + int(entry["held"])
        for label, count in totals.items():
            held_family.add_metric(list(label), count)
        yield from (limit, running, started, waiting, paused, held_family)


def install_flow(api: FastAPI, state: ApiState) -> None:
    """Add the flow routes and the collector (before ``/metrics`` is built)."""

    def store() -> FlowStore:
        return store_for(state.runtime, state.celery_app)

    api.include_router(flow_router(state, store), prefix=API_PREFIX)
    state.extras.setdefault("collectors", []).append(FlowCollector(store))
