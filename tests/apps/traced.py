"""Test app for tracing: tasks that send tasks, and one that retries with a countdown."""

from __future__ import annotations

from typing import Any

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("traced")


@priority_task(priority="normal")
def leaf(i: int) -> int:
    return i


@priority_task(priority="normal")
def hop(n: int) -> None:
    """Sends itself with n - 1 from inside the task: the chain is one trace."""
    if n > 0:
        hop.delay(n - 1)


@priority_task(priority="normal", bind=True, max_retries=3)
def retry_once(self: Any, marker: str) -> None:
    """Fails its first run and retries with a countdown (broker-side delay)."""
    if runtime_of(app).redis.incr(f"test:tries:{marker}") == 1:
        raise self.retry(countdown=0.2)
