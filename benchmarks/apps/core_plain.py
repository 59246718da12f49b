"""The same tasks on a plain Celery app with default settings: the baseline."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from benchmarks.common import BENCH_REDIS_URL

REDIS_URL = os.environ.get("BENCH_CORE_REDIS_URL", BENCH_REDIS_URL)
app = Celery("bench-plain", broker=REDIS_URL)
_redis = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.noop")
def noop() -> None:
    if _redis.incr("bench:done") == 1:
        _redis.set("bench:first", time.time())


@app.task(name="bench.low")
def low(sleep_s: float) -> None:
    time.sleep(sleep_s)


@app.task(name="bench.critical")
def critical(sent_at: float) -> None:
    _redis.rpush("bench:waits", time.time() - sent_at)
