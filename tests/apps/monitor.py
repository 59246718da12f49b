"""Test app for monitoring: tasks with known outcomes (success, failure, one retry), a task that
holds its worker, and one that reports itself deferred the way the resource guards do."""

from __future__ import annotations

import time
from typing import Any

from taskyard import create_app, priority_task
from taskyard import signals as taskyard_signals

app = create_app("monitor")


@priority_task(priority="normal")
def ok(i: int) -> int:
    return i


@priority_task(priority="normal")
def boom(i: int) -> None:
    raise ValueError(f"boom {i}")


@app.task(bind=True, name="tests.apps.monitor.retry_once")
def retry_once(self: Any, i: int) -> int:
    if self.request.retries == 0:
        raise self.retry(countdown=0, max_retries=3)
    return i


@priority_task(priority="high")
def sleepy(seconds: float) -> None:
    time.sleep(seconds)


@priority_task(priority="low")
def deferred_once(i: int) -> None:
    """Emits taskyard's deferral signal as a guard would when it holds a task back."""
    taskyard_signals.task_deferred.send(
        sender=deferred_once.name, task_id=str(i), level="low", reason="test", deferrals=1
    )
