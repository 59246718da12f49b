"""Test app for broker-side delays: tasks that record when they start against their ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("delaytest")

RUNS = "test:delays:runs"
RETRIES = "test:delays:retries"


@priority_task(priority="normal", bind=True)
def stamp(self: Any, i: int, due: float) -> None:
    """Records its number, due time and start time."""
    runtime_of(app).redis.rpush(
        RUNS,
        json.dumps(
            {"i": i, "due": due, "at": time.time(), "pid": os.getpid(), "id": self.request.id}
        ),
    )


@priority_task(priority="normal", bind=True, max_retries=3)
def retry_once(self: Any, i: int, countdown: float) -> None:
    """Fails its first run with a retry after ``countdown``; the second run records."""
    redis = runtime_of(app).redis
    if self.request.retries == 0:
        redis.rpush(RETRIES, json.dumps({"i": i, "at": time.time(), "event": "retry"}))
        raise self.retry(countdown=countdown)
    redis.rpush(
        RETRIES,
        json.dumps({"i": i, "at": time.time(), "event": "done", "retries": self.request.retries}),
    )
