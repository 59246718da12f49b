"""Plain Celery with default settings: countdown tasks that record their start beside their ETA."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from benchmarks.common import BENCH_REDIS_URL

REDIS_URL = os.environ.get("BENCH_DELAYS_REDIS_URL", BENCH_REDIS_URL)
app = Celery("bench-delays-plain", broker=REDIS_URL)
_redis = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.delays.stamp")
def stamp(due: float) -> None:
    _redis.rpush("bench:delays:late", time.time() - due)
