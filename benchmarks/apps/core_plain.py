"""The same tasks on a plain Celery app with default settings: the baseline."""

from __future__ import annotations

import time

import redis
from celery import Celery

from benchmarks.common import BENCH_REDIS_URL

app = Celery("bench-plain", broker=BENCH_REDIS_URL)
_redis = redis.Redis.from_url(BENCH_REDIS_URL)


@app.task(name="bench.noop")
def noop() -> None:
    _redis.incr("bench:done")


@app.task(name="bench.low")
def low(sleep_s: float) -> None:
    time.sleep(sleep_s)


@app.task(name="bench.critical")
def critical(sent_at: float) -> None:
    _redis.rpush("bench:waits", time.time() - sent_at)
