"""Benchmark app on taskyard: no-op and timed tasks."""

from __future__ import annotations

import os
import time

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task

REDIS_URL = os.environ.get("BENCH_CORE_REDIS_URL", BENCH_REDIS_URL)
app = create_app("bench-taskyard", redis_url=REDIS_URL)
_redis = redis.Redis.from_url(REDIS_URL)


@priority_task(priority="normal", name="bench.ty.noop")
def noop() -> None:
    if _redis.incr("bench:done") == 1:
        _redis.set("bench:first", time.time())


@priority_task(priority="low", name="bench.ty.low")
def low(sleep_s: float) -> None:
    time.sleep(sleep_s)


@priority_task(priority="critical", name="bench.ty.critical")
def critical(sent_at: float) -> None:
    _redis.rpush("bench:waits", time.time() - sent_at)
