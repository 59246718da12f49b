"""The stats API: FastAPI over the stats store, served by ``taskyard api``.

Read endpoints are ``async`` and answer from a short per-process cache (``api_cache_s``); a miss
reads the store in a worker thread, so blocking Redis I/O never stalls the event loop and a burst
of concurrent requests costs one store read. Errors are JSON ``{"error", "detail"}`` bodies: an
unreachable Redis, database or broker is a 503 naming it, never a 500 traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import Response
from pydantic import BaseModel

from taskyard.config import Settings, load_settings
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.access import Access, LoginRequired
from taskyard.monitoring.api.admin import admin_router
from taskyard.monitoring.api.audit import AuditLog, audit_router
from taskyard.monitoring.api.dead import install_dead
from taskyard.monitoring.api.errors import install_error_handlers
from taskyard.monitoring.api.flow import install_flow
from taskyard.monitoring.api.headers import SecurityHeaders
from taskyard.monitoring.api.jobs import install_jobs
from taskyard.monitoring.api.query import (
    ResponseCache,
    check_range,
    invalid,
    parse_fields,
    parse_time,
    select,
)
from taskyard.monitoring.api.state import (
    API_PREFIX,
    GZIP_LEVEL,
    GZIP_MIN_BYTES,
    MAX_PAGE_SIZE,
    ApiState,
    StatsSource,
    json_body,
    json_response,
)
from taskyard.monitoring.api.users import UserStore
from taskyard.monitoring.metrics import add_metrics_route
from taskyard.monitoring.redis_memory import RedisMemoryCollector, RedisReader
from taskyard.monitoring.store import SERIES, StatsStore
from taskyard.runtime import Runtime, runtime_of

log = logging.getLogger(__name__)


def _resolve(source: Settings | Runtime | Any | None) -> tuple[Runtime, Any]:
    if source is None:
        source = load_settings()
    if isinstance(source, Settings):
        # The API's one app: it reads the stats and sends admin tasks by name, so the router
        # places them on their declared level.
        from taskyard.app import create_app

        source = create_app("taskyard-api", **source.model_dump())
    if isinstance(source, Runtime):
        return source, None
    return runtime_of(source), source  # a Celery app made by create_app


def create_api(
    source: Settings | Runtime | Any | None = None, *, store: StatsSource | None = None
) -> FastAPI:
    """The stats API app for ``source``: a Settings, a Runtime, or a taskyard Celery app
    (``None``: settings from the environment). ``store`` replaces the Redis-backed store."""
    runtime, celery_app = _resolve(source)
    settings = runtime.settings.monitoring
    if store is None:
        store = StatsStore(runtime)
    state = ApiState(
        runtime=runtime,
        store=store,
        cache=ResponseCache(settings.api_cache_s),
        auth=Access(
            UserStore(runtime.redis, runtime.keys, settings.session_ttl_s),
            AuditLog(runtime.redis, runtime.keys, settings.audit_max_entries),
            admin_token=settings.api_token,
            metrics_public=settings.metrics_public,
        ),
        celery_app=celery_app,
    )

    api = FastAPI(
        title="taskyard stats API",
        version="1",
        description="Queues, workers, tasks, batches, cache, maintenance and alerts of a "
        "taskyard deployment; Prometheus metrics at /metrics.",
        responses={
            503: {
                "model": m.ErrorBody,
                "description": "Redis, the database or the broker is unreachable.",
            }
        },
        # Served offline by install_docs below (FastAPI's own pages load from a CDN).
        docs_url=None,
        redoc_url=None,
    )
    api.state.taskyard = state
    api.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES, compresslevel=GZIP_LEVEL)
    api.add_middleware(LoginRequired, access=state.auth)
    api.add_middleware(SecurityHeaders)
    install_error_handlers(api)
    from taskyard.monitoring.api.docs import install_docs

    install_docs(api)
    _add_health(api, state)
    _add_views(api, state)
    _add_history(api, state)
    install_dead(api, state)  # before /metrics: it adds the dead-letter gauge's collector
    install_flow(api, state)  # before /metrics too: the flow collector
    install_jobs(api, state)  # cancel routes; the job counters' collector
    state.extras.setdefault("collectors", []).append(
        RedisMemoryCollector(RedisReader(state.runtime.settings))
    )
    add_metrics_route(api, state)
    api.include_router(admin_router(state), prefix=API_PREFIX)
    api.include_router(audit_router(state), prefix=API_PREFIX)
    # Imported here: the pages import this package's models (its __init__ imports this module).
    from taskyard.monitoring.dashboard.routes import router as dashboard_router

    api.include_router(dashboard_router)
    return api


def _add_health(api: FastAPI, state: ApiState) -> None:
    @api.get("/health/live", response_model=m.Health, tags=["health"])
    async def live() -> m.Health:
        """The process is up (no dependency is checked)."""
        return m.Health(status="live")

    @api.get(
        "/health/ready",
        response_model=m.Health,
        tags=["health"],
        responses={503: {"model": m.Health, "description": "A dependency is down."}},
    )
    def ready() -> Response:
        """Redis, the history database and the broker all answer."""
        checks = state.store.check_ready()
        failing = {part: error for part, error in checks.items() if error}
        body = m.Health(
            status="unavailable" if failing else "ready",
            checks={part: error or "ok" for part, error in checks.items()},
        )
        return json_response(body.model_dump_json().encode(), 503 if failing else 200)


FieldsQuery = Annotated[
    str | None, Query(description="Comma-separated field names: each item carries only these.")
]


def _list_view(
    api: FastAPI,
    state: ApiState,
    path: str,
    model: type[BaseModel],
    read: Callable[[], Sequence[dict[str, Any]]],
    summary: str,
) -> None:
    allowed = m.field_names(model)

    async def endpoint(request: Request, fields: FieldsQuery = None) -> Response:
        chosen = parse_fields(fields, allowed)
        return await state.respond(
            request, (path, chosen), lambda: json_body(select(read(), chosen))
        )

    endpoint.__doc__ = summary
    api.add_api_route(
        API_PREFIX + path,
        endpoint,
        methods=["GET"],
        response_model=list[model],  # type: ignore[valid-type]
        name=path.strip("/"),
        tags=["stats"],
        summary=summary,
    )


def _add_views(api: FastAPI, state: ApiState) -> None:
    store = state.store

    @api.get(API_PREFIX + "/overview", response_model=m.Overview, tags=["stats"])
    async def overview(request: Request) -> Response:
        """Totals, queue depths, workers alive and firing alerts at a glance."""
        return await state.respond(request, "overview", lambda: json_body(store.overview()))

    _list_view(
        api,
        state,
        "/queues",
        m.QueueStats,
        store.queues,
        "True depth of each level's queue (priority sub-lists and reserved messages).",
    )
    _list_view(
        api,
        state,
        "/workers",
        m.WorkerStats,
        store.workers,
        "Workers from their heartbeats, alive or recently gone.",
    )
    _list_view(
        api,
        state,
        "/tasks",
        m.TaskStats,
        store.tasks,
        "Counts and latency percentiles per task name and queue.",
    )
    _list_view(
        api,
        state,
        "/batches",
        m.BatchStats,
        store.batches,
        "Batch buffers: items waiting, batches in flight and dead.",
    )
    _list_view(
        api,
        state,
        "/cache",
        m.CacheStats,
        store.cache,
        "Cache hit and miss counters per namespace.",
    )
    _list_view(
        api,
        state,
        "/maintenance",
        m.MaintenanceRun,
        store.maintenance,
        "Recent index-maintenance runs.",
    )

    alert_fields = m.field_names(m.Alert)

    @api.get(API_PREFIX + "/alerts/history", response_model=list[m.AlertChange], tags=["stats"])
    async def alert_changes(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=500, description="Changes to return.")] = 100,
    ) -> Response:
        """Recent alert state changes (fired, severity changed, resolved), newest first."""
        return await state.respond(
            request, ("alert_changes", limit), lambda: json_body(store.alert_changes(limit))
        )

    @api.get(API_PREFIX + "/alerts", response_model=list[m.Alert], tags=["stats"])
    async def alerts(
        request: Request,
        include_resolved: Annotated[
            bool, Query(description="Also list resolved alerts (kept for the history retention).")
        ] = False,
        fields: FieldsQuery = None,
    ) -> Response:
        """Firing alerts (and resolved ones on request), most recent first."""
        chosen = parse_fields(fields, alert_fields)
        return await state.respond(
            request,
            ("alerts", include_resolved, chosen),
            lambda: json_body(select(store.alerts(include_resolved=include_resolved), chosen)),
        )


def _add_history(api: FastAPI, state: ApiState) -> None:
    @api.get(API_PREFIX + "/history/{series}", response_model=m.HistoryPage, tags=["history"])
    async def history(
        request: Request,
        series: Annotated[
            str,
            Path(
                description="Series the stats collection writes.",
                json_schema_extra={"enum": list(SERIES)},
            ),
        ],
        since: Annotated[
            str | None,
            Query(
                description="Lower bound: seconds since the epoch or ISO 8601 (UTC if no zone).",
            ),
        ] = None,
        until: Annotated[str | None, Query(description="Upper bound, as since.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        fields: FieldsQuery = None,
    ) -> Response:
        """Snapshots of one series in a time range, newest first, one page at a time."""
        start, end = parse_time("since", since), parse_time("until", until)
        check_range(start, end)
        names = _field_list(fields)
        if series not in SERIES:
            raise HTTPException(404, f"unknown series {series!r}; known: {', '.join(SERIES)}")
        name = series

        def compute() -> bytes:
            # One row more than the page tells whether another page follows.
            rows = state.store.series(name, start, end, limit + 1, offset)
            more = len(rows) > limit
            rows = rows[:limit]
            if names:
                known = sorted({key for row in rows for key in row})
                unknown = [name for name in names if name not in known]
                if rows and unknown:
                    raise invalid(
                        "fields",
                        fields,
                        f"unknown field(s) {', '.join(unknown)} in series {name!r}; "
                        f"allowed: {', '.join(known)}",
                    )
            items = [{k: row.get(k) for k in names} for row in rows] if names else rows
            page = {
                "series": name,
                "since": start,
                "until": end,
                "limit": limit,
                "offset": offset,
                "items": items,
                "next_offset": offset + limit if more else None,
            }
            return json_body(page)

        return await state.respond(
            request, ("history", name, start, end, limit, offset, names), compute
        )


def _field_list(value: str | None) -> tuple[str, ...] | None:
    """Fields of a history query. Snapshot keys differ per series, so names are checked against
    the keys of the rows read."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    bad = [n for n in names if not n.replace("_", "").replace(".", "").isalnum()]
    if not names or bad:
        raise invalid(
            "fields",
            value,
            "fields must be comma-separated field names"
            + (f"; not a field name: {', '.join(map(repr, bad))}" if bad else ""),
        )
    return names
