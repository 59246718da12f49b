"""Benchmark app: no-op tasks, with the dead-letter gate on or (BENCH_DEAD_GATE=off) off."""

from __future__ import annotations

import os
import time

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task
from taskyard.deadletters.consumer import DeadLetterGate

REDIS_URL = os.environ.get("TASKYARD_BENCH_REDIS_URL", BENCH_REDIS_URL)
app = create_app("bench-dead", redis_url=REDIS_URL, guard={"enabled": False})
if os.environ.get("BENCH_DEAD_GATE") == "off":
    # The one difference between the two sides: Celery's own consumer callback, ungated.
    app.steps["consumer"].discard(DeadLetterGate)
_redis = redis.Redis.from_url(REDIS_URL)


@priority_task(priority="normal", name="bench.dead.noop")
def noop(side: str) -> None:
    now = time.time()
    pipe = _redis.pipeline(transaction=False)
    pipe.incr(f"bench:dead:{side}:done")
    pipe.setnx(f"bench:dead:{side}:first", now)
    pipe.set(f"bench:dead:{side}:last", now)
    pipe.execute()
