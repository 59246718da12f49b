"""Benchmark app for recovery after a worker dies: a counted no-op and a gate that holds."""

from __future__ import annotations

import os
import time

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task

REDIS_URL = os.environ.get("BENCH_CORE_REDIS_URL", BENCH_REDIS_URL)
app = create_app("bench-delivery", redis_url=REDIS_URL)
_redis = redis.Redis.from_url(REDIS_URL)


@priority_task(priority="normal", name="bench.dl.noop")
def noop() -> None:
    _redis.incr("bench:done")


@priority_task(priority="normal", name="bench.dl.hold")
def hold() -> None:
    """Keeps the worker's only process busy while the gate key exists."""
    _redis.set("bench:holding", 1)
    while _redis.exists("bench:gate"):
        time.sleep(0.05)
