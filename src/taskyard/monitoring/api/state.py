"""What the endpoints of one stats API instance share: the store, cache, auth and app."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import HTTPException, Request
from fastapi.responses import Response

from taskyard.deadletters import DeadLetterStore, RedisDeadLetterStore
from taskyard.monitoring.api.access import Access
from taskyard.monitoring.api.query import Body, ResponseCache
from taskyard.runtime import Runtime

API_PREFIX = "/api/v1"
#: Largest page of a history query: bounds the work and the body of one request.
MAX_PAGE_SIZE = 500
#: Responses at least this large (bytes) are gzip-compressed for clients that accept it.
GZIP_MIN_BYTES = 500
#: Level 6: nearly level 9's ratio on JSON and Prometheus text for a third of the CPU.
GZIP_LEVEL = 6


class StatsSource(Protocol):
    """What the API, ``/metrics`` and the dashboard read: :class:`taskyard.monitoring.store.
    StatsStore` provides it; tests give an in-memory twin. Rows are the JSON API's shapes (the
    models of :mod:`taskyard.monitoring.api.models`); the dashboard validates them into those
    models once, in its ``gather`` step."""

    def queues(self) -> list[dict[str, Any]]: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def tasks(self) -> list[dict[str, Any]]: ...
    def histograms(self) -> dict[str, Any]: ...
    def batches(self) -> list[dict[str, Any]]: ...
    def cache(self) -> list[dict[str, Any]]: ...
    def maintenance(self) -> list[dict[str, Any]]: ...
    def alerts(self, include_resolved: bool = False) -> list[dict[str, Any]]: ...
    def overview(self) -> dict[str, Any]: ...
    def series(
        self, name: str, since: float | None, until: float | None, limit: int, offset: int
    ) -> list[dict[str, Any]]: ...
    def sample_series(
        self, name: str, since: float, until: float, points: int
    ) -> list[dict[str, Any]]: ...
    def covered_since(self) -> float | None: ...
    def alert_changes(self, limit: int = 100) -> list[dict[str, Any]]: ...
    def timeline(self, task_id: str) -> dict[str, Any] | None: ...
    def check_ready(self) -> dict[str, str | None]: ...


@dataclass
class ApiState:
    """What the endpoints of one API instance share (``app.state.taskyard``)."""

    runtime: Runtime
    store: StatsSource
    cache: ResponseCache
    #: Who a request is and what it may do; as a dependency, an operator's action.
    auth: Access
    celery_app: Any
    extras: dict[str, Any] = field(default_factory=dict)
    dead_store: DeadLetterStore | None = None

    async def respond(
        self,
        request: Request,
        key: Hashable,
        compute: Callable[[], bytes],
        media_type: str = "application/json",
    ) -> Response:
        """The cached body of ``key`` (computed by ``compute`` when due), gzipped for clients
        that accept it. The gzip form is made once per computation, not per request; the
        middleware leaves a response that already has a Content-Encoding alone."""
        body = await self.cache.get(key, lambda: Body.of(compute(), GZIP_MIN_BYTES, GZIP_LEVEL))
        if body.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
            return Response(
                body.gzipped,
                media_type=media_type,
                headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
            )
        return Response(body.raw, media_type=media_type)

    def dead_letters(self) -> DeadLetterStore:
        """The dead-letter store of this API's runtime (made on first use)."""
        if self.dead_store is None:
            self.dead_store = RedisDeadLetterStore.for_runtime(self.runtime)
        return self.dead_store

    def celery(self) -> Any:
        """The taskyard Celery app admin actions send tasks with: the router places a task sent
        by name on its declared level."""
        if self.celery_app is None:
            raise HTTPException(503, "this API was built without a Celery app to send tasks")
        return self.celery_app


def json_body(payload: Any) -> bytes:
    """Compact JSON of a store payload; non-finite floats become null (JSON has no NaN)."""
    return json.dumps(_finite(payload), separators=(",", ":"), default=str).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_response(body: bytes, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type="application/json")
