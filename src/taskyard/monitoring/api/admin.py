"""Admin endpoints of the stats API: POSTs behind the bearer token.

They call into the periodic-jobs and batching packages: clear cache tags, queue an index
maintenance run, requeue dead batches.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request
from pydantic import BaseModel, Field

from taskyard.batching import requeue_dead
from taskyard.cache.core import cache_for
from taskyard.errors import BatchError
from taskyard.maintenance import MAINTENANCE_TASK
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.access import principal_of
from taskyard.monitoring.api.state import ApiState

log = logging.getLogger(__name__)


class CacheInvalidation(BaseModel):
    """Tags whose cache entries are invalidated."""

    tags: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=100, description="Cache tags, e.g. ['user:7']."
    )


class BatchRequeue(BaseModel):
    """Dead batches of one batch name to put back into work."""

    batch_ids: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, max_length=1000, description="Dead batch ids to requeue; null requeues all."
    )


def admin_router(state: ApiState) -> APIRouter:
    """Routes under ``/admin``: an operator's actions (the admin token, or a user's role)."""
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": m.ErrorBody, "description": "No bearer token sent."},
        403: {
            "model": m.ErrorBody,
            "description": "Wrong token, or admin endpoints disabled (no token configured).",
        },
    }
    router = APIRouter(
        prefix="/admin", tags=["admin"], dependencies=[Depends(state.auth)], responses=errors
    )

    @router.post("/cache/invalidate", response_model=m.AdminResult)
    def invalidate_cache(
        http: Request, invalidation: Annotated[CacheInvalidation, Body()]
    ) -> m.AdminResult:
        """Invalidate the cache entries stored under the given tags and delete them."""
        cache = cache_for(state.runtime)
        deleted = {tag: int(cache.clear_tag(tag)) for tag in invalidation.tags}
        state.cache.clear()
        state.auth.record(
            principal_of(http),
            "cache.invalidate",
            target=",".join(invalidation.tags),
            count=sum(deleted.values()),
        )
        log.info("stats API: cache tags cleared: %s", invalidation.tags)
        return m.AdminResult(action="cache.invalidate", detail={"deleted": deleted})

    @router.post("/maintenance/run", response_model=m.AdminResult, status_code=202)
    def run_maintenance(http: Request) -> m.AdminResult:
        """Queue an index-maintenance run now (the job itself runs on a worker)."""
        name = MAINTENANCE_TASK
        result = state.celery().send_task(name)
        state.auth.record(principal_of(http), "maintenance.run", target=result.id)
        log.info("stats API: maintenance run queued as %s", result.id)
        return m.AdminResult(action="maintenance.run", detail={"task": name, "task_id": result.id})

    @router.post(
        "/batches/{batch_name}/requeue",
        response_model=m.AdminResult,
        responses={404: {"model": m.ErrorBody, "description": "Unknown batch name."}},
    )
    def requeue_dead_batch(
        http: Request,
        batch_name: Annotated[str, Path(min_length=1, max_length=200)],
        requeue: Annotated[BatchRequeue, Body()] = BatchRequeue(),  # noqa: B008
    ) -> m.AdminResult:
        """Put dead batches back into work with fresh retries (all of them, or the ids given)."""
        try:
            requeued = requeue_dead(state.celery(), batch_name, requeue.batch_ids)
        except BatchError as exc:
            raise HTTPException(404, str(exc)) from None
        state.cache.clear()
        state.auth.record(
            principal_of(http), "batches.requeue", target=batch_name, count=len(requeued)
        )
        log.info("stats API: %d dead batch(es) of %s requeued", len(requeued), batch_name)
        return m.AdminResult(
            action="batches.requeue", detail={"batch_name": batch_name, "requeued": list(requeued)}
        )

    return router
