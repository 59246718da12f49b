"""Every dashboard page's route, in one router the stats API includes."""

from __future__ import annotations

from fastapi import APIRouter

from taskyard.monitoring.dashboard import (
    audit,
    dead,
    flow,
    login,
    overview,
    task,
    task_name,
    tasks,
    workers,
)

router = APIRouter()
for page in (overview, workers, tasks, task_name, task, dead, flow, audit, login):
    router.include_router(page.router)
