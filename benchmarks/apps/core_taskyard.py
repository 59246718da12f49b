"""Benchmark app on taskyard: no-op and timed tasks."""

from __future__ import annotations

import time

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task

app = create_app("bench-taskyard", redis_url=BENCH_REDIS_URL)
_redis = redis.Redis.from_url(BENCH_REDIS_URL)


@priority_task(priority="normal", name="bench.ty.noop")
def noop() -> None:
    _redis.incr("bench:done")


@priority_task(priority="low", name="bench.ty.low")
def low(sleep_s: float) -> None:
    time.sleep(sleep_s)


@priority_task(priority="critical", name="bench.ty.critical")
def critical(sent_at: float) -> None:
    _redis.rpush("bench:waits", time.time() - sent_at)
