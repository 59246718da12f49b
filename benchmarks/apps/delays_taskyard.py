"""The same countdown task on taskyard (broker-side delays on, resource guards off)."""

from __future__ import annotations

import os
import time

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task

REDIS_URL = os.environ.get("BENCH_DELAYS_REDIS_URL", BENCH_REDIS_URL)
# Guards off: on a busy shared machine they would hold the benchmark's own work back.
app = create_app("bench-delays", redis_url=REDIS_URL, guard={"enabled": False})
_redis = redis.Redis.from_url(REDIS_URL)


@priority_task(priority="normal", name="bench.delays.ty.stamp")
def stamp(due: float) -> None:
    _redis.rpush("bench:delays:late", time.time() - due)


@priority_task(priority="normal", name="bench.delays.ty.noop")
def noop() -> None:
    if _redis.incr("bench:delays:done") == 1:
        _redis.set("bench:delays:first", time.time())
    else:
        _redis.set("bench:delays:last", time.time())
