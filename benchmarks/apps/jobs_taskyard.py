"""Tasks of the job-control benchmark (resource guards off, the benchmarks' Redis database)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task

REDIS_URL = os.environ.get("BENCH_JOBS_REDIS_URL", BENCH_REDIS_URL)
app = create_app("bench-jobs", redis_url=REDIS_URL, guard={"enabled": False})
_redis = redis.Redis.from_url(REDIS_URL)
SEEN = "bench:jobs:seen"


@priority_task(priority="normal", name="bench.jobs.noop")
def noop(i: int) -> None:
    """Never run: the benchmark measures sending."""


@priority_task(priority="normal", name="bench.jobs.unique", unique="active")
def unique_noop(i: int) -> None:
    """The same, unique while queued or running."""


@priority_task(priority="normal", name="bench.jobs.throttled", throttle=1.0)
def throttled(key: str) -> None:
    """At most one per second per key."""


@priority_task(priority="normal", name="bench.jobs.watch", bind=True)
def watch(self: Any, limit_s: float) -> None:
    """Checks cancel_requested() every 5 ms; records when it saw the cancel."""
    end = time.monotonic() + limit_s
    _redis.set("bench:jobs:started", self.request.id)
    while time.monotonic() < end:
        if self.cancel_requested():
            _redis.rpush(SEEN, f"{self.request.id} {time.time()!r}")
            return
        time.sleep(0.005)
